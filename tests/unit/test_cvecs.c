/*
** test_cvecs.c: the compressed-copy kernels (src/index/ckern.c) on every
** level this CPU runs against the portable C reference, at sizes on both
** sides of every vector width and row grouping; and the copies
** (src/index/cvecs.c) of every kind against exact flat search: recall@10 on
** clustered vectors for every metric, on the one-query kernel path and the
** batched GEMM path, exact scores of the returned hits, stored ranges with
** clamping, fp16 conversions; and the clipdb_sq8_* interface of earlier
** releases (filters, ids, bad input).
*/
#include <stdint.h>

#include "compute/compute.h"
#include "index/index.h"
#include "test.h"

static const int dims[] = {1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 512};
static const size_t rows[] = {1, 3, 4, 5, 9};

TEST(ckern_every_level_equals_the_c_reference)
{
    const cdb_ckern *ref = cdb_ckern_at(CDB_CK_C);
    cdb_rng r = {7};
    int levels = 0;
    REQUIRE(ref && cdb_ckern_best());
    for (int lv = CDB_CK_AVX2; lv <= CDB_CK_AVX512; lv++) {
        const cdb_ckern *k = cdb_ckern_at((cdb_ck_level)lv);
        if (!k) continue;
        levels++;
        for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++)
            for (size_t ni = 0; ni < sizeof rows / sizeof rows[0]; ni++) {
                const int d = dims[di];
                const size_t n = rows[ni];
                uint8_t *x8 = malloc(n * d);
                int8_t *q8 = malloc(d);
                uint16_t *xb = malloc(n * d * 2), *xh = malloc(n * d * 2);
                float *qf = malloc(d * sizeof *qf), want[9], got[9];
                int32_t iw[9], ig[9];
                for (size_t i = 0; i < n * d; i++) {
                    float v = (float)(cdb_rng_unif(&r) * 4 - 2);
                    x8[i] = (uint8_t)cdb_rng_below(&r, 256);
                    xb[i] = cdb_f32_to_bf16(v);
                    xh[i] = cdb_f32_to_fp16(v);
                }
                /* the extremes too: 255 x -127 and 255 x 127 */
                x8[0] = 255;
                for (int j = 0; j < d; j++) {
                    q8[j] = (int8_t)((int)cdb_rng_below(&r, 255) - 127);
                    qf[j] = (float)(cdb_rng_unif(&r) * 2 - 1);
                }
                q8[0] = -127;
                ref->dot_u8s8(x8, n, d, q8, iw);
                k->dot_u8s8(x8, n, d, q8, ig);
                for (size_t i = 0; i < n; i++) CHECK(iw[i] == ig[i]);
                ref->dot_bf16(xb, n, d, qf, want);
                k->dot_bf16(xb, n, d, qf, got);
                for (size_t i = 0; i < n; i++) CHECK_NEAR(got[i], want[i], 1e-5 * d);
                ref->dot_fp16(xh, n, d, qf, want);
                k->dot_fp16(xh, n, d, qf, got);
                for (size_t i = 0; i < n; i++) CHECK_NEAR(got[i], want[i], 1e-5 * d);
                free(x8), free(q8), free(xb), free(xh), free(qf);
            }
    }
    if (!levels) SKIP("this CPU has neither AVX2 nor AVX-512 VNNI: only the C kernels run");
}

TEST(fp16_conversions_round_to_nearest_even)
{
    CHECK(cdb_f32_to_fp16(0.0f) == 0 && cdb_f32_to_fp16(-0.0f) == 0x8000);
    CHECK(cdb_f32_to_fp16(1.0f) == 0x3c00 && cdb_f32_to_fp16(-2.0f) == 0xc000);
    CHECK(cdb_f32_to_fp16(65504.0f) == 0x7bff && cdb_f32_to_fp16(65520.0f) == 0x7c00);
    CHECK(cdb_f32_to_fp16(1.0f + 1.0f / 2048) == 0x3c00);      /* tie -> even */
    CHECK(cdb_f32_to_fp16(1.0f + 3.0f / 2048) == 0x3c02);      /* tie -> even (up) */
    CHECK(cdb_f32_to_fp16(5.9604645e-8f) == 0x0001);           /* smallest subnormal */
    CHECK(cdb_f32_to_fp16(NAN) == 0x7e00 || (cdb_f32_to_fp16(NAN) & 0x7c00) == 0x7c00);
    /* every finite half survives the round trip */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00) continue;
        CHECK(cdb_f32_to_fp16(cdb_fp16_to_f32((uint16_t)h)) == h);
    }
    CHECK(cdb_fp16_to_f32(0x7c00) == INFINITY && isnan(cdb_fp16_to_f32(0x7e00)));
}

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

