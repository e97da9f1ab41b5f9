/*
** sgemm_rate.c: the machine's OpenBLAS SGEMM rate on the GEMM shapes of one
** ViT-B/32 image batch (16 images x 50 tokens = 800 rows), weighted as the
** vision tower runs them, and the images/s limit it implies.
**
**   cc -O2 -o sgemm_rate bench/sgemm_rate.c -ldnnl -lopenblas && ./sgemm_rate [reps] [openblas|onednn|bf16]
** Threads: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS (the benchmark sets 2).
** onednn: dnnl_sgemm (oneDNN's JIT fp32 GEMM for the CPU's ISA).
** bf16: oneDNN's bf16 matmul (bf16 x bf16 -> f32), the best of two ways of
**   running each shape, both as clipdb's bf16 encoder could: the whole 800
**   (784) rows in one fixed-shape primitive, or cut into pieces of 256 rows
**   with a last piece padded to a multiple of 32 (src/compute/onednn.c);
**   weights reordered once, before timing, into the layout the primitive
**   prefers; activations already bf16 (the encoder's per-call rounding of x
**   is not counted: this is the GEMM's limit). The rate is the best whole
**   batch over reps, each shape taking its faster way; if oneDNN has no bf16
**   matmul on this CPU it prints rate 0.
** Prints one line: "sgemm_gflops G flops_per_image F images_per_s_limit L".
*/
#include <cblas.h>
#include <oneapi/dnnl/dnnl.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One bf16 matmul x (m, k) @ W^T (k, n) -> y (m, n) f32 with W reordered
** once: a primitive, its argument memories and a stream, made before timing. */
typedef struct bf16_mm {
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, dst, wplain;
    dnnl_stream_t strm;
} bf16_mm;

static int bf16_mm_make(bf16_mm *b, dnnl_engine_t eng, int m, int n, int k, void *x, void *w,
                        void *y)
{
    dnnl_memory_desc_t smd, wmd, wany, dmd;
    dnnl_dims_t sd = {m, k}, wd = {k, n}, dd = {m, n};
    dnnl_matmul_desc_t mm;
    dnnl_primitive_desc_t pd = NULL, rpd = NULL;
    dnnl_primitive_t reorder = NULL;
    dnnl_exec_arg_t args[2];
    int ok = 0;
    memset(b, 0, sizeof *b);
    if (dnnl_memory_desc_init_by_tag(&smd, 2, sd, dnnl_bf16, dnnl_ab) ||
        dnnl_memory_desc_init_by_tag(&wmd, 2, wd, dnnl_bf16, dnnl_ba) || /* W stored (n, k) */
        dnnl_memory_desc_init_by_tag(&wany, 2, wd, dnnl_bf16, dnnl_format_tag_any) ||
        dnnl_memory_desc_init_by_tag(&dmd, 2, dd, dnnl_f32, dnnl_ab) ||
        dnnl_matmul_desc_init(&mm, &smd, &wany, NULL, &dmd) ||
        dnnl_primitive_desc_create(&pd, &mm, NULL, eng, NULL) ||
        dnnl_primitive_create(&b->prim, pd) ||
        dnnl_memory_create(&b->src, &smd, eng, x) ||
        dnnl_memory_create(&b->wplain, &wmd, eng, w) ||
        dnnl_memory_create(&b->wei, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0), eng,
                           DNNL_MEMORY_ALLOCATE) ||
        dnnl_memory_create(&b->dst, &dmd, eng, y) ||
        dnnl_stream_create(&b->strm, eng, dnnl_stream_default_flags) ||
        dnnl_reorder_primitive_desc_create(&rpd, &wmd, eng,
                                           dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0),
                                           eng, NULL) ||
        dnnl_primitive_create(&reorder, rpd))
        goto done;
    args[0].arg = DNNL_ARG_FROM, args[0].memory = b->wplain;
    args[1].arg = DNNL_ARG_TO, args[1].memory = b->wei;
    ok = !dnnl_primitive_execute(reorder, b->strm, 2, args) && !dnnl_stream_wait(b->strm);
done:
    dnnl_primitive_destroy(reorder);
    dnnl_primitive_desc_destroy(rpd);
    dnnl_primitive_desc_destroy(pd);
    return ok;
}

static void bf16_mm_run(bf16_mm *b)
{
    dnnl_exec_arg_t args[3];
    args[0].arg = DNNL_ARG_SRC, args[0].memory = b->src;
    args[1].arg = DNNL_ARG_WEIGHTS, args[1].memory = b->wei;
    args[2].arg = DNNL_ARG_DST, args[2].memory = b->dst;
    dnnl_primitive_execute(b->prim, b->strm, 3, args);
    dnnl_stream_wait(b->strm);
}

static void bf16_mm_free(bf16_mm *b)
{
    dnnl_stream_destroy(b->strm);
    dnnl_memory_destroy(b->src), dnnl_memory_destroy(b->wei), dnnl_memory_destroy(b->dst);
    dnnl_memory_destroy(b->wplain);
    dnnl_primitive_destroy(b->prim);
}

