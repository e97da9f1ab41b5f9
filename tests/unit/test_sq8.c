/*
** test_sq8.c: the SQ8 compressed copy (src/index/sq8.c) against exact flat
** search: recall@10 on clustered vectors for every metric, exact scores of
** the returned hits, filters, ids, and bad input.
*/
#include <stdint.h>

#include "index/index.h"
#include "test.h"

/* n points around nc centres (as bench_search's clustered set), offset so
** that every dimension has a non-zero mean as CLIP vectors do. */
static float *clustered(size_t n, int d, int nc, uint64_t seed)
{
    cdb_rng r = {seed};
    float *c = malloc((size_t)nc * d * sizeof *c), *x = malloc(n * d * sizeof *x);
    for (size_t i = 0; i < (size_t)nc * d; i++) c[i] = (float)(cdb_rng_unif(&r) * 2 - 1);
    for (size_t i = 0; i < n; i++) {
        const float *cc = c + (cdb_rng_below(&r, (uint64_t)nc)) * d;
        for (int j = 0; j < d; j++)
            x[i * d + j] = 0.3f + cc[j] + 0.35f * (float)(cdb_rng_unif(&r) * 2 - 1);
    }
    free(c);
    return x;
}

TEST(sq8_recall_and_exact_scores_every_metric)
{
    const size_t n = 20000, nq = 100;
    const int d = 128, k = 10;
    float *x = clustered(n, d, 50, 1), *q = clustered(nq, d, 50, 2);
    clipdb_hit *ref = malloc(nq * k * sizeof *ref), *got = malloc(nq * k * sizeof *got);
    clipdb_vecs base = {x, NULL, NULL, n, d};
    clipdb_sq8 *s = NULL;
    int nr = 0, ng = 0;
    REQUIRE(clipdb_sq8_build(&base, &s, NULL) == CLIPDB_OK);
    CHECK(clipdb_sq8_bytes(s) >= n * d && clipdb_sq8_bytes(s) < n * d * 2);
    for (int m = 0; m < 3; m++) {
        clipdb_metric metric = (clipdb_metric[]){CLIPDB_METRIC_COSINE, CLIPDB_METRIC_DOT,
                                                 CLIPDB_METRIC_L2}[m];
        size_t found = 0;
        REQUIRE(clipdb_flat_search(&base, q, nq, k, metric, NULL, ref, &nr, NULL) == CLIPDB_OK);
        REQUIRE(clipdb_sq8_search(s, &base, q, nq, k, 4 * k, metric, NULL, got, &ng, NULL) ==
                CLIPDB_OK);
        CHECK(ng == k && nr == k);
        for (size_t i = 0; i < nq; i++)
            for (int a = 0; a < k; a++) {
                const clipdb_hit *g = &got[i * k + a];
                for (int b = 0; b < k; b++)
                    if (ref[i * k + b].id == g->id) {
                        found++;
                        /* the same vector pair: the same score (exact, not approximate) */
                        CHECK_NEAR(g->score, ref[i * k + b].score,
                                   2e-6 * (1 + fabs(ref[i * k + b].score)));
                    }
                if (a) CHECK(g->score <= got[i * k + a - 1].score);
            }
        if ((double)found / (nq * k) < 0.999) {
            char msg[96];
            snprintf(msg, sizeof msg, "metric %d: recall@10 %.4f < 0.999", m,
                     (double)found / (nq * k));
            test_fail_at(__FILE__, __LINE__, msg);
        }
        /* rerank = k scans the codes alone: still mostly right, and scores exact */
        REQUIRE(clipdb_sq8_search(s, &base, q, nq, k, k, metric, NULL, got, &ng, NULL) == CLIPDB_OK);
    }
    clipdb_sq8_free(s);
    free(x), free(q), free(ref), free(got);
}

TEST(sq8_filter_ids_self_match_and_bad_input)
{
    const size_t n = 3000;
    const int d = 40, k = 5;
    float *x = clustered(n, d, 10, 3);
    int64_t *ids = malloc(n * sizeof *ids), keys[3] = {7, 100, 2999};
    clipdb_vecs base = {x, ids, NULL, n, d}, other = {x, NULL, NULL, n - 1, d};
    clipdb_filter f = {0};
    clipdb_hit hits[5];
    clipdb_sq8 *s = NULL;
    char *err = NULL;
    int ng = 0;
    for (size_t i = 0; i < n; i++) ids[i] = 1000 + (int64_t)i;
    REQUIRE(clipdb_sq8_build(&base, &s, NULL) == CLIPDB_OK);
    /* a stored vector finds itself first, at L2 distance exactly 0 */
    REQUIRE(clipdb_sq8_search(s, &base, x + 42 * d, 1, k, 20, CLIPDB_METRIC_L2, NULL, hits, &ng,
                              NULL) == CLIPDB_OK);
    CHECK(hits[0].id == 1042 && hits[0].score == 0.0f && !signbit(hits[0].score));
    /* a filter of three rows: three hits, the rest padded */
    f.keys = keys;
    f.n_keys = 3;
    REQUIRE(clipdb_sq8_search(s, &base, x, 1, k, 20, CLIPDB_METRIC_COSINE, &f, hits, &ng, NULL) ==
            CLIPDB_OK);
    CHECK(ng == 3);
    for (int i = 0; i < 3; i++) CHECK(hits[i].id == 1007 || hits[i].id == 1100 || hits[i].id == 3999);
    CHECK(hits[3].id == -1 && hits[4].id == -1);
    /* bad calls */
    CHECK(clipdb_sq8_search(s, &other, x, 1, k, 20, CLIPDB_METRIC_DOT, NULL, hits, &ng, &err) ==
          CLIPDB_EINVAL);
    CHECK(err && strstr(err, "not the one"));
    clipdb_free(err);
    CHECK(clipdb_sq8_search(s, &base, x, 1, 0, 20, CLIPDB_METRIC_DOT, NULL, hits, &ng, NULL) ==
          CLIPDB_EINVAL);
    CHECK(clipdb_sq8_search(s, &base, x, 1, k, 20, (clipdb_metric)9, NULL, hits, &ng, NULL) ==
          CLIPDB_EINVAL);
    clipdb_sq8_free(s);
    s = NULL;
    x[5] = NAN;
    err = NULL;
    CHECK(clipdb_sq8_build(&base, &s, &err) == CLIPDB_EINVAL && s == NULL);
    CHECK(err && strstr(err, "non-finite"));
    clipdb_free(err);
    clipdb_sq8_free(NULL);
    free(x), free(ids);
}
