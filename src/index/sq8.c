/*
** sq8.c: a compressed (scalar-quantised) copy of a vector set for search,
** with fp32 re-ranking, so that "exact" search stays exact for the hits it
** returns.
**
** Quantiser: per dimension, as Faiss's ScalarQuantizer QT_8bit: vmin[i] and
** step[i] = (vmax[i] - vmin[i]) / 255 over the set; code = round((x - vmin)
** / step) in [0, 255]; x^ = vmin + step * code (error <= step / 2).
**
** Search of one query q (d):
**   approximate dot  q.x^ = q.vmin + sum_i (q_i step_i) code_i   (one pass
**                    over n * d bytes: a quarter of the fp32 scan's traffic);
**   cosine / l2      from that dot with the exact fp32 norms of the rows;
**   the best R = rerank candidates (R >= k) by the approximate score are kept
**   (a bounded heap per thread, rows split across threads), then rescored
**   exactly against the fp32 rows (double accumulation) and the best k of
**   them returned, best first. Scores of returned hits are therefore exact;
**   a true neighbour is missed only if its approximate score falls out of
**   the top R (measured: tests/unit/test_index_kernels.c, bench_search).
*/
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "index/index.h"

#define SQ8_MAX_THREADS 16

struct clipdb_sq8 {
    size_t n;
    int d;
    float *vmin, *step;   /* (d) each */
    float *norms;         /* (n) exact fp32 norms */
    uint8_t *codes;       /* (n, d) */
};

int clipdb_sq8_build(const clipdb_vecs *base, clipdb_sq8 **out, char **errmsg)
{
    clipdb_sq8 *s = NULL;
    cdb_err e;
    size_t i, nd;
    int j, rc = CLIPDB_OK;
    float *vmax = NULL;

    cdb_err_clear(&e);
    if (out) *out = NULL;
    if (!base || !out || (base->n && !base->data) || base->d < 1 || base->d > CLIPDB_MAX_DIM) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8: bad vector set");
        goto cleanup;
    }
    if (!cdb_mul_ok(base->n, (size_t)base->d, &nd)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8: sizes overflow");
        goto cleanup;
    }
    s = calloc(1, sizeof *s);
    vmax = cdb_malloc_array((size_t)base->d, sizeof *vmax);
    if (!s || !vmax || !(s->vmin = cdb_malloc_array((size_t)base->d, sizeof(float))) ||
        !(s->step = cdb_malloc_array((size_t)base->d, sizeof(float))) ||
        !(s->norms = cdb_malloc_array(base->n ? base->n : 1, sizeof(float))) ||
        !(s->codes = malloc(nd ? nd : 1))) {
        rc = cdb_err_set(&e, CLIPDB_ENOMEM, "sq8: out of memory (%zu codes)", nd);
        goto cleanup;
    }
    s->n = base->n;
    s->d = base->d;
    for (j = 0; j < s->d; j++) {
        s->vmin[j] = base->n ? INFINITY : 0.0f;
        vmax[j] = base->n ? -INFINITY : 0.0f;
    }
    for (i = 0; i < s->n; i++) {
        const float *x = base->data + i * (size_t)s->d;
        for (j = 0; j < s->d; j++) {
            if (!isfinite(x[j])) {
                rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8: row %zu has a non-finite value", i);
                goto cleanup;
            }
            s->vmin[j] = fminf(s->vmin[j], x[j]);
            vmax[j] = fmaxf(vmax[j], x[j]);
        }
    }
    for (j = 0; j < s->d; j++) s->step[j] = (vmax[j] - s->vmin[j]) / 255.0f;
    for (i = 0; i < s->n; i++) {
        const float *x = base->data + i * (size_t)s->d;
        uint8_t *c = s->codes + i * (size_t)s->d;
        for (j = 0; j < s->d; j++) {
            float v = s->step[j] > 0 ? (x[j] - s->vmin[j]) / s->step[j] : 0.0f;
            v = nearbyintf(v);
            c[j] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
        s->norms[i] = base->norms ? base->norms[i] : (float)cdb_norm(x, (size_t)s->d);
    }
cleanup:
    free(vmax);
    if (rc != CLIPDB_OK) {
        clipdb_sq8_free(s);
        if (errmsg) *errmsg = cdb_strdup(e.msg);
    } else {
        *out = s;
    }
    return rc;
}

