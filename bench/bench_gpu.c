/*
** bench_gpu.c: the GPU backend beside the CPU path of the same library, on
** the same machine, in one run (bench/README.md "GPU"; bench/gpu_check.sh).
**
**   bench_gpu search N D NQ K   exact search over N x D seeded vectors
**       (uniform sums, cosine): single-query latency (median of 50 on the GPU,
**       of 10 on the CPU, after warm-up) and NQ queries in one call (GPU:
**       median of 3 after a warm-up; CPU: one call), fp32, then fp16/bf16
**       GPU batches. Check: the GPU fp32 batch returns the CPU's ids (ties
**       aside) for every query; exit 1 otherwise.
**   bench_gpu encode MODEL_DIR N   the vision tower alone on N seeded random
**       preprocessed images: images/s on the GPU (fp32, bf16; median of 3
**       after a warm-up) and on the CPU (one call on min(N, 64) images), and
**       the cosine of the GPU embeddings to the CPU fp32 ones (exit 1 below
**       0.9999 fp32 / 0.999 bf16). Decode is measured by `clipdb add`
**       (gpu_check.sh); this isolates the encoder.
** Prints the CPU model, the ISA the build targets and the GPU model.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clipdb.h"
#include "compute/compute.h"
#include "cuda/cuda.h"
#include "index/index.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void print_machine(void)
{
    char line[512], gpu[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    const char *isa =
#if defined(__AVX512F__)
        "x86-64 AVX-512";
#elif defined(__AVX2__)
        "x86-64 AVX2";
#elif defined(__aarch64__)
        "aarch64";
#else
        "generic";
#endif
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            printf("cpu: %s", strchr(line, ':') ? strchr(line, ':') + 2 : line);
            break;
        }
    if (f) fclose(f);
    cdb_cuda_device_name(gpu, sizeof gpu);
    printf("isa (build): %s; CPU threads (OpenBLAS): %d\n", isa, cdb_compute_threads());
    printf("gpu: %s\n", gpu[0] ? gpu : "none");
}

static void fill(float *x, size_t n, uint64_t seed)
{
    cdb_rng r = {seed};
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(cdb_rng_unif(&r) + cdb_rng_unif(&r) + cdb_rng_unif(&r) - 1.5);
}

/* Queries whose GPU list differs from the CPU's beyond ties. */
static size_t mismatches(const clipdb_hit *g, const clipdb_hit *c, size_t nq, int k)
{
    size_t bad = 0;
    for (size_t q = 0; q < nq; q++) {
        int ok = 1;
        for (int j = 0; j < k; j++) {
            const clipdb_hit *a = &g[q * k + j], *b = &c[q * k + j];
            if (fabs(a->score - b->score) > 1e-4 * (1 + fabs(b->score))) ok = 0;
            else if (a->id != b->id) { /* equal scores: a tie, if the id is on the CPU's list */
                int found = j == k - 1;
                for (int t = 0; t < k; t++) found |= c[q * k + t].id == a->id;
                if (!found) ok = 0;
            }
        }
        bad += !ok;
    }
    return bad;
}

