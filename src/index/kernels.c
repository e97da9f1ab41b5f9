/*
** kernels.c: the one distance-kernel module of clipdb. Scores by BLAS
** (sgemv for one query, blocked sgemm for many), fused metric transform +
** filter + bounded top-k heaps, and exact (flat) search built on them. IVF
** (ivf.c) and k-means (kmeans.c) use the same kernels.
**
** Scores: dot  = q.b
**         cos  = q.b / (|q| |b|)          (0 when either norm is 0)
**         l2   = -(|q|^2 - 2 q.b + |b|^2)  to rank candidates (clamped to
**                <= 0); a candidate that enters a heap gets its distance
**                recomputed directly, -sum (q_i - b_i)^2 in double (the
**                expansion loses small distances: an image against itself
**                scored -0.0078), turned into -||q-b|| when the heaps are
**                finished (0 exactly for identical vectors).
*/
#include "index/index.h"

#include "compute/compute.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- metrics -------------------------------------------------------------- */

int clipdb_metric_parse(const char *name, clipdb_metric *out)
{
    if (!name || !out) return CLIPDB_EINVAL;
    if (!strcmp(name, "cosine") || !strcmp(name, "cos")) *out = CLIPDB_METRIC_COSINE;
    else if (!strcmp(name, "dot") || !strcmp(name, "ip")) *out = CLIPDB_METRIC_DOT;
    else if (!strcmp(name, "l2")) *out = CLIPDB_METRIC_L2;
    else return CLIPDB_EINVAL;
    return CLIPDB_OK;
}

const char *clipdb_metric_name(clipdb_metric m)
{
    switch (m) {
    case CLIPDB_METRIC_COSINE: return "cosine";
    case CLIPDB_METRIC_DOT: return "dot";
    case CLIPDB_METRIC_L2: return "l2";
    }
    return "?";
}

int cdb_metric_ok(clipdb_metric m)
{
    return m == CLIPDB_METRIC_COSINE || m == CLIPDB_METRIC_DOT || m == CLIPDB_METRIC_L2;
}

int clipdb_vec_norms(const float *x, size_t n, int d, float *norms_out)
{
    size_t i;
    if ((!x && n) || (!norms_out && n) || d < 1 || d > CLIPDB_MAX_DIM) return CLIPDB_EINVAL;
    for (i = 0; i < n; i++) {
        /* the one norm (double accumulation), as for stored vectors */
        norms_out[i] = cdb_norm(x + i * (size_t)d, (size_t)d);
    }
    return CLIPDB_OK;
}

void cdb_normalize_rows(const float *x, size_t n, int d, float *y)
{
    size_t i;
    int j;
    for (i = 0; i < n; i++) {
        const float *xi = x + i * (size_t)d;
        float *yi = y + i * (size_t)d;
        float nr = cdb_norm(xi, (size_t)d);
        float inv = nr > 0 ? 1.0f / nr : 0.0f;
        for (j = 0; j < d; j++) yi[j] = xi[j] * inv;
    }
}

/* ---- filters -------------------------------------------------------------- */

int cdb_filter_check(const clipdb_filter *f, cdb_err *e)
{
    size_t i;
    if (!f) return CLIPDB_OK;
    if (f->bitmap) return CLIPDB_OK;
    if (f->n_keys && !f->keys)
        return cdb_err_set(e, CLIPDB_EINVAL, "filter: n_keys %zu but keys is NULL", f->n_keys);
    for (i = 1; i < f->n_keys; i++)
        if (f->keys[i] < f->keys[i - 1])
            return cdb_err_set(e, CLIPDB_EINVAL, "filter: keys are not sorted ascending (at %zu)", i);
    return CLIPDB_OK;
}