/* Seconds of one call of shape (m, n, k) done as way 0 (one primitive of m
** rows) or way 1 (pieces of 256 rows, the last padded to a multiple of 32):
** the best of reps after a warm-up; -1 if oneDNN has no bf16 matmul. */
static double bf16_time(dnnl_engine_t eng, int way, int m, int n, int k, int reps, void *x,
                        void *w, void *y)
{
    bf16_mm mm[8];
    int rows[8], np = 0, r, i;
    double best = 1e30;
    if (way == 0) rows[np++] = m;
    else
        for (i = 0; i < m; i += 256) rows[np++] = (m - i >= 256 ? 256 : (m - i + 31) / 32 * 32);
    for (i = 0; i < np; i++)
        if (!bf16_mm_make(&mm[i], eng, rows[i], n, k, (char *)x + (size_t)i * 256 * k * 2, w,
                          (char *)y + (size_t)i * 256 * n * 4)) {
            while (i-- > 0) bf16_mm_free(&mm[i]);
            return -1;
        }
    for (r = 0; r < reps + 1; r++) {
        double t0 = now(), t;
        for (i = 0; i < np; i++) bf16_mm_run(&mm[i]);
        t = now() - t0;
        if (r > 0 && t < best) best = t;
    }
    for (i = 0; i < np; i++) bf16_mm_free(&mm[i]);
    return best;
}

int main(int argc, char **argv)
{
    /* (M, N, K, calls per batch): per layer qkv, out_proj, c_fc, c_proj; patch embedding */
    const int rows = 16 * 50, layers = 12;
    const struct { int m, n, k, calls; } sh[] = {
        {rows, 2304, 768, layers}, {rows, 768, 768, layers},
        {rows, 3072, 768, layers}, {rows, 768, 3072, layers}, {16 * 49, 768, 3072, 1}};
    const int nsh = (int)(sizeof sh / sizeof sh[0]);
    int reps = argc > 1 ? atoi(argv[1]) : 3, r, i, c;
    const int onednn = argc > 2 && !strcmp(argv[2], "onednn");
    const int bf16 = argc > 2 && !strcmp(argv[2], "bf16");
    double flops = 0, best = 1e30;
    float *a = malloc(sizeof(float) * rows * 3072), *b = malloc(sizeof(float) * 3072 * 3072);
    float *o = malloc(sizeof(float) * rows * 3072);
    if (!a || !b || !o) return 1;
    for (i = 0; i < rows * 3072; i++) a[i] = (float)((i * 7) % 13) * 0.01f;
    for (i = 0; i < 3072 * 3072; i++) b[i] = (float)((i * 5) % 11) * 0.01f;
    for (i = 0; i < nsh; i++) flops += 2.0 * sh[i].m * sh[i].n * sh[i].k * sh[i].calls;
    if (bf16) {
        /* per shape the faster way, timed over reps calls each; batch = sum of calls */
        dnnl_engine_t eng;
        double total = 0;
        void *xb = calloc((size_t)1024 * 3072, 2), *wb = calloc((size_t)3072 * 3072, 2);
        if (!xb || !wb || dnnl_engine_create(&eng, dnnl_cpu, 0)) return 1;
        for (i = 0; i < 1024 * 3072; i++) ((unsigned short *)xb)[i] = 0x3c00 + (i * 7) % 13;
        for (i = 0; i < 3072 * 3072; i++) ((unsigned short *)wb)[i] = 0x3c00 + (i * 5) % 11;
        for (i = 0; i < nsh && total >= 0; i++) {
            double t0 = bf16_time(eng, 0, sh[i].m, sh[i].n, sh[i].k, reps * 4, xb, wb, o);
            double t1 = bf16_time(eng, 1, sh[i].m, sh[i].n, sh[i].k, reps * 4, xb, wb, o);
            double t = t0 < 0 ? t1 : t1 < 0 ? t0 : t0 < t1 ? t0 : t1;
            total = t < 0 ? -1 : total + t * sh[i].calls;
        }
        dnnl_engine_destroy(eng);
        free(xb), free(wb);
        if (total <= 0) {
            printf("sgemm_gflops 0 flops_per_image %.4g images_per_s_limit 0\n", flops / 16);
            return 0;
        }
        best = total;
        printf("sgemm_gflops %.2f flops_per_image %.4g images_per_s_limit %.3f\n",
               flops / best * 1e-9, flops / 16, (flops / best) / (flops / 16));
        free(a), free(b), free(o);
        return 0;
    }
    for (r = 0; r < reps + 1; r++) { /* first round is warm-up */
        double t0 = now();
        for (i = 0; i < nsh; i++)
            for (c = 0; c < sh[i].calls; c++)
                /* a (m, k) @ b^T (k, n) -> o (m, n), as the model's Linear layers */
                if (onednn)
                    dnnl_sgemm('N', 'T', sh[i].m, sh[i].n, sh[i].k, 1.0f, a, sh[i].k, b, sh[i].k,
                               0.0f, o, sh[i].n);
                else
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, sh[i].m, sh[i].n,
                                sh[i].k, 1.0f, a, sh[i].k, b, sh[i].k, 0.0f, o, sh[i].n);
        if (r > 0 && now() - t0 < best) best = now() - t0;
    }
    /* per image: the batch's GEMM flops / 16, plus attention (~0.09 GFLOP, not GEMM-bound) */
    printf("sgemm_gflops %.2f flops_per_image %.4g images_per_s_limit %.3f\n", flops / best * 1e-9,
           flops / 16, (flops / best) / (flops / 16));
    free(a), free(b), free(o);
    return 0;
}