void clipdb_sq8_free(clipdb_sq8 *s)
{
    if (!s) return;
    free(s->vmin);
    free(s->step);
    free(s->norms);
    free(s->codes);
    free(s);
}

size_t clipdb_sq8_bytes(const clipdb_sq8 *s)
{
    return s ? s->n * (size_t)s->d + s->n * sizeof(float) + 2 * (size_t)s->d * sizeof(float) : 0;
}

/* sum_i w_i c_i over d codes: 16 lanes (one AVX-512 register, or two AVX
** ones) with the u8 -> float conversion in the loop. */
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef float v16f __attribute__((vector_size(64)));
static inline float dot_codes(const float *w, const uint8_t *c, int d)
{
    v16f acc = {0};
    float s = 0;
    int j;
    for (j = 0; j + 16 <= d; j += 16) {
        v16u8 cb;
        v16f wv;
        memcpy(&cb, c + j, 16);
        memcpy(&wv, w + j, 64);
        acc += wv * __builtin_convertvector(cb, v16f);
    }
    for (int t = 0; t < 16; t++) s += acc[t];
    for (; j < d; j++) s += w[j] * (float)c[j];
    return s;
}

typedef struct sq8_job {
    const clipdb_sq8 *s;
    const float *w;          /* (d) q_i * step_i */
    float q0, qn;            /* q . vmin, |q| */
    clipdb_metric metric;
    const clipdb_filter *filter;
    const int64_t *ids;
    size_t r0, r1;
    cdb_topk t;              /* one heap of R candidates; ids are ROW indexes */
} sq8_job;

static void *sq8_scan(void *arg)
{
    sq8_job *j = arg;
    const clipdb_sq8 *s = j->s;
    const float qinv = j->qn > 0 ? 1.0f / j->qn : 0.0f, qn2 = j->qn * j->qn;
    size_t r;
    for (r = j->r0; r < j->r1; r++) {
        float dot = j->q0 + dot_codes(j->w, s->codes + r * (size_t)s->d, s->d), sc;
        if (j->metric == CLIPDB_METRIC_DOT) sc = dot;
        else if (j->metric == CLIPDB_METRIC_COSINE) sc = s->norms[r] > 0 ? dot * qinv / s->norms[r] : 0.0f;
        else sc = 2.0f * dot - qn2 - s->norms[r] * s->norms[r];
        if (sc != sc) continue;
        if (j->t.count[0] == j->t.k && !cdb_hit_better(sc, (int64_t)r, j->t.hits[0].score, j->t.hits[0].id))
            continue;
        if (j->filter && !cdb_filter_allows(j->filter, (int64_t)r)) continue;
        cdb_topk_push(&j->t, 0, sc, (int64_t)r);
    }
    return NULL;
}

/* The exact score of row r for query q (fp32 data, double accumulation), in
** the heaps' internal convention (l2: -|q - x|^2). */
static float exact_score(const clipdb_vecs *base, const float *q, float qn, size_t r,
                         clipdb_metric metric)
{
    const float *x = base->data + r * (size_t)base->d;
    double dot = 0, l2 = 0, xn2 = 0;
    int i;
    for (i = 0; i < base->d; i++) {
        double t = (double)q[i] - x[i];
        dot += (double)q[i] * x[i];
        l2 += t * t;
        xn2 += (double)x[i] * x[i];
    }
    if (metric == CLIPDB_METRIC_DOT) return (float)dot;
    if (metric == CLIPDB_METRIC_L2) return (float)-l2;
    return qn > 0 && xn2 > 0 ? (float)(dot / ((double)qn * sqrt(xn2))) : 0.0f;
}