/* recall@k of got against ref (nq x k), checking that hits found in both
** have the same (exact) score and that got is sorted. */
static double recall_exact(const clipdb_hit *ref, const clipdb_hit *got, size_t nq, int k)
{
    size_t found = 0;
    for (size_t i = 0; i < nq; i++)
        for (int a = 0; a < k; a++) {
            const clipdb_hit *g = &got[i * k + a];
            for (int b = 0; b < k; b++)
                if (ref[i * k + b].id == g->id) {
                    found++;
                    CHECK_NEAR(g->score, ref[i * k + b].score,
                               2e-6 * (1 + fabs(ref[i * k + b].score)));
                }
            if (a) CHECK(g->score <= got[i * k + a - 1].score);
        }
    return (double)found / (double)(nq * k);
}

TEST(cvecs_recall_every_kind_metric_and_path)
{
    const size_t n = 20000, nq = 40;
    const int d = 100, k = 10; /* d not a multiple of 64 or 16 */
    float *x = clustered(n, d, 50, 1), *q = clustered(nq, d, 50, 2);
    clipdb_hit *ref = malloc(nq * k * sizeof *ref), *got = malloc(nq * k * sizeof *got);
    clipdb_vecs base = {x, NULL, NULL, n, d};
    for (int kind = CLIPDB_COMPRESS_SQ8; kind <= CLIPDB_COMPRESS_FP16; kind++) {
        clipdb_cvecs *c = NULL;
        REQUIRE(clipdb_cvecs_build(&base, (clipdb_compress)kind, NULL, &c, NULL) == CLIPDB_OK);
        CHECK((int)clipdb_cvecs_kind(c) == kind);
        CHECK(clipdb_cvecs_bytes(c) >= n * d * (kind == CLIPDB_COMPRESS_SQ8 ? 1 : 2));
        CHECK((clipdb_cvecs_ranges(c) != NULL) == (kind == CLIPDB_COMPRESS_SQ8));
        for (int m = 0; m < 3; m++) {
            clipdb_metric metric = (clipdb_metric[]){CLIPDB_METRIC_COSINE, CLIPDB_METRIC_DOT,
                                                     CLIPDB_METRIC_L2}[m];
            int nr = 0, ng = 0;
            REQUIRE(clipdb_flat_search(&base, q, nq, k, metric, NULL, ref, &nr, NULL) ==
                    CLIPDB_OK);
            /* nq >= CDB_CVECS_GEMM_MIN: the batched path; then one query at a time on
            ** every kernel level */
            REQUIRE(nq >= CDB_CVECS_GEMM_MIN);
            for (int path = -1; path <= CDB_CK_AVX512; path++) {
                const cdb_ckern *kern = path < 0 ? NULL : cdb_ckern_at((cdb_ck_level)path);
                double rec = 0;
                if (path >= 0 && !kern) continue;
                cdb_cvecs_set_kernels(c, kern);
                if (path < 0) {
                    REQUIRE(clipdb_cvecs_search(c, &base, q, nq, k, 0, metric, NULL, got, &ng,
                                                NULL) == CLIPDB_OK);
                } else {
                    for (size_t i = 0; i < nq; i++)
                        REQUIRE(clipdb_cvecs_search(c, &base, q + i * d, 1, k, 0, metric, NULL,
                                                    got + i * k, &ng, NULL) == CLIPDB_OK);
                }
                CHECK(ng == k && nr == k);
                rec = recall_exact(ref, got, nq, k);
                if (rec < 0.999) {
                    char msg[128];
                    snprintf(msg, sizeof msg, "%s metric %d path %d: recall@10 %.4f < 0.999",
                             clipdb_compress_name((clipdb_compress)kind), m, path, rec);
                    test_fail_at(__FILE__, __LINE__, msg);
                }
            }
        }
        clipdb_cvecs_free(c);
    }
    free(x), free(q), free(ref), free(got);
}

