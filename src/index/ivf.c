/*
** ivf.c: IVF-Flat, as Faiss's IndexIVFFlat. nlist centroids (kmeans.c); each
** vector is copied into the list of its nearest centroid (contiguous rows +
** ids + norms, for a cache-friendly scan); a search ranks the centroids for
** each query, then scans the nprobe best lists with the shared kernel
** (cdb_scan: one GEMM per list for the queries that probe it).
**
** Metric choices: l2 trains plain k-means on the raw vectors and assigns by
** L2. cosine and dot train spherical k-means on normalised vectors (unit
** centroids) and assign by inner product (Faiss does the same for
** METRIC_INNER_PRODUCT); with unit centroids the nearest list depends only on
** the direction of a vector, which is what cosine ranks by, and is the usual
** choice for dot too.
*/
#include "index/index.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct ivf_list {
    float *x;        /* n x d, capacity cap */
    float *norms;    /* n */
    int64_t *ids;    /* n */
    size_t n, cap;
} ivf_list;

/* id -> (list, position) by open addressing with linear probing and
** backward-shift deletion. */
typedef struct id_slot {
    int64_t id;
    int32_t list;    /* -1: empty */
    uint32_t pad;
    size_t pos;
} id_slot;

struct clipdb_ivf {
    cdb_err err;
    int d, nlist, trained;
    clipdb_metric metric;
    float *cent;         /* nlist x d */
    ivf_list *lists;     /* nlist */
    size_t ntotal;
    id_slot *map;        /* cap_map slots, a power of two */
    size_t cap_map;
};

/* ---- id map ----------------------------------------------------------------- */

static size_t hash_id(int64_t id, size_t cap)
{
    uint64_t z = (uint64_t)id * 0x9e3779b97f4a7c15ull;
    return (size_t)((z ^ (z >> 29)) & (cap - 1));
}

static id_slot *map_find(const clipdb_ivf *v, int64_t id)
{
    size_t h;
    if (!v->cap_map) return NULL;
    for (h = hash_id(id, v->cap_map);; h = (h + 1) & (v->cap_map - 1)) {
        id_slot *s = &v->map[h];
        if (s->list < 0) return NULL;
        if (s->id == id) return s;
    }
}

static int map_reserve(clipdb_ivf *v, size_t need)
{
    size_t cap = v->cap_map ? v->cap_map : 64, i;
    id_slot *m;
    while (cap / 2 < need) {
        if (cap > SIZE_MAX / 4 / sizeof(id_slot)) return CLIPDB_ENOMEM;
        cap *= 2;
    }
    if (cap == v->cap_map) return CLIPDB_OK;
    if (!(m = cdb_malloc_array(cap, sizeof *m))) return CLIPDB_ENOMEM;
    for (i = 0; i < cap; i++) m[i].list = -1;
    for (i = 0; i < v->cap_map; i++) {
        size_t h;
        if (v->map[i].list < 0) continue;
        for (h = hash_id(v->map[i].id, cap); m[h].list >= 0; h = (h + 1) & (cap - 1)) {}
        m[h] = v->map[i];
    }
    free(v->map);
    v->map = m;
    v->cap_map = cap;
    return CLIPDB_OK;
}

/* The caller reserved room and checked that id is absent. */
static void map_put(clipdb_ivf *v, int64_t id, int32_t list, size_t pos)
{
    size_t h;
    for (h = hash_id(id, v->cap_map); v->map[h].list >= 0; h = (h + 1) & (v->cap_map - 1)) {}
    v->map[h].id = id;
    v->map[h].list = list;
    v->map[h].pos = pos;
}

static void map_del(clipdb_ivf *v, id_slot *s)
{
    size_t i = (size_t)(s - v->map), j = i, mask = v->cap_map - 1;
    v->map[i].list = -1;
    for (;;) { /* backward shift: move later entries of the run into the hole */
        size_t h;
        j = (j + 1) & mask;
        if (v->map[j].list < 0) return;
        h = hash_id(v->map[j].id, v->cap_map);
        /* entry j may move to i unless its home h lies cyclically in (i, j] */
        if (i <= j ? (i < h && h <= j) : (i < h || h <= j)) continue;
        v->map[i] = v->map[j];
        v->map[j].list = -1;
        i = j;
    }
}

/* ---- lifecycle ----------------------------------------------------------------- */

