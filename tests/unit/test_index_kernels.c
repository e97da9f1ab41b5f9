/* Unit tests of src/index/kernels.c: scores of every metric through the
** sgemv and blocked sgemm paths, at dimensions 1, 15, 16, 17, 512, 768 and
** at sizes on both sides of every block threshold, against a scalar
** double-precision reference; top-k with ties; filters. */
#include <stdlib.h>

#include "index/index.h"
#include "test.h"

static void fill_rand(float *x, size_t n, uint64_t seed, int integer)
{
    cdb_rng r = {seed};
    size_t i;
    for (i = 0; i < n; i++)
        x[i] = integer ? (float)((int)cdb_rng_below(&r, 5) - 2) : (float)(2.0 * cdb_rng_unif(&r) - 1.0);
}

typedef struct ref_hit {
    double score;
    int64_t id;
} ref_hit;

static int cmp_ref(const void *a, const void *b)
{
    const ref_hit *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static double ref_score(clipdb_metric m, const float *q, const float *b, int d)
{
    double dot = 0, qq = 0, bb = 0, l2 = 0;
    int j;
    for (j = 0; j < d; j++) {
        dot += (double)q[j] * b[j];
        qq += (double)q[j] * q[j];
        bb += (double)b[j] * b[j];
        l2 += ((double)q[j] - b[j]) * ((double)q[j] - b[j]);
    }
    if (m == CLIPDB_METRIC_DOT) return dot;
    if (m == CLIPDB_METRIC_COSINE) return qq > 0 && bb > 0 ? dot / sqrt(qq * bb) : 0;
    return -sqrt(l2);
}

/* Runs cdb_flat_search and checks every query against the reference:
** count, each hit's score vs its reference score, rank-by-rank scores vs the
** fully sorted reference, distinct allowed ids. Returns the failures. */
static int check_flat(const cdb_kparams *p, const float *base, const int64_t *ids, const float *norms,
                      size_t n, int d, const float *q, size_t nq, int k, clipdb_metric m,
                      const clipdb_filter *f)
{
    clipdb_vecs bv = {base, ids, norms, n, d};
    clipdb_hit *out = malloc(nq * (size_t)k * sizeof *out);
    ref_hit *ref = malloc((n ? n : 1) * sizeof *ref);
    double *by_row = malloc((n ? n : 1) * sizeof *by_row);
    int n_out = -1, fails = 0, r;
    size_t i, j, na;
    cdb_err e;
    cdb_err_clear(&e);
    if (cdb_flat_search(p, &bv, q, nq, k, m, f, out, &n_out, &e) != CLIPDB_OK) {
        fprintf(stderr, "    flat search failed: %s\n", e.msg);
        fails++;
        goto done;
    }
    for (i = 0; i < nq && fails < 5; i++) {
        /* large batches: check the queries at both ends of every block and a
        ** stride in between (the reference costs n log n per query) */
        if (nq > 64 && i > 8 && i + 8 < nq && i % 61 != 0 && (i + 2) % 1024 > 4) continue;
        na = 0;
        for (j = 0; j < n; j++) {
            by_row[j] = ref_score(m, q + i * (size_t)d, base + j * (size_t)d, d);
            if (!cdb_filter_allows(f, (int64_t)j)) continue;
            ref[na].score = by_row[j];
            ref[na].id = (int64_t)j;
            na++;
        }
        qsort(ref, na, sizeof *ref, cmp_ref);
        if (n_out != (int)(na < (size_t)k ? na : (size_t)k)) {
            fprintf(stderr, "    n %zu d %d nq %zu k %d metric %d: n_out %d, want %zu\n", n, d, nq, k, m,
                    n_out, na < (size_t)k ? na : (size_t)k);
            fails++;
            break;
        }
        for (r = 0; r < k; r++) {
            clipdb_hit h = out[i * (size_t)k + r];
            if (r >= n_out) {
                if (h.id != -1) fails++;
                continue;
            }
            {
                /* the row of this id (ids are row + 1000 when given) */
                int64_t row = ids ? h.id - 1000 : h.id;
                double tol = 2e-4 * (1 + fabs(ref[r].score));
                if (row < 0 || (size_t)row >= n || !cdb_filter_allows(f, row) ||
                    fabs(by_row[row] - h.score) > tol || fabs(ref[r].score - h.score) > tol ||
                    (r > 0 && !cdb_hit_better(out[i * k + r - 1].score, out[i * k + r - 1].id, h.score, h.id))) {
                    fprintf(stderr,
                            "    n %zu d %d nq %zu k %d metric %d q %zu rank %d: id %lld score %.7g, ref %.7g "
                            "(id %lld)\n",
                            n, d, nq, k, m, i, r, (long long)h.id, h.score, ref[r].score, (long long)ref[r].id);
                    fails++;
                    break;
                }
            }
        }
    }
done:
    free(out);
    free(ref);
    free(by_row);
    return fails;
}

static const clipdb_metric metrics[3] = {CLIPDB_METRIC_COSINE, CLIPDB_METRIC_DOT, CLIPDB_METRIC_L2};

TEST(index_metric_parse_and_name)
{
    clipdb_metric m;
    CHECK(clipdb_metric_parse("cosine", &m) == CLIPDB_OK && m == CLIPDB_METRIC_COSINE);
    CHECK(clipdb_metric_parse("dot", &m) == CLIPDB_OK && m == CLIPDB_METRIC_DOT);
    CHECK(clipdb_metric_parse("l2", &m) == CLIPDB_OK && m == CLIPDB_METRIC_L2);
    CHECK(clipdb_metric_parse("L1", &m) == CLIPDB_EINVAL);
    CHECK(clipdb_metric_parse(NULL, &m) == CLIPDB_EINVAL);
    CHECK(!strcmp(clipdb_metric_name(CLIPDB_METRIC_L2), "l2"));
    CHECK(!strcmp(clipdb_metric_name((clipdb_metric)9), "?"));
}

/* Small blocks (4 queries x 16 rows) so that every threshold is crossed
** cheaply: base sizes 15/16/17/33 around the row block, 1 query (sgemv), 2
** (sgemm), 4/5/9 around the query block; threaded top-k forced on. Three
** kernel paths: the defaults (these blocks are under direct_max: inline dot
** kernel), BLAS only (small_max = direct_max = 0: sgemv / sgemm), and the
** inline kernel for every block. */
TEST(index_kernels_all_dims_small_blocks)
{
    static const int dims[] = {1, 15, 16, 17, 512, 768};
    static const size_t ns[] = {1, 15, 16, 17, 33};
    static const size_t nqs[] = {1, 2, 4, 5, 9};
    cdb_kparams p;
    size_t a, b, c;
    int mi, fails = 0, path;
    for (path = 0; path < 3; path++) {
    cdb_kparams_default(&p);
    p.q_block = 4;
    p.b_block = 16;
    p.threads = 2;
    p.thread_min = 1;
    if (path == 1) p.small_max = p.direct_max = 0;         /* BLAS always */
    if (path == 2) p.small_max = p.direct_max = SIZE_MAX;  /* inline always */
    for (a = 0; a < sizeof dims / sizeof *dims; a++) {
        int d = dims[a];
        float *base = malloc(33 * (size_t)d * sizeof *base), *q = malloc(9 * (size_t)d * sizeof *q);
        int64_t ids[33];
        float norms[33];
        for (c = 0; c < 33; c++) ids[c] = (int64_t)c + 1000;
        fill_rand(base, 33 * (size_t)d, 1 + (uint64_t)d, 0);
        fill_rand(q, 9 * (size_t)d, 2 + (uint64_t)d, 0);
        clipdb_vec_norms(base, 33, d, norms);
        for (b = 0; b < sizeof ns / sizeof *ns; b++)
            for (c = 0; c < sizeof nqs / sizeof *nqs; c++)
                for (mi = 0; mi < 3; mi++) {
                    fails += check_flat(&p, base, NULL, NULL, ns[b], d, q, nqs[c], 5, metrics[mi], NULL);
                    fails += check_flat(&p, base, ids, norms, ns[b], d, q, nqs[c], 3, metrics[mi], NULL);
                }
        free(base);
        free(q);
    }
    }
    CHECK(fails == 0);
}

/* One query: the inline dot kernel up to small_max = 1 << 18 floats, sgemv
** above: 511, 512, 513 rows of 512 around it, and 8192 x 33 (270,336). */
TEST(index_kernels_gemv_dispatch_threshold)
{
    static const size_t ns[] = {511, 512, 513};
    cdb_kparams p;
    float *base = malloc(8192 * 33 * sizeof *base), *q = malloc(512 * sizeof *q);
    size_t a;
    int mi, fails = 0;
    cdb_kparams_default(&p);
    REQUIRE(p.small_max == 512 * 512);
    fill_rand(base, 8192 * 33, 31, 0);
    fill_rand(q, 512, 32, 0);
    for (a = 0; a < 3; a++)
        for (mi = 0; mi < 3; mi++) fails += check_flat(&p, base, NULL, NULL, ns[a], 512, q, 1, 10, metrics[mi], NULL);
    for (mi = 0; mi < 3; mi++) {
        fails += check_flat(&p, base, NULL, NULL, 7944, 33, q, 1, 10, metrics[mi], NULL);  /* 262,152 */
        fails += check_flat(&p, base, NULL, NULL, 8192, 33, q, 1, 10, metrics[mi], NULL);
    }
    CHECK(fails == 0);
    free(base);
    free(q);
}

/* Several queries: the inline dot kernel up to direct_max = 1 << 16
** multiply-adds per block (m * rows * d), sgemm above: 4 queries x 255, 256,
** 257 rows of d 64 around it (small IVF lists at small d), and 2 queries x
** 8192 rows of d 4 (65,536) / d 5 above it. */
TEST(index_kernels_direct_dispatch_threshold)
{
    static const size_t ns[] = {255, 256, 257};
    cdb_kparams p;
    float *base = malloc(8192 * 64 * sizeof *base), *q = malloc(4 * 64 * sizeof *q);
    size_t a;
    int mi, fails = 0;
    cdb_kparams_default(&p);
    REQUIRE(p.direct_max == 4 * 256 * 64 && p.q_block >= 4 && p.b_block >= 8192);
    fill_rand(base, 8192 * 64, 41, 0);
    fill_rand(q, 4 * 64, 42, 0);
    for (a = 0; a < 3; a++)
        for (mi = 0; mi < 3; mi++) fails += check_flat(&p, base, NULL, NULL, ns[a], 64, q, 4, 10, metrics[mi], NULL);
    for (mi = 0; mi < 3; mi++) {
        fails += check_flat(&p, base, NULL, NULL, 8192, 4, q, 2, 10, metrics[mi], NULL);
        fails += check_flat(&p, base, NULL, NULL, 8192, 5, q, 2, 10, metrics[mi], NULL);
    }
    CHECK(fails == 0);
    free(base);
    free(q);
}

/* The default blocks: 8191/8192/8193 base rows around the 8192-row block;
** 1 query (sgemv), 2 and 1025 queries (around the 1024-query block). */
TEST(index_kernels_default_block_thresholds)
{
    const int d = 16;
    const size_t nmax = 8193;
    static const size_t ns[] = {8191, 8192, 8193};
    static const size_t nqs[] = {1, 2, 1025};
    cdb_kparams p;
    float *base = malloc(nmax * d * sizeof *base), *q = malloc(1025 * d * sizeof *q);
    size_t a, b;
    int mi, fails = 0;
    cdb_kparams_default(&p);
    fill_rand(base, nmax * d, 11, 0);
    fill_rand(q, 1025 * d, 12, 0);
    for (a = 0; a < 3; a++)
        for (b = 0; b < 3; b++)
            for (mi = 0; mi < 3; mi++)
                fails += check_flat(&p, base, NULL, NULL, ns[a], d, q, nqs[b], 10, metrics[mi], NULL);
    CHECK(fails == 0);
    free(base);
    free(q);
}

/* Integer vectors make every dot product exact, and rows repeat (row i equals
** row i % 7), so there are exact ties: the order must be the full sort by
** (score desc, id asc) at k = 1, 10, n-1, n, n+5. */
TEST(index_topk_matches_full_sort_with_ties)
{
    const size_t n = 50;
    const int d = 17;
    float base[50 * 17], q[3 * 17];
    static const int ks[] = {1, 10, 49, 50, 55};
    cdb_kparams p;
    size_t i, j, a;
    int path;
    fill_rand(base, 7 * d, 5, 1);
    for (i = 7; i < n; i++) memcpy(base + i * d, base + (i % 7) * d, d * sizeof *base);
    fill_rand(q, 3 * d, 6, 1);
    for (path = 0; path < 2; path++) {
        cdb_kparams_default(&p);
        if (path) { /* small blocks, threaded */
            p.q_block = 2;
            p.b_block = 16;
            p.threads = 2;
            p.thread_min = 1;
        }
        for (a = 0; a < 5; a++) {
            int k = ks[a], n_out = 0, r;
            clipdb_vecs bv = {base, NULL, NULL, n, d};
            clipdb_hit *out = malloc(3 * (size_t)k * sizeof *out);
            cdb_err e;
            REQUIRE(cdb_flat_search(&p, &bv, q, 3, k, CLIPDB_METRIC_DOT, NULL, out, &n_out, &e) == CLIPDB_OK);
            CHECK(n_out == (k < (int)n ? k : (int)n));
            for (i = 0; i < 3; i++) {
                ref_hit ref[50];
                for (j = 0; j < n; j++) {
                    ref[j].score = ref_score(CLIPDB_METRIC_DOT, q + i * d, base + j * d, d);
                    ref[j].id = (int64_t)j;
                }
                qsort(ref, n, sizeof *ref, cmp_ref);
                for (r = 0; r < k; r++) {
                    if (r < n_out) {
                        CHECK(out[i * k + r].id == ref[r].id);
                        CHECK(out[i * k + r].score == (float)ref[r].score);
                    } else {
                        CHECK(out[i * k + r].id == -1 && isinf(out[i * k + r].score));
                    }
                }
            }
            free(out);
        }
    }
}

TEST(index_filters)
{
    const size_t n = 300;
    const int d = 15;
    float *base = malloc(n * d * sizeof *base), q[4 * 15];
    uint64_t bits[5] = {0}, zero[5] = {0};
    int64_t sparse[20], dense[200], one[1] = {123}, dup[6] = {-5, 3, 3, 77, 77, 999};
    cdb_kparams p;
    size_t i;
    int mi, fails = 0, n_out = -1;
    clipdb_hit out[4 * 10];
    clipdb_vecs bv = {NULL, NULL, NULL, n, d};
    clipdb_filter f;
    cdb_err e;
    fill_rand(base, n * d, 21, 0);
    fill_rand(q, 4 * d, 22, 0);
    bv.data = base;
    for (i = 0; i < 20; i++) sparse[i] = (int64_t)(i * 13 + 1);    /* gathered path */
    for (i = 0; i < 200; i++) dense[i] = (int64_t)(i + i / 2);     /* scan + lookup */
    for (i = 0; i < n; i += 3) bits[i / 64] |= 1ull << (i % 64);
    for (mi = 0; mi < 3; mi++) {
        int pass;
        for (pass = 0; pass < 2; pass++) {
            cdb_kparams_default(&p);
            if (pass) {
                p.q_block = 3;
                p.b_block = 7;
            }
            f = (clipdb_filter){NULL, 0, sparse, 20};
            fails += check_flat(&p, base, NULL, NULL, n, d, q, 4, 10, metrics[mi], &f);
            f = (clipdb_filter){NULL, 0, dense, 200};
            fails += check_flat(&p, base, NULL, NULL, n, d, q, 4, 10, metrics[mi], &f);
            f = (clipdb_filter){bits, n, NULL, 0};
            fails += check_flat(&p, base, NULL, NULL, n, d, q, 4, 10, metrics[mi], &f);
            f = (clipdb_filter){NULL, 0, one, 1}; /* one row, fewer than k */
            fails += check_flat(&p, base, NULL, NULL, n, d, q, 4, 10, metrics[mi], &f);
            f = (clipdb_filter){NULL, 0, dup, 6}; /* duplicates and out-of-range keys */
            fails += check_flat(&p, base, NULL, NULL, n, d, q, 4, 10, metrics[mi], &f);
        }
    }
    CHECK(fails == 0);
    /* a filter of one row returns exactly that row */
    f = (clipdb_filter){NULL, 0, one, 1};
    REQUIRE(clipdb_flat_search(&bv, q, 1, 10, CLIPDB_METRIC_L2, &f, out, &n_out, NULL) == CLIPDB_OK);
    CHECK(n_out == 1 && out[0].id == 123 && out[1].id == -1);
    /* empty filters: 0 results, every slot empty */
    f = (clipdb_filter){NULL, 0, NULL, 0};
    REQUIRE(clipdb_flat_search(&bv, q, 4, 10, CLIPDB_METRIC_COSINE, &f, out, &n_out, NULL) == CLIPDB_OK);
    CHECK(n_out == 0);
    for (i = 0; i < 40; i++) CHECK(out[i].id == -1);
    f = (clipdb_filter){zero, n, NULL, 0};
    REQUIRE(clipdb_flat_search(&bv, q, 4, 10, CLIPDB_METRIC_DOT, &f, out, &n_out, NULL) == CLIPDB_OK);
    CHECK(n_out == 0 && out[0].id == -1);
    /* unsorted keys are a caller error */
    {
        int64_t bad[3] = {5, 2, 9};
        char *msg = NULL;
        f = (clipdb_filter){NULL, 0, bad, 3};
        CHECK(clipdb_flat_search(&bv, q, 1, 10, CLIPDB_METRIC_DOT, &f, out, &n_out, &msg) == CLIPDB_EINVAL);
        CHECK(msg && strstr(msg, "sorted"));
        clipdb_free(msg);
    }
    cdb_err_clear(&e);
    free(base);
}

TEST(index_flat_rejects_bad_arguments)
{
    float x[4] = {1, 2, 3, 4};
    clipdb_hit out[4];
    int n_out;
    char *msg = NULL;
    clipdb_vecs bv = {x, NULL, NULL, 2, 2};
    CHECK(clipdb_flat_search(&bv, x, 1, 0, CLIPDB_METRIC_DOT, NULL, out, &n_out, &msg) == CLIPDB_EINVAL);
    CHECK(msg && strstr(msg, "k = 0"));
    clipdb_free(msg);
    msg = NULL;
    bv.d = 0;
    CHECK(clipdb_flat_search(&bv, x, 1, 1, CLIPDB_METRIC_DOT, NULL, out, &n_out, &msg) == CLIPDB_EINVAL);
    clipdb_free(msg);
    bv.d = 2;
    CHECK(clipdb_flat_search(&bv, x, 1, 1, (clipdb_metric)7, NULL, out, &n_out, NULL) == CLIPDB_EINVAL);
    bv.n = SIZE_MAX / 2; /* n * d overflows */
    CHECK(clipdb_flat_search(&bv, x, 1, 1, CLIPDB_METRIC_DOT, NULL, out, &n_out, NULL) == CLIPDB_EINVAL);
    /* an empty base gives 0 results */
    bv.n = 0;
    CHECK(clipdb_flat_search(&bv, x, 1, 2, CLIPDB_METRIC_L2, NULL, out, &n_out, NULL) == CLIPDB_OK);
    CHECK(n_out == 0 && out[0].id == -1 && out[1].id == -1);
    /* a zero vector scores cosine 0, never NaN */
    {
        float z[4] = {0, 0, 1, 0};
        clipdb_vecs zb = {z, NULL, NULL, 2, 2};
        CHECK(clipdb_flat_search(&zb, x, 1, 2, CLIPDB_METRIC_COSINE, NULL, out, &n_out, NULL) == CLIPDB_OK);
        CHECK(n_out == 2 && out[0].id == 1 && out[1].id == 0 && out[1].score == 0.0f);
    }
}

/* The top-k pass on the core pool gives exactly the results of the serial
** pass: every metric, many queries (tasks) over several base blocks, with
** a filter. */
TEST(index_kernels_pool_matches_serial)
{
    const int d = 24, k = 7;
    const size_t n = 700, nq = 37;
    float *base = malloc(n * d * sizeof *base), *q = malloc(nq * d * sizeof *q);
    clipdb_hit *a = malloc(nq * k * sizeof *a), *b = malloc(nq * k * sizeof *b);
    uint64_t bits[(700 + 63) / 64];
    clipdb_filter f;
    int mi, threads;
    size_t i;
    REQUIRE(base && q && a && b);
    fill_rand(base, n * d, 11, 0);
    fill_rand(q, nq * d, 12, 0);
    for (i = 0; i < sizeof bits / sizeof *bits; i++) bits[i] = 0x5555555555555555ull ^ i;
    memset(&f, 0, sizeof f);
    f.bitmap = bits;
    f.nbits = n;
    CHECK(cdb_pool_threads() >= 1);
    for (mi = 0; mi < 3; mi++)
        for (threads = 2; threads <= 9; threads += 7) {
            clipdb_vecs bv = {base, NULL, NULL, n, d};
            cdb_kparams ps, pp;
            int na = 0, nb = 0;
            cdb_err e;
            cdb_kparams_default(&ps);
            ps.b_block = 128;
            ps.q_block = 16;
            ps.threads = 1;
            pp = ps;
            pp.threads = threads;
            pp.thread_min = 1;
            REQUIRE(cdb_flat_search(&ps, &bv, q, nq, k, metrics[mi], &f, a, &na, &e) == CLIPDB_OK);
            REQUIRE(cdb_flat_search(&pp, &bv, q, nq, k, metrics[mi], &f, b, &nb, &e) == CLIPDB_OK);
            CHECK(na == nb);
            for (i = 0; i < nq * (size_t)k; i++) {
                CHECK(a[i].id == b[i].id);
                CHECK(a[i].score == b[i].score);
            }
        }
    free(base);
    free(q);
    free(a);
    free(b);
}

/* L2 scores of the returned hits are computed directly, not by the norm
** expansion |q|^2 - 2 q.b + |b|^2 (which loses small distances: a CLIP-sized
** vector against itself scored -0.0078): a stored vector searched against
** itself scores exactly 0 (+0), and every returned score equals the distance
** computed in double. Both the one-query (sgemv/inline) and batched (GEMM)
** paths, with and without a filter. */
TEST(index_l2_returned_distances_are_exact)
{
    const int d = 512, k = 10;
    const size_t n = 3000, nq = 40;
    float *x = malloc(n * d * sizeof *x), *q = malloc(nq * d * sizeof *q);
    clipdb_hit *hits = malloc(nq * k * sizeof *hits);
    uint64_t s = 12345;
    int n_out = 0;
    size_t i, j;
    REQUIRE(x && q && hits);
    for (i = 0; i < n * d; i++) { /* CLIP-like: norm ~ 10, a large common offset */
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = 0.4f + (float)((s >> 40) / (double)(1ull << 24)) * 0.2f;
    }
    for (i = 0; i < nq; i++) memcpy(q + i * d, x + (i * 71 % n) * d, d * sizeof *q);
    for (int batch = 0; batch < 2; batch++) {
        clipdb_vecs base = {x, NULL, NULL, n, d};
        size_t m = batch ? nq : 1;
        REQUIRE(clipdb_flat_search(&base, q, m, k, CLIPDB_METRIC_L2, NULL, hits, &n_out, NULL) ==
                CLIPDB_OK);
        REQUIRE(n_out == k);
        for (i = 0; i < m; i++) {
            const clipdb_hit *h = hits + i * k;
            CHECK(h[0].id == (int64_t)(i * 71 % n));
            CHECK(h[0].score == 0.0f && !signbit(h[0].score));
            for (j = 0; j < (size_t)k; j++) {
                double dd = 0;
                for (int c = 0; c < d; c++) {
                    double t = (double)q[i * d + c] - x[(size_t)h[j].id * d + c];
                    dd += t * t;
                }
                CHECK_NEAR(h[j].score, -sqrt(dd), 1e-6 * (1 + sqrt(dd)));
                if (j) CHECK(h[j].score <= h[j - 1].score);
            }
        }
    }
    free(x), free(q), free(hits);
}
