/*
** kmeans.c: k-means for the IVF coarse quantizer.
**
** Seeding: k-means++ (D. Arthur and S. Vassilvitskii, "k-means++: the
** advantages of careful seeding", SODA 2007): the first centre uniformly at
** random, every next one drawn with probability proportional to D(x)^2, the
** squared distance to the nearest centre chosen so far.
** Then Lloyd iterations; assignment goes through the shared distance kernel
** (cdb_scan, a GEMM: ||x||^2 - 2 x.c + ||c||^2); an empty cluster takes half
** of the largest one, whose centroid is split in two by a small symmetric
** perturbation (as Faiss's Clustering does). Training may use a random sample
** of at most max_sample points (Faiss: 256 per centroid).
*/
#include "index/index.h"

#include "compute/compute.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

int cdb_assign_nearest(const float *x, size_t n, int d, const float *c, int k, int ip,
                       int32_t *assign, float *dist_out, cdb_err *e)
{
    int rc = CLIPDB_OK;
    cdb_kparams p;
    size_t i, q0, qb_n;
    float *xn = NULL, *cn = NULL, *scratch = NULL;
    clipdb_hit *hits = NULL;
    int *count = NULL;
    cdb_topk t;
    cdb_rows rows;

    cdb_kparams_default(&p);
    if (p.b_block < (size_t)k) p.b_block = (size_t)k; /* all centroids in one GEMM */
    qb_n = n < p.q_block ? n : p.q_block;
    xn = cdb_malloc_array(n, sizeof *xn);
    cn = cdb_malloc_array((size_t)k, sizeof *cn);
    scratch = cdb_malloc_array(p.q_block, p.b_block * sizeof *scratch);
    hits = cdb_malloc_array(qb_n ? qb_n : 1, sizeof *hits);
    count = cdb_malloc_array(qb_n ? qb_n : 1, sizeof *count);
    if (!xn || !cn || !scratch || !hits || !count) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "k-means assignment: out of memory");
        goto cleanup;
    }
    clipdb_vec_norms(x, n, d, xn);
    clipdb_vec_norms(c, (size_t)k, d, cn);
    rows = (cdb_rows){c, cn, NULL, 0, NULL, 0, (size_t)k};
    t.hits = hits;
    t.count = count;
    t.k = 1;
    for (q0 = 0; q0 < n; q0 += p.q_block) {
        size_t m = n - q0 < p.q_block ? n - q0 : p.q_block;
        cdb_qblock qb = {x + q0 * (size_t)d, xn + q0, NULL, 0, m};
        memset(count, 0, m * sizeof *count);
        // X_blk (m, d) @ C^T (d, k) -> scores (m, k); best = nearest
        cdb_scan(&p, ip ? CLIPDB_METRIC_DOT : CLIPDB_METRIC_L2, d, &qb, &rows, NULL, &t, scratch);
        for (i = 0; i < m; i++) {
            /* a NaN row never enters its heap: send it to list 0 */
            assign[q0 + i] = count[i] ? (int32_t)hits[i].id : 0;
            if (dist_out) dist_out[q0 + i] = count[i] ? (ip ? hits[i].score : -hits[i].score) : 0.0f;
        }
    }
cleanup:
    free(xn);
    free(cn);
    free(scratch);
    free(hits);
    free(count);
    return rc;
}

static void normalize_inplace(float *c, int k, int d)
{
    cdb_normalize_rows(c, (size_t)k, d, c);
}