void clipdb_ivf_train_options_init(clipdb_ivf_train_options *o)
{
    o->seed = CLIPDB_DEFAULT_SEED;
    o->max_iter = 20;
    o->tol = 1e-4;
    o->max_points_per_list = 256;
}

static void free_lists(clipdb_ivf *v)
{
    int l;
    if (v->lists)
        for (l = 0; l < v->nlist; l++) {
            free(v->lists[l].x);
            free(v->lists[l].norms);
            free(v->lists[l].ids);
        }
    free(v->lists);
    v->lists = NULL;
    free(v->map);
    v->map = NULL;
    v->cap_map = 0;
    v->ntotal = 0;
}

static int reset_lists(clipdb_ivf *v)
{
    free_lists(v);
    v->lists = calloc((size_t)v->nlist, sizeof *v->lists);
    if (!v->lists) return cdb_err_set(&v->err, CLIPDB_ENOMEM, "ivf: out of memory");
    return CLIPDB_OK;
}

int clipdb_ivf_new(clipdb_ivf **out, int d, int nlist, clipdb_metric metric)
{
    clipdb_ivf *v;
    size_t tmp;
    if (!out) return CLIPDB_EINVAL;
    *out = v = calloc(1, sizeof *v);
    if (!v) return CLIPDB_ENOMEM;
    v->d = d;
    v->nlist = nlist;
    v->metric = metric;
    if (d < 1 || d > CLIPDB_MAX_DIM)
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf: dimension %d out of range [1, %d]", d, CLIPDB_MAX_DIM);
    if (nlist < 1 || nlist > CLIPDB_MAX_NLIST)
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf: nlist %d out of range [1, %d]", nlist, CLIPDB_MAX_NLIST);
    if (!cdb_metric_ok(metric)) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf: unknown metric %d", (int)metric);
    if (!cdb_mul_ok((size_t)nlist, (size_t)d, &tmp) || !(v->cent = cdb_calloc_array(tmp, sizeof(float))))
        return cdb_err_set(&v->err, CLIPDB_ENOMEM, "ivf: out of memory");
    return reset_lists(v);
}

int clipdb_ivf_new_from_centroids(clipdb_ivf **out, int d, int nlist, clipdb_metric metric,
                                  const float *centroids)
{
    int rc = clipdb_ivf_new(out, d, nlist, metric);
    if (rc != CLIPDB_OK) return rc;
    if (!centroids) return cdb_err_set(&(*out)->err, CLIPDB_EINVAL, "ivf: centroids is NULL");
    memcpy((*out)->cent, centroids, (size_t)nlist * (size_t)d * sizeof(float));
    (*out)->trained = 1;
    return CLIPDB_OK;
}

void clipdb_ivf_free(clipdb_ivf *v)
{
    if (!v) return;
    free_lists(v);
    free(v->cent);
    free(v);
}

const char *clipdb_ivf_errmsg(const clipdb_ivf *v)
{
    if (!v) return "out of memory";
    return v->err.code == CLIPDB_OK ? "" : v->err.msg;
}

int clipdb_ivf_errcode(const clipdb_ivf *v)
{
    return v ? v->err.code : CLIPDB_ENOMEM;
}

int clipdb_ivf_info(const clipdb_ivf *v, int *d, int *nlist, clipdb_metric *metric,
                    int *is_trained, size_t *ntotal)
{
    if (!v) return CLIPDB_EINVAL;
    if (d) *d = v->d;
    if (nlist) *nlist = v->nlist;
    if (metric) *metric = v->metric;
    if (is_trained) *is_trained = v->trained;
    if (ntotal) *ntotal = v->ntotal;
    return CLIPDB_OK;
}

const float *clipdb_ivf_centroids(const clipdb_ivf *v)
{
    return v && v->trained ? v->cent : NULL;
}

/* ---- train / add / remove ---------------------------------------------------------- */

