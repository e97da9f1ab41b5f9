/*
** sgemm_rate.c: the machine's OpenBLAS SGEMM rate on the GEMM shapes of one
** ViT-B/32 image batch (16 images x 50 tokens = 800 rows), weighted as the
** vision tower runs them, and the images/s limit it implies.
**
**   cc -O2 -o sgemm_rate bench/sgemm_rate.c -ldnnl -lopenblas && ./sgemm_rate [reps] [openblas|onednn]
** Threads: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS (the benchmark sets 2).
** onednn: dnnl_sgemm (oneDNN's JIT fp32 GEMM for the CPU's ISA).
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
    double flops = 0, best = 1e30;
    float *a = malloc(sizeof(float) * rows * 3072), *b = malloc(sizeof(float) * 3072 * 3072);
    float *o = malloc(sizeof(float) * rows * 3072);
    if (!a || !b || !o) return 1;
    for (i = 0; i < rows * 3072; i++) a[i] = (float)((i * 7) % 13) * 0.01f;
    for (i = 0; i < 3072 * 3072; i++) b[i] = (float)((i * 5) % 11) * 0.01f;
    for (i = 0; i < nsh; i++) flops += 2.0 * sh[i].m * sh[i].n * sh[i].k * sh[i].calls;
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