int cdb_filter_allows(const clipdb_filter *f, int64_t key)
{
    size_t lo, hi;
    if (!f) return 1;
    if (f->bitmap) {
        if (key < 0 || (uint64_t)key >= f->nbits) return 0;
        return (int)((f->bitmap[(uint64_t)key >> 6] >> ((uint64_t)key & 63)) & 1u);
    }
    lo = 0;
    hi = f->n_keys;
    while (lo < hi) { /* first index with keys[i] >= key */
        size_t mid = lo + (hi - lo) / 2;
        if (f->keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo < f->n_keys && f->keys[lo] == key;
}

/* ---- top-k heaps ------------------------------------------------------------ */

/* Min-heap by rank: the root is the worst hit kept (lowest score, then the
** largest id). */
static inline int worse(const clipdb_hit *a, const clipdb_hit *b)
{
    return cdb_hit_better(b->score, b->id, a->score, a->id);
}

static void sift_down(clipdb_hit *h, int n, int i)
{
    clipdb_hit x = h[i];
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && worse(&h[c + 1], &h[c])) c++;
        if (!worse(&h[c], &x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

void cdb_topk_push(cdb_topk *t, size_t hidx, float score, int64_t id)
{
    clipdb_hit *h = t->hits + hidx * (size_t)t->k;
    int n = t->count[hidx];
    if (n < t->k) { /* sift up */
        int i = n;
        clipdb_hit x = {id, score};
        while (i > 0) {
            int p = (i - 1) / 2;
            if (!worse(&x, &h[p])) break;
            h[i] = h[p];
            i = p;
        }
        h[i] = x;
        t->count[hidx] = n + 1;
    } else if (cdb_hit_better(score, id, h[0].score, h[0].id)) {
        h[0].id = id;
        h[0].score = score;
        sift_down(h, n, 0);
    }
}

void cdb_topk_finish(cdb_topk *t, size_t hidx, clipdb_metric metric)
{
    clipdb_hit *h = t->hits + hidx * (size_t)t->k;
    int n = t->count[hidx], i;
    /* heap sort: repeatedly move the worst to the end -> best first */
    for (i = n - 1; i > 0; i--) {
        clipdb_hit tmp = h[0];
        h[0] = h[i];
        h[i] = tmp;
        sift_down(h, i, 0);
    }
    if (metric == CLIPDB_METRIC_L2)
        for (i = 0; i < n; i++) {
            float r = sqrtf(-h[i].score);
            h[i].score = r > 0.0f ? -r : 0.0f; /* +0, not -0, for identical vectors */
        }
    for (i = n; i < t->k; i++) {
        h[i].id = -1;
        h[i].score = -INFINITY;
    }
}

/* ---- the fused score transform + filter + top-k pass ------------------------ */

/* -|q - b|^2 (d), accumulated in double: the exact L2 score of a kept hit. */
static float l2_exact(const float *q, const float *b, int d)
{
    double s = 0;
    int i;
    for (i = 0; i < d; i++) {
        double t = (double)q[i] - (double)b[i];
        s += t * t;
    }
    return (float)-s;
}

/* One query row of scores s (rows->n) into heap hidx; q (d): the query (for
** the exact L2 distance of candidates that enter the heap). `metric` is a
** compile-time constant at every call site, so the branches fold away. */
static inline void push_row(clipdb_metric metric, const float *s, float qn, const float *q,
                            int d, const cdb_rows *rows, const clipdb_filter *filter,
                            cdb_topk *t, size_t hidx)
{
    const clipdb_hit *h = t->hits + hidx * (size_t)t->k;
    float qinv = qn > 0 ? 1.0f / qn : 0.0f, qn2 = qn * qn;
    size_t j;
    for (j = 0; j < rows->n; j++) {
        float sc;
        int64_t id;
        if (metric == CLIPDB_METRIC_DOT) {
            sc = s[j];
        } else if (metric == CLIPDB_METRIC_COSINE) {
            float bn = rows->norms[j];
            sc = bn > 0 ? s[j] * qinv / bn : 0.0f;
        } else {
            float bn = rows->norms[j];
            sc = 2.0f * s[j] - qn2 - bn * bn; /* -|q-b|^2 */
            if (sc > 0.0f) sc = 0.0f;
        }
        if (sc != sc) continue; /* NaN never ranks */
        id = rows->ids ? rows->ids[j] : rows->id0 + (int64_t)j;
        if (t->count[hidx] == t->k && !cdb_hit_better(sc, id, h[0].score, h[0].id)) continue;
        if (filter && !cdb_filter_allows(filter, rows->keys ? rows->keys[j] : rows->key0 + (int64_t)j))
            continue;
        if (metric == CLIPDB_METRIC_L2) sc = l2_exact(q, rows->x + j * (size_t)d, d);
        cdb_topk_push(t, hidx, sc, id);
    }
}

typedef struct push_job {
    clipdb_metric metric;
    int d;
    const float *S;       /* (m, ld) */
    size_t ld;
    const cdb_qblock *qb;
    const cdb_rows *rows;
    const clipdb_filter *filter;
    cdb_topk *t;
    size_t i0, i1;
} push_job;

static void push_range(const push_job *j)
{
    size_t i;
    for (i = j->i0; i < j->i1; i++) {
        size_t h = j->qb->heap ? j->qb->heap[i] : j->qb->heap0 + i;
        const float *s = j->S + i * j->ld;
        float qn = j->qb->norms[i];
        const float *q = j->qb->q + i * (size_t)j->d;
        switch (j->metric) {
        case CLIPDB_METRIC_DOT: push_row(CLIPDB_METRIC_DOT, s, qn, q, j->d, j->rows, j->filter, j->t, h); break;
        case CLIPDB_METRIC_COSINE: push_row(CLIPDB_METRIC_COSINE, s, qn, q, j->d, j->rows, j->filter, j->t, h); break;
        case CLIPDB_METRIC_L2: push_row(CLIPDB_METRIC_L2, s, qn, q, j->d, j->rows, j->filter, j->t, h); break;
        }
    }
}

static void push_task(void *arg, size_t i)
{
    push_range((const push_job *)arg + i);
}

#define MAX_THREADS CDB_POOL_MAX_THREADS

void cdb_kparams_default(cdb_kparams *p)
{
    p->q_block = 1024;
    p->b_block = 8192;
    p->gemv_max_m = 1;
    p->small_max = (size_t)1 << 18;
    p->direct_max = (size_t)1 << 16;
    p->threads = 0;
    p->thread_min = (size_t)1 << 18;
}

static int n_threads(const cdb_kparams *p)
{
    int t = p->threads > 0 ? p->threads : cdb_pool_threads();
    if (t < 1) t = 1;
    if (t > MAX_THREADS) t = MAX_THREADS;
    return t;
}

/* The heaps of distinct queries are disjoint, so queries are split across
** the tasks of the core pool with no locking (each query's heap is touched
** by one task). */
static void push_block(const cdb_kparams *p, clipdb_metric metric, int d, const float *S,
                       size_t ld, const cdb_qblock *qb, const cdb_rows *rows,
                       const clipdb_filter *filter, cdb_topk *t)
{
    push_job jobs[MAX_THREADS];
    int nt = n_threads(p), i;
    size_t m = qb->m;
    if ((size_t)nt > m) nt = (int)m;
    if (nt <= 1 || m * rows->n < p->thread_min) nt = 1;
    for (i = 0; i < nt; i++) {
        jobs[i] = (push_job){metric, d, S, ld, qb, rows, filter, t, m * (size_t)i / (size_t)nt,
                             m * (size_t)(i + 1) / (size_t)nt};
    }
    if (nt == 1) push_range(&jobs[0]);
    else cdb_pool_run((size_t)nt, push_task, jobs);
}

/* out (nb) = B (nb, d) @ q (d), single-threaded, for blocks too small for
** OpenBLAS's threaded sgemv to pay off (IVF lists at one query). Eight
** independent partial sums per row let the compiler use one SIMD register
** without reassociating a single sum. */
static void dot_rows(const float *B, size_t nb, int d, const float *q, float *out)
{
    size_t i;
    int j, t;
    for (i = 0; i < nb; i++) {
        const float *b = B + i * (size_t)d;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s;
        for (j = 0; j + 8 <= d; j += 8)
            for (t = 0; t < 8; t++) acc[t] += b[j + t] * q[j + t];
        s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; j < d; j++) s += b[j] * q[j];
        out[i] = s;
    }
}

void cdb_scan(const cdb_kparams *p, clipdb_metric metric, int d, const cdb_qblock *qb,
              const cdb_rows *rows, const clipdb_filter *filter, cdb_topk *t, float *scratch)
{
    size_t r0, bb = p->b_block;
    for (r0 = 0; r0 < rows->n; r0 += bb) {
        size_t nb = rows->n - r0 < bb ? rows->n - r0 : bb, i;
        cdb_rows sub = *rows;
        sub.x = rows->x + r0 * (size_t)d;
        sub.norms = rows->norms ? rows->norms + r0 : NULL;
        sub.ids = rows->ids ? rows->ids + r0 : NULL;
        sub.id0 = rows->id0 + (int64_t)r0;
        sub.keys = rows->keys ? rows->keys + r0 : NULL;
        sub.key0 = rows->key0 + (int64_t)r0;
        sub.n = nb;
        if (qb->m <= p->gemv_max_m) {
            for (i = 0; i < qb->m; i++) {
                if (nb * (size_t)d <= p->small_max) {
                    // B (nb, d) @ q_i (d) -> S[i] (nb), inline kernel
                    dot_rows(sub.x, nb, d, qb->q + i * (size_t)d, scratch + i * nb);
                    continue;
                }
                // B (nb, d) @ q_i (d) -> S[i] (nb)
                cdb_sgemv((int)nb, d, 1.0f, sub.x, d, qb->q + i * (size_t)d, 0.0f, scratch + i * nb);
            }
        } else if (qb->m * nb * (size_t)d <= p->direct_max) {
            for (i = 0; i < qb->m; i++) {
                // B (nb, d) @ q_i (d) -> S[i] (nb), inline kernel: a block this
                // small costs sgemm more in packing than in arithmetic
                dot_rows(sub.x, nb, d, qb->q + i * (size_t)d, scratch + i * nb);
            }
        } else {
            // Q (m, d) @ B^T (d, nb) -> S (m, nb)
            cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, (int)qb->m, (int)nb, d, 1.0f,
                        qb->q, d, sub.x, d, 0.0f, scratch, (int)nb);
        }
        push_block(p, metric, d, scratch, nb, qb, &sub, filter, t);
    }
}

/* ---- exact (flat) search ------------------------------------------------------ */

int clipdb_flat_search(const clipdb_vecs *base, const float *queries, size_t nq, int k,
                       clipdb_metric metric, const clipdb_filter *filter, clipdb_hit *out,
                       int *n_out, char **errmsg)
{
    cdb_kparams p;
    cdb_err e;
    int rc;
    cdb_err_clear(&e);
    cdb_kparams_default(&p);
    rc = cdb_flat_search(&p, base, queries, nq, k, metric, filter, out, n_out, &e);
    if (rc != CLIPDB_OK && errmsg) *errmsg = cdb_strdup(e.msg);
    return rc;
}

/* Distinct keys of a sorted list that fall in [0, n). */
static size_t count_keys_in_range(const clipdb_filter *f, size_t n)
{
    size_t i, c = 0;
    for (i = 0; i < f->n_keys; i++) {
        if (f->keys[i] < 0 || (uint64_t)f->keys[i] >= n) continue;
        if (i > 0 && f->keys[i] == f->keys[i - 1]) continue;
        c++;
    }
    return c;
}

static size_t count_bits_in_range(const clipdb_filter *f, size_t n)
{
    size_t lim = f->nbits < n ? f->nbits : n, w, c = 0;
    for (w = 0; w < lim / 64; w++) c += (size_t)__builtin_popcountll(f->bitmap[w]);
    if (lim % 64) c += (size_t)__builtin_popcountll(f->bitmap[lim / 64] & ((1ull << (lim % 64)) - 1));
    return c;
}

int cdb_flat_search(const cdb_kparams *p, const clipdb_vecs *base, const float *queries,
                    size_t nq, int k, clipdb_metric metric, const clipdb_filter *filter,
                    clipdb_hit *out, int *n_out, cdb_err *e)
{
    int rc = CLIPDB_OK, d, gather;
    size_t n, allowed, i, q0, r0, qbm, scratch_n, tmp;
    float *scratch = NULL, *qnorm = NULL, *bnorm_own = NULL, *gx = NULL, *gn = NULL;
    int64_t *gid = NULL, *gkey = NULL;
    int *count = NULL;
    const float *bnorm;
    cdb_topk t;

    if (!base || !n_out || (!queries && nq) || (!out && nq))
        return cdb_err_set(e, CLIPDB_EINVAL, "flat search: NULL argument");
    d = base->d;
    n = base->n;
    if (d < 1 || d > CLIPDB_MAX_DIM)
        return cdb_err_set(e, CLIPDB_EINVAL, "flat search: dimension %d out of range [1, %d]", d, CLIPDB_MAX_DIM);
    if (k < 1 || k > CLIPDB_MAX_K)
        return cdb_err_set(e, CLIPDB_EINVAL, "flat search: k = %d out of range [1, %d]", k, CLIPDB_MAX_K);
    if (!cdb_metric_ok(metric)) return cdb_err_set(e, CLIPDB_EINVAL, "flat search: unknown metric %d", (int)metric);
    if (n && !base->data) return cdb_err_set(e, CLIPDB_EINVAL, "flat search: base data is NULL");
    if (!cdb_mul_ok(n, (size_t)d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp) ||
        !cdb_mul_ok(nq, (size_t)d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp) ||
        !cdb_mul_ok(nq, (size_t)k, &tmp) || !cdb_mul_ok(tmp, sizeof(clipdb_hit), &tmp))
        return cdb_err_set(e, CLIPDB_EINVAL, "flat search: sizes overflow (n %zu, nq %zu, d %d, k %d)", n, nq, d, k);
    if ((rc = cdb_filter_check(filter, e)) != CLIPDB_OK) return rc;

    allowed = !filter ? n : filter->bitmap ? count_bits_in_range(filter, n) : count_keys_in_range(filter, n);
    *n_out = (size_t)k < allowed ? k : (int)allowed;
    count = calloc(nq ? nq : 1, sizeof *count);
    qnorm = cdb_malloc_array(nq, sizeof *qnorm);
    if (!count || !qnorm) goto oom;
    t.hits = out;
    t.count = count;
    t.k = k;
    if (allowed == 0 || nq == 0) goto finish;

    bnorm = base->norms;
    if (!bnorm && metric != CLIPDB_METRIC_DOT) {
        if (!(bnorm_own = cdb_malloc_array(n, sizeof *bnorm_own))) goto oom;
        clipdb_vec_norms(base->data, n, d, bnorm_own);
        bnorm = bnorm_own;
    }
    clipdb_vec_norms(queries, nq, d, qnorm);
    qbm = nq < p->q_block ? nq : p->q_block;
    if (!cdb_mul_ok(qbm, p->b_block, &scratch_n) || !(scratch = cdb_malloc_array(scratch_n, sizeof *scratch)))
        goto oom;

    /* A selective key list: gather the allowed rows block by block into a
    ** contiguous copy, so the GEMM skips the rest. Otherwise scan all rows and
    ** test the filter only for candidates that would enter a heap. */
    gather = filter && !filter->bitmap && allowed * 4 < n;
    if (gather) {
        size_t gb = p->b_block, ki = 0, g;
        gx = cdb_malloc_array(gb, (size_t)d * sizeof *gx);
        gn = cdb_malloc_array(gb, sizeof *gn);
        gid = cdb_malloc_array(gb, sizeof *gid);
        gkey = cdb_malloc_array(gb, sizeof *gkey);
        if (!gx || !gn || !gid || !gkey) goto oom;
        while (ki < filter->n_keys) {
            cdb_rows rows;
            for (g = 0; g < gb && ki < filter->n_keys; ki++) {
                int64_t r = filter->keys[ki];
                if (r < 0 || (uint64_t)r >= n || (ki > 0 && r == filter->keys[ki - 1])) continue;
                memcpy(gx + g * (size_t)d, base->data + (size_t)r * (size_t)d, (size_t)d * sizeof *gx);
                gn[g] = bnorm ? bnorm[r] : 0.0f;
                gid[g] = base->ids ? base->ids[r] : r;
                gkey[g] = r;
                g++;
            }
            if (g == 0) break;
            rows = (cdb_rows){gx, gn, gid, 0, gkey, 0, g};
            for (q0 = 0; q0 < nq; q0 += p->q_block) {
                cdb_qblock qb = {queries + q0 * (size_t)d, qnorm + q0, NULL, q0,
                                 nq - q0 < p->q_block ? nq - q0 : p->q_block};
                cdb_scan(p, metric, d, &qb, &rows, NULL, &t, scratch);
            }
        }
    } else {
        /* Outer loop over base blocks so each block is read from memory once
        ** for all query blocks; the heaps (in `out`) persist across blocks. */
        for (r0 = 0; r0 < n; r0 += p->b_block) {
            size_t nb = n - r0 < p->b_block ? n - r0 : p->b_block;
            cdb_rows rows = {base->data + r0 * (size_t)d, bnorm ? bnorm + r0 : NULL,
                             base->ids ? base->ids + r0 : NULL, (int64_t)r0, NULL, (int64_t)r0, nb};
            for (q0 = 0; q0 < nq; q0 += p->q_block) {
                cdb_qblock qb = {queries + q0 * (size_t)d, qnorm + q0, NULL, q0,
                                 nq - q0 < p->q_block ? nq - q0 : p->q_block};
                cdb_scan(p, metric, d, &qb, &rows, filter, &t, scratch);
            }
        }
    }
finish:
    for (i = 0; i < nq; i++) cdb_topk_finish(&t, i, metric);
    goto cleanup;
oom:
    rc = cdb_err_set(e, CLIPDB_ENOMEM, "flat search: out of memory");
cleanup:
    free(scratch);
    free(qnorm);
    free(bnorm_own);
    free(count);
    free(gx);
    free(gn);
    free(gid);
    free(gkey);
    return rc;
}