int clipdb_ivf_train(clipdb_ivf *v, const float *x, size_t n, const clipdb_ivf_train_options *opt)
{
    int rc;
    clipdb_ivf_train_options o;
    cdb_kmeans_opts ko;
    float *xn = NULL;
    size_t tmp;
    if (!v) return CLIPDB_EINVAL;
    cdb_err_clear(&v->err);
    if (!v->cent) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf: handle was not created");
    if (opt) o = *opt;
    else clipdb_ivf_train_options_init(&o);
    if (!x || n < (size_t)v->nlist)
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf train: need at least nlist = %d vectors, got %zu", v->nlist, n);
    if (o.max_points_per_list < 0) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf train: max_points_per_list < 0");
    if (!cdb_mul_ok(n, (size_t)v->d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp))
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf train: sizes overflow");
    ko.seed = o.seed;
    ko.max_iter = o.max_iter;
    ko.tol = o.tol;
    ko.spherical = v->metric != CLIPDB_METRIC_L2;
    ko.max_sample = (size_t)o.max_points_per_list * (size_t)v->nlist;
    if (ko.spherical) {
        if (!(xn = malloc(tmp))) return cdb_err_set(&v->err, CLIPDB_ENOMEM, "ivf train: out of memory");
        cdb_normalize_rows(x, n, v->d, xn);
        x = xn;
    }
    v->trained = 0;
    rc = cdb_kmeans(x, n, v->d, v->nlist, &ko, v->cent, NULL, &v->err);
    free(xn);
    if (rc != CLIPDB_OK) return rc;
    if ((rc = reset_lists(v)) != CLIPDB_OK) return rc;
    v->trained = 1;
    return CLIPDB_OK;
}

int clipdb_ivf_assign(clipdb_ivf *v, const float *x, size_t n, int32_t *lists_out)
{
    size_t tmp;
    if (!v) return CLIPDB_EINVAL;
    cdb_err_clear(&v->err);
    if (!v->trained) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf: not trained");
    if (n && (!x || !lists_out)) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf assign: NULL argument");
    if (!cdb_mul_ok(n, (size_t)v->d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp))
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf assign: sizes overflow");
    if (!n) return CLIPDB_OK;
    return cdb_assign_nearest(x, n, v->d, v->cent, v->nlist, v->metric != CLIPDB_METRIC_L2, lists_out,
                              NULL, &v->err);
}

/* Grows the three arrays of L (vectors, norms, ids) to hold need rows. On
** failure L->cap stays the smallest capacity, so L stays consistent. */
static int list_grow(ivf_list *L, size_t need, int d)
{
    size_t cx = L->cap, cn = L->cap, ci = L->cap;
    if (need <= L->cap) return CLIPDB_OK;
    if (cdb_grow((void **)&L->x, &cx, need, (size_t)d * sizeof *L->x) ||
        cdb_grow((void **)&L->norms, &cn, need, sizeof *L->norms) ||
        cdb_grow((void **)&L->ids, &ci, need, sizeof *L->ids))
        return CLIPDB_ENOMEM;
    L->cap = cx;
    return CLIPDB_OK;
}

int clipdb_ivf_add_assigned(clipdb_ivf *v, const int64_t *ids, const float *x, const int32_t *lists,
                            size_t n)
{
    size_t i, j, tmp, *per = NULL;
    int rc = CLIPDB_OK;
    if (!v) return CLIPDB_EINVAL;
    cdb_err_clear(&v->err);
    if (!v->trained) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf: not trained");
    if (n && (!ids || !x || !lists)) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf add: NULL argument");
    if (!cdb_mul_ok(n, (size_t)v->d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp) ||
        !cdb_add_ok(v->ntotal, n, &tmp) || tmp > (size_t)1 << 40)
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf add: sizes overflow");
    /* validate everything first so a failed call adds nothing */
    for (i = 0; i < n; i++) {
        if (lists[i] < 0 || lists[i] >= v->nlist)
            return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf add: list %d of id %lld out of range [0, %d)",
                               (int)lists[i], (long long)ids[i], v->nlist);
        if (map_find(v, ids[i]))
            return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf add: id %lld is already in the index",
                               (long long)ids[i]);
    }
    if (map_reserve(v, v->ntotal + n) != CLIPDB_OK) goto oom;
    if (!(per = calloc((size_t)v->nlist, sizeof *per))) goto oom;
    for (i = 0; i < n; i++) per[lists[i]]++;
    for (i = 0; i < (size_t)v->nlist; i++)
        if (per[i] && list_grow(&v->lists[i], v->lists[i].n + per[i], v->d) != CLIPDB_OK) goto oom;
    for (i = 0; i < n; i++) {
        ivf_list *L = &v->lists[lists[i]];
        if (map_find(v, ids[i])) { /* a duplicate inside this batch: undo it */
            for (j = 0; j < i; j++) {
                id_slot *s = map_find(v, ids[j]);
                if (s && s->pos + 1 == v->lists[s->list].n) {
                    v->lists[s->list].n--;
                    map_del(v, s);
                    v->ntotal--;
                }
            }
            rc = cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf add: id %lld appears twice", (long long)ids[i]);
            goto cleanup;
        }
        memcpy(L->x + L->n * (size_t)v->d, x + i * (size_t)v->d, (size_t)v->d * sizeof(float));
        clipdb_vec_norms(x + i * (size_t)v->d, 1, v->d, &L->norms[L->n]);
        L->ids[L->n] = ids[i];
        map_put(v, ids[i], lists[i], L->n);
        L->n++;
        v->ntotal++;
    }
    goto cleanup;
