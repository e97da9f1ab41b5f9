/*
** metrics.c: ranks of the right items from one batched score computation,
** hit-rate curves, median and mean rank, and the random baseline. The
** definitions (gallery, ties, ranks) are in include/clipdb.h (eval section).
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "eval/eval.h"
#include "index/index.h"

int cdb_eval_ranks(clipdb_metric metric, int d, const float *q, size_t nq,
                   const int64_t *qlab, const float *g, size_t ng, const int64_t *gid,
                   const int64_t *glab, int64_t *ranks, cdb_err *e)
{
    float *qn = NULL, *gn = NULL, *gsq = NULL, *s = NULL;
    const float *qa = q, *ga = g;
    size_t bq, i0, i, j, bytes;
    int rc = CLIPDB_OK;

    if (d < 1 || !cdb_metric_ok(metric) || (nq && (!q || !qlab || !ranks)) ||
        (ng && (!g || !gid || !glab)))
        return cdb_err_set(e, CLIPDB_EINVAL, "eval: bad arguments to the rank computation");
    if (ng > CDB_EVAL_MAX_GALLERY || nq > CDB_EVAL_MAX_GALLERY)
        return cdb_err_set(e, CLIPDB_ELIMIT, "eval: %zu x %zu items is over the limit of %zu",
                           nq, ng, CDB_EVAL_MAX_GALLERY);
    if (nq == 0) return CLIPDB_OK;
    if (ng == 0) {
        memset(ranks, 0, nq * sizeof *ranks);
        return CLIPDB_OK;
    }
    bq = CDB_EVAL_BLOCK_SCORES / ng;
    if (bq < 1) bq = 1;
    if (bq > 1024) bq = 1024;
    if (bq > nq) bq = nq;
    if (!cdb_mul_ok(bq * ng, sizeof *s, &bytes) || !(s = malloc(bytes))) goto oom;
    if (metric == CLIPDB_METRIC_COSINE) {
        /* cosine = dot of unit rows */
        if (!(qn = cdb_malloc_array(nq * (size_t)d, sizeof *qn)) ||
            !(gn = cdb_malloc_array(ng * (size_t)d, sizeof *gn)))
            goto oom;
        cdb_normalize_rows(q, nq, d, qn);
        cdb_normalize_rows(g, ng, d, gn);
        qa = qn;
        ga = gn;
    } else if (metric == CLIPDB_METRIC_L2) {
        if (!(gsq = cdb_malloc_array(ng, sizeof *gsq))) goto oom;
        for (j = 0; j < ng; j++) gsq[j] = cdb_sdot(d, g + j * (size_t)d, g + j * (size_t)d);
    }
    for (i0 = 0; i0 < nq; i0 += bq) {
        size_t m = nq - i0 < bq ? nq - i0 : bq;
        /* q block (m, d) @ g^T (d, ng) -> s (m, ng) */
        cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, (int)m, (int)ng, d, 1.0f, qa + i0 * (size_t)d, d, ga,
                  d, 0.0f, s, (int)ng);
        if (gsq) /* L2: 2 q.g - |g|^2, the same order as -|q - g| */
            for (i = 0; i < m; i++)
                for (j = 0; j < ng; j++) s[i * ng + j] = 2.0f * s[i * ng + j] - gsq[j];
        for (i = 0; i < m; i++) {
            const float *row = s + i * ng;
            int64_t lab = qlab[i0 + i], rank = 1;
            size_t best = ng;
            for (j = 0; j < ng; j++)
                if (glab[j] == lab &&
                    (best == ng || cdb_hit_better(row[j], gid[j], row[best], gid[best])))
                    best = j;
            if (best == ng) {
                ranks[i0 + i] = 0;
                continue;
            }
            for (j = 0; j < ng; j++)
                if (j != best && cdb_hit_better(row[j], gid[j], row[best], gid[best])) rank++;
            ranks[i0 + i] = rank;
        }
    }
    goto cleanup;
oom:
    rc = cdb_err_set(e, CLIPDB_ENOMEM, "eval: out of memory for %zu x %zu scores", nq, ng);
cleanup:
    free(qn);
    free(gn);
    free(gsq);
    free(s);
    return rc;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int cdb_eval_rank_stats(const int64_t *ranks, size_t nq, int kmax, double *curve,
                        cdb_rank_stats *st, cdb_err *e)
{
    int64_t *r = NULL, *hist = NULL;
    size_t i, n = 0;
    double sum = 0, acc = 0;
    int k;

    memset(st, 0, sizeof *st);
    if (kmax < 0) return cdb_err_set(e, CLIPDB_EINVAL, "eval: bad kmax %d", kmax);
    r = cdb_malloc_array(nq ? nq : 1, sizeof *r);
    hist = cdb_calloc_array((size_t)kmax + 1, sizeof *hist);
    if (!r || !hist) {
        free(r);
        free(hist);
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    }
    for (i = 0; i < nq; i++) {
        if (ranks[i] <= 0) continue;
        r[n++] = ranks[i];
        sum += (double)ranks[i];
        if (ranks[i] <= kmax) hist[ranks[i]]++;
    }
    st->n = (int64_t)n;
    if (n) {
        qsort(r, n, sizeof *r, cmp_i64);
        st->median = (double)r[(n - 1) / 2]; /* the lower median */
        st->mean = sum / (double)n;
    }
    for (k = 1; k <= kmax; k++) {
        acc += (double)hist[k];
        curve[k - 1] = n ? acc / (double)n : 0.0;
    }
    free(r);
    free(hist);
    return CLIPDB_OK;
}

void cdb_eval_random_curve(const int64_t *m, size_t nq, int64_t n, int kmax, double *curve)
{
    size_t i, cnt = 0;
    int k;
    for (k = 0; k < kmax; k++) curve[k] = 0;
    for (i = 0; i < nq; i++) {
        int64_t t;
        if (m[i] <= 0) continue;
        cnt++;
        for (k = 1; k <= kmax; k++) {
            /* C(n - m, k) / C(n, k) = prod_{t<m} (n - k - t) / (n - t) */
            double miss = 1.0;
            if (m[i] == 1) { /* exactly k / n */
                curve[k - 1] += k <= n ? (double)k / (double)n : 1.0;
                continue;
            }
            for (t = 0; t < m[i] && miss > 0; t++)
                miss *= n - k - t > 0 ? (double)(n - k - t) / (double)(n - t) : 0.0;
            curve[k - 1] += 1.0 - miss;
        }
    }
    for (k = 0; k < kmax; k++) curve[k] = cnt ? curve[k] / (double)cnt : 0.0;
}
