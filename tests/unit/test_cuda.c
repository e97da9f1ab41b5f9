/*
** test_cuda.c: the CUDA backend (src/cuda) against the CPU path. Device
** parsing and resolution run everywhere; the GPU search tests run when a
** CUDA device is present and skip with a message otherwise (bench/gpu_check.sh
** runs them on a GPU machine). GPU exact search must return the CPU's ids
** (ties aside: a differing id is accepted only where the two scores at that
** rank agree within the tolerance) and the same scores, for every metric,
** filters, k on both sides of the fast-path threshold (16) and query blocks
** on both sides of 1024.
*/
#include "test.h"

#include "cuda/cuda.h"
#include "index/index.h"

static int have_gpu(void)
{
    cdb_err e;
    cdb_err_clear(&e);
    return cdb_cuda_probe(&e) == CLIPDB_OK;
}

TEST(cuda_device_parse)
{
    clipdb_device d;
    clipdb_precision p;
    char *msg = NULL;
    int rc;
    CHECK(clipdb_device_parse("cpu", &d, &p) == CLIPDB_OK && d == CLIPDB_DEVICE_CPU &&
          p == CLIPDB_PRECISION_FP32);
    CHECK(clipdb_device_parse("cuda", &d, &p) == CLIPDB_OK && d == CLIPDB_DEVICE_CUDA);
    CHECK(clipdb_device_parse("auto:bf16", &d, &p) == CLIPDB_OK && d == CLIPDB_DEVICE_AUTO &&
          p == CLIPDB_PRECISION_BF16);
    CHECK(clipdb_device_parse("cuda:fp16", &d, &p) == CLIPDB_OK && p == CLIPDB_PRECISION_FP16);
    CHECK(clipdb_device_parse("gpu", &d, &p) == CLIPDB_EINVAL);
    CHECK(clipdb_device_parse("cuda:", &d, &p) == CLIPDB_EINVAL);
    CHECK(clipdb_device_parse("cuda:int8", &d, &p) == CLIPDB_EINVAL);
    CHECK(clipdb_device_parse("cudax", &d, &p) == CLIPDB_EINVAL);
    CHECK(clipdb_device_parse("", &d, &p) == CLIPDB_EINVAL);
    CHECK(clipdb_device_parse(NULL, &d, &p) == CLIPDB_EINVAL);
    CHECK(!strcmp(clipdb_device_name(CLIPDB_DEVICE_CUDA), "cuda"));
    CHECK(!strcmp(clipdb_device_name((clipdb_device)7), "?"));
    /* fp16 is a type of GPU vectors, not an encoder precision */
    CHECK(!strcmp(clipdb_precision_name(CLIPDB_PRECISION_FP16), "fp16"));
    CHECK(clipdb_precision_parse("fp16", &p) == CLIPDB_EINVAL);
    CHECK(cdb_cuda_dtype_of(CLIPDB_PRECISION_FP32) == CDB_CUDA_F32);
    CHECK(cdb_cuda_dtype_of(CLIPDB_PRECISION_FP16) == CDB_CUDA_F16);
    CHECK(cdb_cuda_dtype_of(CLIPDB_PRECISION_BF16) == CDB_CUDA_BF16);
    CHECK(!strcmp(clipdb_status_name(CLIPDB_ENODEV), "CLIPDB_ENODEV"));

    CHECK(clipdb_device_resolve(CLIPDB_DEVICE_CPU, &d, &msg) == CLIPDB_OK && d == CLIPDB_DEVICE_CPU);
    CHECK(clipdb_device_resolve(CLIPDB_DEVICE_AUTO, &d, &msg) == CLIPDB_OK);
    CHECK(d == (have_gpu() ? CLIPDB_DEVICE_CUDA : CLIPDB_DEVICE_CPU));
    rc = clipdb_device_resolve(CLIPDB_DEVICE_CUDA, &d, &msg);
    if (have_gpu()) {
        CHECK(rc == CLIPDB_OK && d == CLIPDB_DEVICE_CUDA);
    } else {
        CHECK(rc == CLIPDB_ENODEV);
        CHECK(msg && (strstr(msg, "no CUDA device") || strstr(msg, "built without CUDA")));
        clipdb_free(msg);
    }
}