oom:
    rc = cdb_err_set(&v->err, CLIPDB_ENOMEM, "ivf add: out of memory");
cleanup:
    free(per);
    return rc;
}

int clipdb_ivf_add(clipdb_ivf *v, const int64_t *ids, const float *x, size_t n, int32_t *lists_out)
{
    int32_t *lists = lists_out;
    int rc;
    if (!v) return CLIPDB_EINVAL;
    if (!lists && !(lists = cdb_malloc_array(n ? n : 1, sizeof *lists)))
        return cdb_err_set(&v->err, CLIPDB_ENOMEM, "ivf add: out of memory");
    rc = clipdb_ivf_assign(v, x, n, lists);
    if (rc == CLIPDB_OK) rc = clipdb_ivf_add_assigned(v, ids, x, lists, n);
    if (lists != lists_out) free(lists);
    return rc;
}

int clipdb_ivf_remove(clipdb_ivf *v, const int64_t *ids, size_t n, size_t *n_removed)
{
    size_t i, removed = 0;
    if (!v) return CLIPDB_EINVAL;
    cdb_err_clear(&v->err);
    if (n && !ids) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf remove: NULL ids");
    for (i = 0; i < n; i++) {
        id_slot *s = map_find(v, ids[i]);
        ivf_list *L;
        size_t pos, last;
        if (!s) continue;
        L = &v->lists[s->list];
        pos = s->pos;
        last = L->n - 1;
        map_del(v, s);
        if (pos != last) { /* move the last row into the hole */
            id_slot *m = map_find(v, L->ids[last]);
            memcpy(L->x + pos * (size_t)v->d, L->x + last * (size_t)v->d, (size_t)v->d * sizeof(float));
            L->norms[pos] = L->norms[last];
            L->ids[pos] = L->ids[last];
            m->pos = pos;
        }
        L->n--;
        v->ntotal--;
        removed++;
    }
    if (n_removed) *n_removed = removed;
    return CLIPDB_OK;
}

int clipdb_ivf_list_of(const clipdb_ivf *v, int64_t id, int32_t *list)
{
    const id_slot *s;
    if (!v || !list) return CLIPDB_EINVAL;
    if (!(s = map_find(v, id))) return CLIPDB_ENOTFOUND;
    *list = s->list;
    return CLIPDB_OK;
}

/* ---- search --------------------------------------------------------------------- */

/* How many ids of the index the filter allows. */
static size_t count_allowed(const clipdb_ivf *v, const clipdb_filter *f)
{
    size_t c = 0, i;
    int l;
    if (!f) return v->ntotal;
    if (!f->bitmap && f->n_keys < v->ntotal) {
        for (i = 0; i < f->n_keys; i++)
            if ((i == 0 || f->keys[i] != f->keys[i - 1]) && map_find(v, f->keys[i])) c++;
        return c;
    }
    for (l = 0; l < v->nlist; l++)
        for (i = 0; i < v->lists[l].n; i++) c += (size_t)cdb_filter_allows(f, v->lists[l].ids[i]);
    return c;
}