static int bench_search(size_t n, int d, size_t nq, int k)
{
    float *x = cdb_malloc_array(n * (size_t)d, sizeof *x);
    float *q = cdb_malloc_array(nq * (size_t)d, sizeof *q);
    clipdb_hit *hg = cdb_malloc_array(nq * (size_t)k, sizeof *hg);
    clipdb_hit *hc = cdb_malloc_array(nq * (size_t)k, sizeof *hc);
    clipdb_vecs base = {x, NULL, NULL, n, d};
    double t[64], gpu_lat, cpu_lat, gpu_b, cpu_b, t0, up;
    int ng, nc, i, rc = 0;
    size_t bad;
    cdb_err e;
    cdb_cuda_flat *f = NULL;
    if (!x || !q || !hg || !hc) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    fill(x, n * (size_t)d, 1);
    fill(q, nq * (size_t)d, 2);
    cdb_err_clear(&e);
    t0 = now_s();
    if (cdb_cuda_flat_new(&f, &base, CDB_CUDA_F32, &e)) {
        fprintf(stderr, "GPU: %s\n", e.msg);
        return 1;
    }
    up = now_s() - t0;
    printf("exact search, %zu x %d, cosine, k %d (upload fp32 + norms: %.2f s, %.2f GB resident)\n",
           n, d, k, up, (double)cdb_cuda_flat_bytes(f) / 1e9);
    /* single query */
    for (i = 0; i < 5; i++) cdb_cuda_flat_search(f, q + (size_t)i * d, 1, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e);
    for (i = 0; i < 50; i++) {
        t0 = now_s();
        cdb_cuda_flat_search(f, q + (size_t)i * d, 1, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e);
        t[i] = now_s() - t0;
    }
    gpu_lat = median(t, 50);
    clipdb_flat_search(&base, q, 1, k, CLIPDB_METRIC_COSINE, NULL, hc, &nc, NULL);
    for (i = 0; i < 10; i++) {
        t0 = now_s();
        clipdb_flat_search(&base, q + (size_t)i * d, 1, k, CLIPDB_METRIC_COSINE, NULL, hc, &nc, NULL);
        t[i] = now_s() - t0;
    }
    cpu_lat = median(t, 10);
    printf("  single query latency: GPU %.3f ms, CPU %.3f ms  (%.1fx)\n", gpu_lat * 1e3,
           cpu_lat * 1e3, cpu_lat / gpu_lat);
    /* batch */
    if (cdb_cuda_flat_search(f, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e)) {
        fprintf(stderr, "GPU: %s\n", e.msg);
        return 1;
    }
    for (i = 0; i < 3; i++) {
        t0 = now_s();
        cdb_cuda_flat_search(f, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e);
        t[i] = now_s() - t0;
    }
    gpu_b = median(t, 3);
    t0 = now_s();
    clipdb_flat_search(&base, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hc, &nc, NULL);
    cpu_b = now_s() - t0;
    printf("  %zu queries in one call: GPU %.0f q/s (%.3f s), CPU %.0f q/s (%.3f s)  (%.1fx)\n", nq,
           nq / gpu_b, gpu_b, nq / cpu_b, cpu_b, cpu_b / gpu_b);
    bad = mismatches(hg, hc, nq, k);
    printf("  check: GPU fp32 ids = CPU ids (ties aside) for %zu of %zu queries: %s\n", nq - bad, nq,
           bad ? "FAIL" : "ok");
    if (bad) rc = 1;
    cdb_cuda_flat_free(f);
    for (int dt = CDB_CUDA_F16; dt <= CDB_CUDA_BF16; dt++) {
        size_t hit = 0;
        f = NULL;
        if (cdb_cuda_flat_new(&f, &base, (cdb_cuda_dtype)dt, &e)) {
            fprintf(stderr, "GPU: %s\n", e.msg);
            return 1;
        }
        cdb_cuda_flat_search(f, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e);
        for (i = 0; i < 3; i++) {
            t0 = now_s();
            cdb_cuda_flat_search(f, q, nq, k, CLIPDB_METRIC_COSINE, NULL, hg, &ng, &e);
            t[i] = now_s() - t0;
        }
        for (size_t a = 0; a < nq; a++)
            for (int b = 0; b < k; b++)
                for (int c = 0; c < k; c++) hit += hg[a * k + b].id == hc[a * k + c].id;
        printf("  %s vectors: GPU %.0f q/s (%.1fx CPU fp32), recall@%d vs fp32 exact %.4f\n",
               cdb_cuda_dtype_name((cdb_cuda_dtype)dt), nq / median(t, 3), cpu_b / median(t, 3), k,
               (double)hit / (double)(nq * k));
        cdb_cuda_flat_free(f);
    }
    free(x);
    free(q);
    free(hg);
    free(hc);
    return rc;
}