TEST(cuda_without_device_fails_cleanly)
{
    cdb_cuda_flat *f = (cdb_cuda_flat *)1;
    float x[4] = {1, 2, 3, 4};
    clipdb_vecs base = {x, NULL, NULL, 2, 2};
    cdb_err e;
    if (have_gpu()) SKIP("a CUDA device is present (this tests the machine without one)");
    cdb_err_clear(&e);
    CHECK(cdb_cuda_flat_new(&f, &base, CDB_CUDA_F32, &e) == CLIPDB_ENODEV);
    CHECK(f == NULL);
    CHECK(strstr(e.msg, "no CUDA device") || strstr(e.msg, "built without CUDA"));
}

/* Gaussian-ish values from the seeded RNG. */
static void fill(float *x, size_t n, uint64_t seed)
{
    cdb_rng r = {seed};
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(cdb_rng_unif(&r) + cdb_rng_unif(&r) + cdb_rng_unif(&r) - 1.5);
}

/* Compares GPU and CPU results of one search; returns the number of
** positions whose ids differ beyond a tie. */
static int compare(const clipdb_hit *g, const clipdb_hit *c, size_t nq, int k, double tol)
{
    int bad = 0;
    for (size_t i = 0; i < nq * (size_t)k; i++) {
        if (c[i].id < 0 || g[i].id < 0) {
            if (c[i].id != g[i].id) bad++;
            continue;
        }
        double sc = c[i].score, sg = g[i].score;
        if (fabs(sc - sg) > tol * (1.0 + fabs(sc))) bad++;
        else if (g[i].id != c[i].id) {
            /* a tie: the GPU's id must hold the same score on the CPU's list */
            int found = 0;
            size_t q = i / k;
            for (int j = 0; j < k; j++)
                if (c[q * k + j].id == g[i].id) found = 1;
            if (!found && i % k != (size_t)k - 1) bad++;
        }
    }
    return bad;
}

/* One base, every metric, the given ks, nq queries, with and without filters. */
static void check_case(size_t n, int d, size_t nq, const int *ks, int nk, uint64_t seed, int filters)
{
    float *x = cdb_malloc_array(n * (size_t)d, sizeof *x), *q = cdb_malloc_array(nq * (size_t)d, sizeof *q);
    int64_t *ids = cdb_malloc_array(n, sizeof *ids), *keys = cdb_malloc_array(n, sizeof *keys);
    uint64_t *bm = cdb_calloc_array((n + 63) / 64, sizeof *bm);
    clipdb_hit *hg = cdb_malloc_array(nq * 1024, sizeof *hg), *hc = cdb_malloc_array(nq * 1024, sizeof *hc);
    cdb_cuda_flat *f = NULL;
    cdb_err e;
    size_t i, n_keys = 0;
    REQUIRE(x && q && ids && keys && bm && hg && hc);
    fill(x, n * (size_t)d, seed);
    fill(q, nq * (size_t)d, seed + 1);
    for (i = 0; i < n; i++) {
        ids[i] = (int64_t)(3 * i + 5); /* ascending, not the row */
        if (i % 3 != 1) bm[i / 64] |= (uint64_t)1 << (i % 64);
        if (i % 97 == 3) keys[n_keys++] = (int64_t)i;
    }
    clipdb_vecs base = {x, ids, NULL, n, d};
    cdb_err_clear(&e);
    REQUIRE(cdb_cuda_flat_new(&f, &base, CDB_CUDA_F32, &e) == CLIPDB_OK);
    for (int m = 0; m < 3; m++)
        for (int ki = 0; ki < nk; ki++)
            for (int fl = 0; fl < (filters ? 3 : 1); fl++) {
                clipdb_filter flt = {0};
                const clipdb_filter *fp = NULL;
                int k = ks[ki], ng = -1, nc = -2, bad;
                char *msg = NULL;
                if (fl == 1) { flt.bitmap = bm; flt.nbits = n; fp = &flt; }
                if (fl == 2) { flt.keys = keys; flt.n_keys = n_keys; fp = &flt; }
                CHECK(cdb_cuda_flat_search(f, q, nq, k, (clipdb_metric)m, fp, hg, &ng, &e) == CLIPDB_OK);
                CHECK(clipdb_flat_search(&base, q, nq, k, (clipdb_metric)m, fp, hc, &nc, &msg) == CLIPDB_OK);
                clipdb_free(msg);
                CHECK(ng == nc);
                bad = compare(hg, hc, nq, k, 1e-4);
                if (bad) {
                    char w[160];
                    snprintf(w, sizeof w, "n %zu d %d nq %zu k %d metric %d filter %d: %d differing hits",
                             n, d, nq, k, m, fl, bad);
                    test_fail_at(__FILE__, __LINE__, w);
                }
            }
    cdb_cuda_flat_free(f);
    free(x); free(q); free(ids); free(keys); free(bm); free(hg); free(hc);
}