/* Scans, for every list, the queries listed for it in CSR form (qoff, qidx)
** with one GEMM per chunk of at most p->q_block queries. */
static void scan_lists(const clipdb_ivf *v, const cdb_kparams *p, const float *queries,
                       const float *qnorm, const size_t *qoff, const size_t *qidx,
                       const clipdb_filter *f, cdb_topk *t, float *qbuf, float *qnbuf,
                       size_t *hbuf, float *scratch)
{
    int l, d = v->d;
    for (l = 0; l < v->nlist; l++) {
        const ivf_list *L = &v->lists[l];
        size_t a = qoff[l], b = qoff[l + 1], c0;
        cdb_rows rows = {L->x, L->norms, L->ids, 0, L->ids, 0, L->n};
        if (a == b || L->n == 0) continue;
        for (c0 = a; c0 < b; c0 += p->q_block) {
            size_t m = b - c0 < p->q_block ? b - c0 : p->q_block, i;
            cdb_qblock qb = {qbuf, qnbuf, hbuf, 0, m};
            for (i = 0; i < m; i++) { /* gather the queries: Qsub (m, d) */
                size_t q = qidx[c0 + i];
                memcpy(qbuf + i * (size_t)d, queries + q * (size_t)d, (size_t)d * sizeof(float));
                qnbuf[i] = qnorm[q];
                hbuf[i] = q;
            }
            cdb_scan(p, v->metric, d, &qb, &rows, f, t, scratch);
        }
    }
}