static int bench_encode(const char *dir, int n)
{
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    size_t px;
    float *pix, *ref, *got;
    int dim, n_cpu = n < 64 ? n : 64, rc = 0, i, p;
    double t[3], t0, cpu_s;
    clipdb_model_info info;
    if (clipdb_model_open(&m, dir) || clipdb_ctx_new(&c, m)) {
        fprintf(stderr, "model %s: cannot open\n", dir);
        return 1;
    }
    clipdb_model_get_info(m, &info);
    dim = info.embed_dim;
    px = clipdb_image_floats(m);
    pix = cdb_malloc_array((size_t)n * px, sizeof *pix);
    ref = cdb_malloc_array((size_t)n_cpu * dim, sizeof *ref);
    got = cdb_malloc_array((size_t)n * dim, sizeof *got);
    if (!pix || !ref || !got) return 1;
    fill(pix, (size_t)n * px, 7);
    t0 = now_s();
    clipdb_encode_images(c, pix, n_cpu, ref);
    cpu_s = now_s() - t0;
    printf("vision tower, %d preprocessed images (decode excluded)\n", n);
    printf("  CPU fp32: %.1f images/s (%d images)\n", n_cpu / cpu_s, n_cpu);
    for (p = 0; p < 2; p++) {
        /* the GPU encoders run in the model's precision: bf16 opens it so */
        clipdb_precision prec = p ? CLIPDB_PRECISION_BF16 : CLIPDB_PRECISION_FP32;
        double worst = 1.0, floor = p ? 0.999 : 0.9999;
        clipdb_model *gm = NULL;
        clipdb_ctx *gc = NULL;
        if (clipdb_model_open_precision(&gm, dir, prec) || clipdb_ctx_new(&gc, gm) ||
            clipdb_ctx_set_device(gc, CLIPDB_DEVICE_CUDA) ||
            clipdb_encode_images(gc, pix, n, got)) { /* also the warm-up (upload) */
            fprintf(stderr, "GPU %s: %s%s\n", clipdb_precision_name(prec),
                    clipdb_model_errmsg(gm), gc ? clipdb_ctx_errmsg(gc) : "");
            clipdb_ctx_free(gc);
            clipdb_model_close(gm);
            return 1;
        }
        for (i = 0; i < 3; i++) {
            t0 = now_s();
            clipdb_encode_images(gc, pix, n, got);
            t[i] = now_s() - t0;
        }
        clipdb_ctx_free(gc);
        clipdb_model_close(gm);
        for (i = 0; i < n_cpu; i++) {
            double ab = 0, aa = 0, bb = 0, cs;
            for (int j = 0; j < dim; j++) {
                double a = got[(size_t)i * dim + j], b = ref[(size_t)i * dim + j];
                ab += a * b;
                aa += a * a;
                bb += b * b;
            }
            cs = ab / sqrt(aa * bb);
            if (cs < worst) worst = cs;
        }
        printf("  GPU %s: %.1f images/s (%.1fx CPU); min cosine to CPU fp32 %.6f (floor %g): %s\n",
               p ? "bf16" : "fp32", n / median(t, 3), (n / median(t, 3)) / (n_cpu / cpu_s), worst,
               floor, worst >= floor ? "ok" : "FAIL");
        if (worst < floor) rc = 1;
    }
    clipdb_ctx_free(c);
    clipdb_model_close(m);
    free(pix);
    free(ref);
    free(got);
    return rc;
}

int main(int argc, char **argv)
{
    print_machine();
    if (argc == 6 && !strcmp(argv[1], "search"))
        return bench_search(strtoull(argv[2], NULL, 10), atoi(argv[3]),
                            strtoull(argv[4], NULL, 10), atoi(argv[5]));
    if (argc == 4 && !strcmp(argv[1], "encode")) return bench_encode(argv[2], atoi(argv[3]));
    fprintf(stderr, "usage: bench_gpu search N D NQ K | bench_gpu encode MODEL_DIR N\n");
    return 2;
}
