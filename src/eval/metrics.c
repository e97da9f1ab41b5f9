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

/* The score of a pair from its dot product, the same expression in every
** direction so that ties are ties both ways: cosine dot * (1/|q| * 1/|g|)
** (the product of the inverse norms is commutative), dot, and for L2
** 2 dot - |g|^2, which orders a query's gallery as -|q - g| does. */
static inline float pair_score(clipdb_metric m, float dot, float qinv, float ginv, float gsq)
{
    return m == CLIPDB_METRIC_COSINE ? dot * (qinv * ginv)
           : m == CLIPDB_METRIC_DOT  ? dot
                                     : 2.0f * dot - gsq;
}

/* 1 / |x| per row (cdb_norm; 0 for a zero row) and |x|^2 = x . x. */
static void row_norms(const float *x, size_t n, int d, float *inv, float *sq)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float nr = cdb_norm(x + i * (size_t)d, (size_t)d);
        inv[i] = nr > 0 ? 1.0f / nr : 0.0f;
        sq[i] = cdb_sdot(d, x + i * (size_t)d, x + i * (size_t)d);
    }
}

/* Branch-free "(s, id) ranks before (t, jd)" (cdb_hit_better), 0 or 1, so
** the counting loops vectorise. */
#define BEFORE(s, id, t, jd) ((int)((s) > (t)) | ((int)((s) == (t)) & (int)((id) < (jd))))

int cdb_eval_ranks(clipdb_metric metric, int d, const float *q, size_t nq,
                   const int64_t *qlab, const float *g, size_t ng, const int64_t *gid,
                   const int64_t *glab, int64_t *ranks, cdb_err *e)
{
    float *qinv = NULL, *qsq = NULL, *ginv = NULL, *gsq = NULL, *s = NULL;
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
    if (!cdb_mul_ok(bq * ng, sizeof *s, &bytes) || !(s = malloc(bytes)) ||
        !(qinv = cdb_malloc_array(nq, sizeof *qinv)) || !(qsq = cdb_malloc_array(nq, sizeof *qsq)) ||
        !(ginv = cdb_malloc_array(ng, sizeof *ginv)) || !(gsq = cdb_malloc_array(ng, sizeof *gsq))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "eval: out of memory for %zu x %zu scores", nq, ng);
        goto cleanup;
    }
    row_norms(q, nq, d, qinv, qsq);
    row_norms(g, ng, d, ginv, gsq);
    for (i0 = 0; i0 < nq; i0 += bq) {
        size_t m = nq - i0 < bq ? nq - i0 : bq;
        /* q block (m, d) @ g^T (d, ng) -> dots (m, ng) */
        cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, (int)m, (int)ng, d, 1.0f, q + i0 * (size_t)d, d, g, d,
                  0.0f, s, (int)ng);
        for (i = 0; i < m; i++) {
            float *row = s + i * ng, qi = qinv[i0 + i], sb;
            int64_t lab = qlab[i0 + i], rank = 1, idb;
            size_t best = ng;
            for (j = 0; j < ng; j++) row[j] = pair_score(metric, row[j], qi, ginv[j], gsq[j]);
            for (j = 0; j < ng; j++)
                if (glab[j] == lab &&
                    (best == ng || cdb_hit_better(row[j], gid[j], row[best], gid[best])))
                    best = j;
            if (best == ng) {
                ranks[i0 + i] = 0;
                continue;
            }
            sb = row[best];
            idb = gid[best];
            for (j = 0; j < ng; j++) rank += BEFORE(row[j], gid[j], sb, idb);
            ranks[i0 + i] = rank;
        }
    }
cleanup:
    free(qinv);
    free(qsq);
    free(ginv);
    free(gsq);
    free(s);
    return rc;
}