int clipdb_sq8_search(const clipdb_sq8 *s, const clipdb_vecs *base, const float *queries,
                      size_t nq, int k, int rerank, clipdb_metric metric,
                      const clipdb_filter *filter, clipdb_hit *out, int *n_out, char **errmsg)
{
    sq8_job jobs[SQ8_MAX_THREADS];
    pthread_t tid[SQ8_MAX_THREADS];
    clipdb_hit *cand = NULL;
    int *ccount = NULL, *count = NULL;
    float *w = NULL;
    cdb_err e;
    int rc = CLIPDB_OK, nt, t, R, started;
    size_t qi, total = 0;

    cdb_err_clear(&e);
    if (!s || !base || !n_out || (!queries && nq) || (!out && nq)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8 search: NULL argument");
        goto cleanup;
    }
    if (base->n != s->n || base->d != s->d || (s->n && !base->data)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8 search: the fp32 set (%zu x %d) is not the one "
                         "compressed (%zu x %d)", base->n, base->d, s->n, s->d);
        goto cleanup;
    }
    if (k < 1 || k > CLIPDB_MAX_K) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8 search: k = %d out of range", k);
        goto cleanup;
    }
    if (!cdb_metric_ok(metric)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "sq8 search: unknown metric %d", (int)metric);
        goto cleanup;
    }
    if ((rc = cdb_filter_check(filter, &e)) != CLIPDB_OK) goto cleanup;
    R = rerank > k ? rerank : k;
    if (R > CLIPDB_MAX_K) R = CLIPDB_MAX_K;
    nt = cdb_compute_threads();
    if (nt > SQ8_MAX_THREADS) nt = SQ8_MAX_THREADS;
    if (nt < 1 || s->n * (size_t)s->d < ((size_t)1 << 18)) nt = 1;
    cand = cdb_malloc_array((size_t)nt * R, sizeof *cand);
    ccount = calloc((size_t)nt, sizeof *ccount);
    count = calloc(1, sizeof *count);
    w = cdb_malloc_array((size_t)s->d, sizeof *w);
    if (!cand || !ccount || !count || !w) {
        rc = cdb_err_set(&e, CLIPDB_ENOMEM, "sq8 search: out of memory");
        goto cleanup;
    }
    *n_out = 0;
    for (qi = 0; qi < nq; qi++) {
        const float *q = queries + qi * (size_t)s->d;
        float q0 = 0, qn = (float)cdb_norm(q, (size_t)s->d);
        cdb_topk fin = {out + qi * (size_t)k, count, k};
        int i;
        for (i = 0; i < s->d; i++) {
            w[i] = q[i] * s->step[i];
            q0 += q[i] * s->vmin[i];
        }
        for (t = 0; t < nt; t++) {
            ccount[t] = 0;
            jobs[t] = (sq8_job){s, w, q0, qn, metric, filter, base->ids,
                                s->n * (size_t)t / (size_t)nt, s->n * (size_t)(t + 1) / (size_t)nt,
                                {cand + (size_t)t * R, ccount + t, R}};
        }
        started = 0;
        for (t = 1; t < nt; t++) {
            if (pthread_create(&tid[t], NULL, sq8_scan, &jobs[t]) != 0) break;
            started = t;
        }
        sq8_scan(&jobs[0]);
        for (t = 1; t <= started; t++) pthread_join(tid[t], NULL);
        for (t = started + 1; t < nt; t++) sq8_scan(&jobs[t]);
        /* re-rank: the candidates of every thread, rescored exactly */
        *count = 0;
        for (t = 0; t < nt; t++)
            for (i = 0; i < ccount[t]; i++) {
                size_t r = (size_t)cand[(size_t)t * R + i].id;
                cdb_topk_push(&fin, 0, exact_score(base, q, qn, r, metric),
                              base->ids ? base->ids[r] : (int64_t)r);
            }
        cdb_topk_finish(&fin, 0, metric);
        total = (size_t)*count;
        if (qi == 0 || (int)total < *n_out) *n_out = (int)total;
    }
cleanup:
    free(cand);
    free(ccount);
    free(count);
    free(w);
    if (rc != CLIPDB_OK && errmsg) *errmsg = cdb_strdup(e.msg);
    return rc;
}