TEST(cvecs_stored_ranges_clamp_and_stay_exact)
{
    const size_t n = 3000;
    const int d = 40, k = 5;
    float *x = clustered(n, d, 10, 3), ranges[80];
    clipdb_vecs base = {x, NULL, NULL, n, d};
    clipdb_cvecs *c = NULL, *c2 = NULL;
    clipdb_hit hits[5], ref[5];
    char *err = NULL;
    int ng = 0, nr = 0;
    /* ranges of the first 100 rows only: the others partly fall outside and clamp */
    base.n = 100;
    REQUIRE(clipdb_cvecs_build(&base, CLIPDB_COMPRESS_SQ8, NULL, &c, NULL) == CLIPDB_OK);
    memcpy(ranges, clipdb_cvecs_ranges(c), sizeof ranges);
    clipdb_cvecs_free(c);
    base.n = n;
    for (size_t i = n - 50; i < n; i++) x[i * d] = 100.0f; /* far outside the range */
    REQUIRE(clipdb_cvecs_build(&base, CLIPDB_COMPRESS_SQ8, ranges, &c2, NULL) == CLIPDB_OK);
    CHECK(!memcmp(clipdb_cvecs_ranges(c2), ranges, sizeof ranges));
    /* a clamped row searched for finds itself, at L2 distance exactly 0 */
    REQUIRE(clipdb_cvecs_search(c2, &base, x + (n - 7) * d, 1, k, 0, CLIPDB_METRIC_L2, NULL, hits,
                                &ng, NULL) == CLIPDB_OK);
    CHECK(hits[0].id == (int64_t)(n - 7) && hits[0].score == 0.0f && !signbit(hits[0].score));
    REQUIRE(clipdb_flat_search(&base, x + (n - 7) * d, 1, k, CLIPDB_METRIC_DOT, NULL, ref, &nr,
                               NULL) == CLIPDB_OK);
    REQUIRE(clipdb_cvecs_search(c2, &base, x + (n - 7) * d, 1, k, 0, CLIPDB_METRIC_DOT, NULL,
                                hits, &ng, NULL) == CLIPDB_OK);
    for (int i = 0; i < k; i++) CHECK(hits[i].id == ref[i].id);
    clipdb_cvecs_free(c2);
    /* bad ranges and kinds */
    ranges[d + 3] = -1;
    CHECK(clipdb_cvecs_build(&base, CLIPDB_COMPRESS_SQ8, ranges, &c2, &err) == CLIPDB_EINVAL &&
          !c2 && err && strstr(err, "range"));
    clipdb_free(err);
    CHECK(clipdb_cvecs_build(&base, (clipdb_compress)9, NULL, &c2, NULL) == CLIPDB_EINVAL);
    CHECK(clipdb_cvecs_build(&base, CLIPDB_COMPRESS_NONE, NULL, &c2, NULL) == CLIPDB_EINVAL);
    clipdb_compress kind;
    CHECK(clipdb_compress_parse("bf16", &kind) == CLIPDB_OK && kind == CLIPDB_COMPRESS_BF16);
    CHECK(clipdb_compress_parse("int4", &kind) == CLIPDB_EINVAL);
    CHECK(clipdb_compress_parse(NULL, &kind) == CLIPDB_EINVAL);
    /* fp16 beyond its range clamps at +-65504 (re-rank stays exact) */
    x[0] = 1e6f;
    REQUIRE(clipdb_cvecs_build(&base, CLIPDB_COMPRESS_FP16, NULL, &c2, NULL) == CLIPDB_OK);
    REQUIRE(clipdb_cvecs_search(c2, &base, x, 1, k, 0, CLIPDB_METRIC_DOT, NULL, hits, &ng, NULL) ==
            CLIPDB_OK);
    CHECK(hits[0].id == 0);
    clipdb_cvecs_free(c2);
    free(x);
}