int cdb_eval_ranks_pair(int d, const float *caps, size_t nc, const int64_t *cap_img,
                        const int64_t *cid, const float *imgs, size_t ni, const int64_t *iid,
                        int64_t *const ranks_t2i[3], int64_t *const ranks_i2t[3], cdb_err *e)
{
    float *s = NULL, *cinv = NULL, *csq = NULL, *iinv = NULL, *isq = NULL, *bs = NULL;
    int64_t *bid = NULL;
    int32_t *cnt = NULL;
    size_t c, i, n;
    int rc = CLIPDB_OK, m;

    if (d < 1 || nc == 0 || ni == 0 || !caps || !imgs || !cap_img || !cid || !iid)
        return cdb_err_set(e, CLIPDB_EINVAL, "eval: bad arguments to the rank computation");
    if (!cdb_mul_ok(nc, ni, &n) || n > CDB_EVAL_FULL_SCORES)
        return cdb_err_set(e, CLIPDB_ELIMIT, "eval: %zu x %zu scores is over the limit of %zu",
                           nc, ni, CDB_EVAL_FULL_SCORES);
    if (!(s = cdb_malloc_array(n, sizeof *s)) || !(bs = cdb_malloc_array(ni, sizeof *bs)) ||
        !(bid = cdb_malloc_array(ni, sizeof *bid)) || !(cnt = cdb_malloc_array(ni, sizeof *cnt)) ||
        !(cinv = cdb_malloc_array(nc, sizeof *cinv)) || !(csq = cdb_malloc_array(nc, sizeof *csq)) ||
        !(iinv = cdb_malloc_array(ni, sizeof *iinv)) || !(isq = cdb_malloc_array(ni, sizeof *isq))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "eval: out of memory for %zu x %zu scores", nc, ni);
        goto cleanup;
    }
    row_norms(caps, nc, d, cinv, csq);
    row_norms(imgs, ni, d, iinv, isq);
    /* ONE product for the three metrics and both directions:
    ** captions (nc, d) @ images^T (d, ni) -> dots (nc, ni) */
    cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, (int)nc, (int)ni, d, 1.0f, caps, d, imgs, d, 0.0f, s,
              (int)ni);
    for (m = 0; m < 3; m++) {
        clipdb_metric mt = (clipdb_metric)m;
        if (!ranks_t2i[m] && !ranks_i2t[m]) continue;
        /* text->image, row by row (gallery: images); on the way, the best
        ** right caption of each image (gallery: captions) */
        for (i = 0; i < ni; i++) bid[i] = -1;
        for (c = 0; c < nc; c++) {
            const float *row = s + c * ni;
            size_t t = (size_t)cap_img[c];
            float st = pair_score(mt, row[t], cinv[c], iinv[t], isq[t]), sc;
            int32_t rank = 1;
            int64_t it = iid[t];
            if (ranks_t2i[m]) {
                for (i = 0; i < ni; i++)
                    rank += BEFORE(pair_score(mt, row[i], cinv[c], iinv[i], isq[i]), iid[i], st, it);
                ranks_t2i[m][c] = rank;
            }
            sc = pair_score(mt, row[t], iinv[t], cinv[c], csq[c]);
            if (bid[t] < 0 || cdb_hit_better(sc, cid[c], bs[t], bid[t])) {
                bs[t] = sc;
                bid[t] = cid[c];
            }
        }
        if (!ranks_i2t[m]) continue;
        /* image->text: count, row by row, the captions ranking before each
        ** image's best right caption (the best itself is not before itself;
        ** an image with no caption compares with +inf and is set to 0) */
        for (i = 0; i < ni; i++) {
            cnt[i] = 1;
            if (bid[i] < 0) bs[i] = INFINITY;
        }
        for (c = 0; c < nc; c++) {
            const float *row = s + c * ni;
            float ci = cinv[c], cs = csq[c];
            int64_t id = cid[c];
            for (i = 0; i < ni; i++)
                cnt[i] += BEFORE(pair_score(mt, row[i], iinv[i], ci, cs), id, bs[i], bid[i]);
        }
        for (i = 0; i < ni; i++) ranks_i2t[m][i] = bid[i] < 0 ? 0 : cnt[i];
    }
cleanup:
    free(s);
    free(bs);
    free(bid);
    free(cnt);
    free(cinv);
    free(csq);
    free(iinv);
    free(isq);
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