int clipdb_ivf_search(clipdb_ivf *v, const float *queries, size_t nq, int k, int nprobe,
                      const clipdb_filter *f, clipdb_hit *out, int *n_out)
{
    int rc = CLIPDB_OK, l, d;
    cdb_kparams p;
    size_t i, j, tmp, allowed, maxlen = 0, qbm, nfb = 0, scratch_n;
    float *qnorm = NULL, *cn = NULL, *scratch = NULL, *qbuf = NULL, *qnbuf = NULL;
    size_t *qoff = NULL, *qidx = NULL, *hbuf = NULL;
    int *count = NULL, *ccount = NULL;
    clipdb_hit *coarse = NULL;
    cdb_topk t, ct;

    if (!v) return CLIPDB_EINVAL;
    cdb_err_clear(&v->err);
    d = v->d;
    if (!v->trained) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf search: not trained");
    if (!n_out || (nq && (!queries || !out))) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf search: NULL argument");
    if (k < 1 || k > CLIPDB_MAX_K)
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf search: k = %d out of range [1, %d]", k, CLIPDB_MAX_K);
    if (nprobe < 1) return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf search: nprobe = %d must be >= 1", nprobe);
    if (nprobe > v->nlist) nprobe = v->nlist;
    if (!cdb_mul_ok(nq, (size_t)d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp) ||
        !cdb_mul_ok(nq, (size_t)k, &tmp) || !cdb_mul_ok(tmp, sizeof(clipdb_hit), &tmp) ||
        !cdb_mul_ok(nq, (size_t)nprobe, &tmp) || !cdb_mul_ok(tmp, sizeof(clipdb_hit), &tmp))
        return cdb_err_set(&v->err, CLIPDB_EINVAL, "ivf search: sizes overflow");
    if ((rc = cdb_filter_check(f, &v->err)) != CLIPDB_OK) return rc;

    cdb_kparams_default(&p);
    allowed = count_allowed(v, f);
    *n_out = (size_t)k < allowed ? k : (int)allowed;
    count = calloc(nq ? nq : 1, sizeof *count);
    if (!count) goto oom;
    t = (cdb_topk){out, count, k};
    if (nq == 0 || allowed == 0) goto finish;

    for (l = 0; l < v->nlist; l++)
        if (v->lists[l].n > maxlen) maxlen = v->lists[l].n;
    qbm = nq < p.q_block ? nq : p.q_block;
    /* scratch (m, rows): rows <= min(longest list, b_block) for list scans,
    ** rows = nlist for the coarse pass */
    scratch_n = maxlen < p.b_block ? maxlen : p.b_block;
    if (scratch_n < (size_t)v->nlist) scratch_n = (size_t)v->nlist;
    scratch_n *= qbm;
    qnorm = cdb_malloc_array(nq, sizeof *qnorm);
    cn = cdb_malloc_array((size_t)v->nlist, sizeof *cn);
    coarse = cdb_malloc_array(nq, (size_t)nprobe * sizeof *coarse);
    ccount = calloc(nq, sizeof *ccount);
    qoff = calloc((size_t)v->nlist + 1, sizeof *qoff);
    qidx = cdb_malloc_array(nq, (size_t)nprobe * sizeof *qidx);
    qbuf = cdb_malloc_array(qbm, (size_t)d * sizeof *qbuf);
    qnbuf = cdb_malloc_array(qbm, sizeof *qnbuf);
    hbuf = cdb_malloc_array(qbm, sizeof *hbuf);
    scratch = cdb_malloc_array(scratch_n, sizeof *scratch);
    if (!qnorm || !cn || !coarse || !ccount || !qoff || !qidx || !qbuf || !qnbuf || !hbuf || !scratch) goto oom;
    clipdb_vec_norms(queries, nq, d, qnorm);
    clipdb_vec_norms(v->cent, (size_t)v->nlist, d, cn);

    /* coarse: the nprobe best centroids of every query (the same kernel;
    ** inner product for cosine/dot, L2 for l2) */
    ct = (cdb_topk){coarse, ccount, nprobe};
    {
        cdb_rows crows = {v->cent, cn, NULL, 0, NULL, 0, (size_t)v->nlist};
        cdb_kparams cp = p;
        if (cp.b_block < (size_t)v->nlist) cp.b_block = (size_t)v->nlist;
        for (i = 0; i < nq; i += p.q_block) {
            cdb_qblock qb = {queries + i * (size_t)d, qnorm + i, NULL, i, nq - i < p.q_block ? nq - i : p.q_block};
            // Q_blk (m, d) @ C^T (d, nlist) -> coarse scores (m, nlist)
            cdb_scan(&cp, v->metric == CLIPDB_METRIC_L2 ? CLIPDB_METRIC_L2 : CLIPDB_METRIC_DOT, d, &qb, &crows,
                     NULL, &ct, scratch);
        }
    }
    /* invert: for every list, the queries that probe it (CSR) */
    for (i = 0; i < nq; i++)
        for (j = 0; j < (size_t)ccount[i]; j++) qoff[coarse[i * (size_t)nprobe + j].id + 1]++;
    for (l = 0; l < v->nlist; l++) qoff[l + 1] += qoff[l];
    {
        size_t *cur = cdb_malloc_array((size_t)v->nlist, sizeof *cur);
        if (!cur) goto oom;
        for (l = 0; l < v->nlist; l++) cur[l] = qoff[l];
        for (i = 0; i < nq; i++)
            for (j = 0; j < (size_t)ccount[i]; j++) qidx[cur[coarse[i * (size_t)nprobe + j].id]++] = i;
        free(cur);
    }
    scan_lists(v, &p, queries, qnorm, qoff, qidx, f, &t, qbuf, qnbuf, hbuf, scratch);

    /* fallback: a query whose probed lists held fewer than min(k, #allowed)
    ** allowed candidates scans every list (exact over the allowed vectors) */
    for (i = 0; i < nq; i++)
        if (count[i] < *n_out) {
            count[i] = 0;
            qidx[nfb++] = i;
        }
    if (nfb) {
        /* every list gets the same fallback queries: list l reads qidx[0..nfb) */
        {
            size_t *qoff2 = cdb_malloc_array((size_t)v->nlist + 1, sizeof *qoff2);
            size_t *qidx2 = cdb_malloc_array(nfb, (size_t)v->nlist * sizeof *qidx2);
            if (!qoff2 || !qidx2) {
                free(qoff2);
                free(qidx2);
                goto oom;
            }
            for (l = 0; l < v->nlist; l++) {
                qoff2[l] = (size_t)l * nfb;
                memcpy(qidx2 + (size_t)l * nfb, qidx, nfb * sizeof *qidx2);
            }
            qoff2[v->nlist] = (size_t)v->nlist * nfb;
            scan_lists(v, &p, queries, qnorm, qoff2, qidx2, f, &t, qbuf, qnbuf, hbuf, scratch);
            free(qoff2);
            free(qidx2);
        }
    }
finish:
    for (i = 0; i < nq; i++) cdb_topk_finish(&t, i, v->metric);
    goto cleanup;
oom:
    rc = cdb_err_set(&v->err, CLIPDB_ENOMEM, "ivf search: out of memory");
cleanup:
    free(qnorm);
    free(cn);
    free(coarse);
    free(ccount);
    free(qoff);
    free(qidx);
    free(qbuf);
    free(qnbuf);
    free(hbuf);
    free(scratch);
    free(count);
    return rc;
}