int cdb_kmeans(const float *x_in, size_t n_in, int d, int k, const cdb_kmeans_opts *o,
               float *cent, double *obj_out, cdb_err *e)
{
    int rc = CLIPDB_OK, it, j, c;
    size_t n = n_in, i, tmp;
    cdb_rng rng = {o->seed};
    float *xs = NULL, *mind = NULL, *dots = NULL, *dist = NULL;
    size_t *idx = NULL;
    int32_t *assign = NULL;
    double *sums = NULL, prev_obj = HUGE_VAL, obj = 0;
    size_t *cnt = NULL;
    const float *x = x_in;

    if (k < 1 || d < 1 || n_in < (size_t)k)
        return cdb_err_set(e, CLIPDB_EINVAL, "k-means: need at least k = %d points, got %zu", k, n_in);
    if (!cdb_mul_ok(n_in, (size_t)d, &tmp) || !cdb_mul_ok(tmp, sizeof(float), &tmp) ||
        !cdb_mul_ok((size_t)k, (size_t)d, &tmp) || !cdb_mul_ok(tmp, sizeof(double), &tmp))
        return cdb_err_set(e, CLIPDB_EINVAL, "k-means: sizes overflow");

    /* optional training sample: a partial Fisher-Yates shuffle picks n of the
    ** n_in points (in random order: Lloyd does not care about the order) */
    if (o->max_sample && n_in > o->max_sample && o->max_sample >= (size_t)k) {
        n = o->max_sample;
        idx = cdb_malloc_array(n_in, sizeof *idx);
        xs = cdb_malloc_array(n, (size_t)d * sizeof *xs);
        if (!idx || !xs) goto oom;
        for (i = 0; i < n_in; i++) idx[i] = i;
        for (i = 0; i < n; i++) {
            size_t r = i + (size_t)cdb_rng_below(&rng, n_in - i), sw = idx[i];
            idx[i] = idx[r];
            idx[r] = sw;
        }
        for (i = 0; i < n; i++)
            memcpy(xs + i * (size_t)d, x_in + idx[i] * (size_t)d, (size_t)d * sizeof *xs);
        x = xs;
    }

    mind = cdb_malloc_array(n, sizeof *mind);
    dots = cdb_malloc_array(n, sizeof *dots);
    dist = cdb_malloc_array(n, sizeof *dist);
    assign = cdb_malloc_array(n, sizeof *assign);
    sums = cdb_malloc_array((size_t)k * (size_t)d, sizeof *sums);
    cnt = cdb_malloc_array((size_t)k, sizeof *cnt);
    if (!mind || !dots || !dist || !assign || !sums || !cnt) goto oom;

    /* ---- k-means++ seeding ---- */
    {
        float *xn2 = dist; /* reuse: squared norms of the points */
        for (i = 0; i < n; i++) xn2[i] = cdb_sdot(d, x + i * (size_t)d, x + i * (size_t)d);
        memcpy(cent, x + (size_t)cdb_rng_below(&rng, n) * (size_t)d, (size_t)d * sizeof *cent);
        for (i = 0; i < n; i++) mind[i] = INFINITY;
        for (c = 0;; c++) {
            const float *cc = cent + (size_t)c * (size_t)d;
            float cn2 = cdb_sdot(d, cc, cc);
            double total = 0, r, acc = 0;
            size_t pick = n - 1;
            // X (n, d) @ c (d) -> dots (n)
            cdb_sgemv((int)n, d, 1.0f, x, d, cc, 0.0f, dots);
            for (i = 0; i < n; i++) {
                float d2 = xn2[i] - 2.0f * dots[i] + cn2;
                if (d2 < 0) d2 = 0;
                if (d2 < mind[i]) mind[i] = d2;
                total += mind[i];
            }
            if (c + 1 == k) break;
            if (total > 0) {
                r = cdb_rng_unif(&rng) * total;
                for (i = 0; i < n; i++) {
                    acc += mind[i];
                    if (acc > r && mind[i] > 0) {
                        pick = i;
                        break;
                    }
                }
            } else {
                pick = (size_t)cdb_rng_below(&rng, n); /* all points coincide */
            }
            memcpy(cent + (size_t)(c + 1) * (size_t)d, x + pick * (size_t)d, (size_t)d * sizeof *cent);
        }
    }
    if (o->spherical) normalize_inplace(cent, k, d);

    /* ---- Lloyd iterations ---- */
    for (it = 0; it < (o->max_iter > 0 ? o->max_iter : 1); it++) {
        if ((rc = cdb_assign_nearest(x, n, d, cent, k, 0, assign, dist, e)) != CLIPDB_OK) goto cleanup;
        obj = 0;
        for (i = 0; i < n; i++) obj += dist[i];
        memset(sums, 0, (size_t)k * (size_t)d * sizeof *sums);
        memset(cnt, 0, (size_t)k * sizeof *cnt);
        for (i = 0; i < n; i++) {
            const float *xi = x + i * (size_t)d;
            double *s = sums + (size_t)assign[i] * (size_t)d;
            cnt[assign[i]]++;
            for (j = 0; j < d; j++) s[j] += xi[j];
        }
        for (c = 0; c < k; c++) {
            if (!cnt[c]) continue;
            for (j = 0; j < d; j++)
                cent[(size_t)c * (size_t)d + j] = (float)(sums[(size_t)c * (size_t)d + j] / (double)cnt[c]);
        }
        /* empty clusters: split the largest (Faiss's split_clusters, with the
        ** largest instead of a size-weighted random pick: deterministic) */
        for (c = 0; c < k; c++) {
            int big = 0, b;
            const float eps = 1.0f / 1024.0f;
            if (cnt[c]) continue;
            for (b = 1; b < k; b++)
                if (cnt[b] > cnt[big]) big = b;
            if (cnt[big] < 2) break;
            for (j = 0; j < d; j++) {
                float v = cent[(size_t)big * (size_t)d + j];
                int up = j % 2 == 0;
                cent[(size_t)c * (size_t)d + j] = v * (up ? 1 + eps : 1 - eps);
                cent[(size_t)big * (size_t)d + j] = v * (up ? 1 - eps : 1 + eps);
            }
            cnt[c] = cnt[big] / 2;
            cnt[big] -= cnt[c];
        }
        if (o->spherical) normalize_inplace(cent, k, d);
        if (prev_obj < HUGE_VAL && prev_obj - obj <= o->tol * prev_obj) break;
        prev_obj = obj;
    }
    if (obj_out) *obj_out = obj;
    goto cleanup;
oom:
    rc = cdb_err_set(e, CLIPDB_ENOMEM, "k-means: out of memory");
cleanup:
    free(xs);
    free(idx);
    free(mind);
    free(dots);
    free(dist);
    free(assign);
    free(sums);
    free(cnt);
    return rc;
}