/* clipdb_cvecs_build on both sides of CDB_CVECS_BUILD_MT: a set large
** enough to be encoded on the threads has, row for row, the codes and
** norms of small (serial) builds of its windows, including a window across
** the split of two threads; a non-finite value is reported at the first bad
** row even when a later thread finds one too. */
TEST(cvecs_build_threads_give_the_serial_codes)
{
    const int d = 64;
    const size_t n = CDB_CVECS_BUILD_MT / 64 + 1000, w = 200; /* n * d above, w * d below */
    const size_t starts[3] = {0, n / 2 - w / 2, n - w};
    float *x = clustered(n, d, 20, 5);
    char *err = NULL;
    REQUIRE(x && w * d < CDB_CVECS_BUILD_MT && n * d >= CDB_CVECS_BUILD_MT);
    for (int kind = CLIPDB_COMPRESS_SQ8; kind <= CLIPDB_COMPRESS_FP16; kind++) {
        const size_t cs = kind == CLIPDB_COMPRESS_SQ8 ? 1 : 2;
        clipdb_vecs base = {x, NULL, NULL, n, d};
        clipdb_cvecs *c = NULL;
        const float *norms = NULL, *wnorms = NULL;
        REQUIRE(clipdb_cvecs_build(&base, (clipdb_compress)kind, NULL, &c, NULL) == CLIPDB_OK);
        const unsigned char *codes = cdb_cvecs_codes(c, &norms);
        if (kind == CLIPDB_COMPRESS_SQ8) { /* the ranges, as a serial pass finds them */
            const float *r = clipdb_cvecs_ranges(c);
            for (int j = 0; j < d; j++) {
                float lo = x[j], hi = x[j];
                for (size_t i = 1; i < n; i++) {
                    lo = fminf(lo, x[i * d + j]);
                    hi = fmaxf(hi, x[i * d + j]);
                }
                CHECK(r[j] == lo && r[d + j] == (hi - lo) / 255.0f);
            }
        }
        for (int s = 0; s < 3; s++) {
            clipdb_vecs win = {x + starts[s] * d, NULL, NULL, w, d};
            clipdb_cvecs *cw = NULL;
            REQUIRE(clipdb_cvecs_build(&win, (clipdb_compress)kind, clipdb_cvecs_ranges(c), &cw,
                                       NULL) == CLIPDB_OK);
            const unsigned char *wcodes = cdb_cvecs_codes(cw, &wnorms);
            CHECK(!memcmp(codes + starts[s] * d * cs, wcodes, w * d * cs));
            CHECK(!memcmp(norms + starts[s], wnorms, w * sizeof *norms));
            clipdb_cvecs_free(cw);
        }
        clipdb_cvecs_free(c);
        /* bad rows on both sides of the middle: the first one is named */
        x[(n / 2 + 5) * d + 1] = NAN;
        x[(n / 2 - 5) * d + 7] = INFINITY;
        CHECK(clipdb_cvecs_build(&base, (clipdb_compress)kind, NULL, &c, &err) == CLIPDB_EINVAL &&
              !c && err);
        char want[64];
        snprintf(want, sizeof want, "row %zu has a non-finite value", n / 2 - 5);
        CHECK(err && strstr(err, want));
        clipdb_free(err);
        err = NULL;
        x[(n / 2 + 5) * d + 1] = x[(n / 2 + 5) * d];
        x[(n / 2 - 5) * d + 7] = x[(n / 2 - 5) * d];
    }
    free(x);
}