TEST(cuda_flat_matches_cpu)
{
    static const int ks[] = {1, 10, 16, 17, 100, 1024};
    if (!have_gpu()) SKIP("no CUDA device: GPU search not tested here (bench/gpu_check.sh runs it)");
    check_case(1, 1, 1, ks, 2, 11, 0);
    check_case(5, 3, 4, ks, 6, 12, 1);          /* k > n: padding */
    check_case(4097, 17, 7, ks, 6, 13, 1);      /* a tile and one row */
    check_case(40000, 64, 1500, ks, 4, 14, 1);  /* two query blocks, several tiles */
    check_case(70001, 512, 33, ks, 6, 15, 0);
}

TEST(cuda_flat_1m_matches_cpu)
{
    static const int ks[] = {10, 100};
    if (!have_gpu()) SKIP("no CUDA device: 1M-vector GPU search not tested here");
    check_case(1000000, 512, 64, ks, 2, 21, 0);
}

TEST(cuda_flat_half_precision_recall)
{
    const size_t n = 50000, nq = 50;
    const int d = 128, k = 10;
    float *x, *q;
    clipdb_hit *hg, *hc;
    int dt, ng, nc;
    if (!have_gpu()) SKIP("no CUDA device");
    x = cdb_malloc_array(n * d, sizeof *x);
    q = cdb_malloc_array(nq * d, sizeof *q);
    hg = cdb_malloc_array(nq * k, sizeof *hg);
    hc = cdb_malloc_array(nq * k, sizeof *hc);
    REQUIRE(x && q && hg && hc);
    fill(x, n * d, 31);
    fill(q, nq * d, 32);
    clipdb_vecs base = {x, NULL, NULL, n, d};
    CHECK(clipdb_flat_search(&base, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hc, &nc, NULL) == CLIPDB_OK);
    for (dt = CDB_CUDA_F16; dt <= CDB_CUDA_BF16; dt++) {
        cdb_cuda_flat *f = NULL;
        cdb_err e;
        size_t hit = 0;
        cdb_err_clear(&e);
        REQUIRE(cdb_cuda_flat_new(&f, &base, (cdb_cuda_dtype)dt, &e) == CLIPDB_OK);
        CHECK(cdb_cuda_flat_search(f, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e) == CLIPDB_OK);
        for (size_t i = 0; i < nq; i++)
            for (int a = 0; a < k; a++)
                for (int b = 0; b < k; b++) hit += hg[i * k + a].id == hc[i * k + b].id;
        CHECK(hit >= nq * k * 8 / 10); /* recall@10 >= 0.8 in 16 bits */
        cdb_cuda_flat_free(f);
    }
    free(x); free(q); free(hg); free(hc);
}

TEST(cuda_flat_errors)
{
    float x[8] = {1, 0, 0, 1, 1, 1, 2, 2}, qv[2] = {1, 0};
    clipdb_vecs base = {x, NULL, NULL, 4, 2};
    clipdb_hit h[1100];
    cdb_cuda_flat *f = NULL;
    cdb_err e;
    int n;
    if (!have_gpu()) SKIP("no CUDA device");
    cdb_err_clear(&e);
    REQUIRE(cdb_cuda_flat_new(&f, &base, CDB_CUDA_F32, &e) == CLIPDB_OK);
    CHECK(cdb_cuda_flat_search(f, qv, 1, CDB_CUDA_MAX_K + 1, CLIPDB_METRIC_DOT, NULL, h, &n, &e) == CLIPDB_ELIMIT);
    CHECK(cdb_cuda_flat_search(f, qv, 1, 0, CLIPDB_METRIC_DOT, NULL, h, &n, &e) == CLIPDB_EINVAL);
    CHECK(cdb_cuda_flat_search(f, qv, 1, 2, (clipdb_metric)9, NULL, h, &n, &e) == CLIPDB_EINVAL);
    CHECK(cdb_cuda_flat_search(f, qv, 1, 3, CLIPDB_METRIC_L2, NULL, h, &n, &e) == CLIPDB_OK);
    CHECK(n == 3 && h[0].id == 0 && h[0].score == 0.0f);
    cdb_cuda_flat_free(f);
}