/* ---- the SQ8 interface of earlier releases (clipdb_sq8_*: wrappers) ---- */

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
        double rec;
        REQUIRE(clipdb_flat_search(&base, q, nq, k, metric, NULL, ref, &nr, NULL) == CLIPDB_OK);
        REQUIRE(clipdb_sq8_search(s, &base, q, nq, k, 4 * k, metric, NULL, got, &ng, NULL) ==
                CLIPDB_OK);
        CHECK(ng == k && nr == k);
        if ((rec = recall_exact(ref, got, nq, k)) < 0.999) {
            char msg[96];
            snprintf(msg, sizeof msg, "metric %d: recall@10 %.4f < 0.999", m, rec);
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

/* The batched path (nq >= CDB_CVECS_GEMM_MIN) in chunks of queries and
** tiles of rows (cvecs.c search_batched), at query counts on both sides of
** CDB_CVECS_GEMM_MIN, of a 16-query sq8 padding step and of the 256-query
** chunk, on a set that crosses the 256- and 4096-row tiles with a partial
** last tile: the same hits as one query at a time (exact scores), recall
** against flat search, the same answers on one thread as on all of them,
** ids mapped, a filter, and a stored vector finding itself at L2 distance 0. */
TEST(cvecs_batched_chunks_and_tiles_match_one_query_at_a_time)
{
    static const size_t nqs[] = {15, 16, 17, 31, 255, 256, 257, 513};
    const size_t n = 5000, nq_max = 513;
    const int d = 100, k = 10;
    float *x = clustered(n, d, 50, 5), *q = clustered(nq_max, d, 50, 6);
    int64_t *ids = malloc(n * sizeof *ids), keys[3] = {3, 2500, 4999};
    clipdb_hit *ref = malloc(nq_max * k * sizeof *ref), *one = malloc(nq_max * k * sizeof *one);
    clipdb_hit *got = malloc(nq_max * k * sizeof *got), *ser = malloc(nq_max * k * sizeof *ser);
    clipdb_vecs base = {x, ids, NULL, n, d};
    clipdb_filter f = {0};
    for (size_t i = 0; i < n; i++) ids[i] = 100 + (int64_t)i;
    memcpy(q, x + 7 * (size_t)d, (size_t)d * sizeof *q); /* query 0 is row 7 */
    f.keys = keys;
    f.n_keys = 3;
    for (int kind = CLIPDB_COMPRESS_SQ8; kind <= CLIPDB_COMPRESS_FP16; kind++) {
        clipdb_cvecs *c = NULL;
        REQUIRE(clipdb_cvecs_build(&base, (clipdb_compress)kind, NULL, &c, NULL) == CLIPDB_OK);
        for (size_t a = 0; a < sizeof nqs / sizeof nqs[0]; a++) {
            const size_t nq = nqs[a];
            const clipdb_metric metric = a % 2 ? CLIPDB_METRIC_COSINE : CLIPDB_METRIC_L2;
            int nr = 0, ng = 0, ns = 0, saved;
            char msg[128];
            double rec;
            REQUIRE(clipdb_flat_search(&base, q, nq, k, metric, NULL, ref, &nr, NULL) == CLIPDB_OK);
            for (size_t i = 0; i < nq; i++)
                REQUIRE(clipdb_cvecs_search(c, &base, q + i * d, 1, k, 0, metric, NULL,
                                            one + i * k, &ng, NULL) == CLIPDB_OK);
            REQUIRE(clipdb_cvecs_search(c, &base, q, nq, k, 0, metric, NULL, got, &ng, NULL) ==
                    CLIPDB_OK);
            CHECK(ng == k && nr == k);
            if ((rec = recall_exact(one, got, nq, k)) < 0.999 ||
                recall_exact(ref, got, nq, k) < 0.999) {
                snprintf(msg, sizeof msg, "%s nq %zu: batched vs one at a time %.4f",
                         clipdb_compress_name((clipdb_compress)kind), nq, rec);
                test_fail_at(__FILE__, __LINE__, msg);
            }
            if (metric == CLIPDB_METRIC_L2)
                CHECK(got[0].id == 107 && got[0].score == 0.0f && !signbit(got[0].score));
            /* one thread: the same answers, bit for bit */
            saved = cdb_compute_serial_enter();
            REQUIRE(clipdb_cvecs_search(c, &base, q, nq, k, 0, metric, NULL, ser, &ns, NULL) ==
                    CLIPDB_OK);
            cdb_compute_serial_leave(saved);
            CHECK(ns == ng);
            for (size_t i = 0; i < nq * k; i++)
                CHECK(ser[i].id == got[i].id && ser[i].score == got[i].score);
            /* a filter of three rows: those three, the rest padded */
            REQUIRE(clipdb_cvecs_search(c, &base, q, nq, k, 0, metric, &f, got, &ng, NULL) ==
                    CLIPDB_OK);
            CHECK(ng == 3);
            for (size_t i = 0; i < nq; i++) {
                const clipdb_hit *h = got + i * k;
                for (int r = 0; r < 3; r++) CHECK(h[r].id == 103 || h[r].id == 2600 || h[r].id == 5099);
                CHECK(h[3].id == -1 && h[k - 1].id == -1);
            }
        }
        clipdb_cvecs_free(c);
    }
    free(x), free(q), free(ids), free(ref), free(one), free(got), free(ser);
}
