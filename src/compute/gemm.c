/*
** gemm.c: the compute interface (compute.h): backend choice (CLIPDB_GEMM,
** read once) and the OpenBLAS side. The oneDNN side is in onednn.c.
**
** cdb_sgemv and cdb_sdot stay on OpenBLAS for both backends: they are
** memory-bound (one pass over A), so the ISA of the kernel matters little.
*/
#include <cblas.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"

/* OpenBLAS's own query (not in every cblas.h). */
char *openblas_get_corename(void);

static pthread_once_t backend_once = PTHREAD_ONCE_INIT;
static cdb_backend backend = CDB_BACKEND_ONEDNN;
static char describe[64];

static void choose_backend(void)
{
    const char *env = getenv("CLIPDB_GEMM");
    backend = (env && !strcmp(env, "openblas")) ? CDB_BACKEND_OPENBLAS : CDB_BACKEND_ONEDNN;
    if (backend == CDB_BACKEND_OPENBLAS)
        snprintf(describe, sizeof describe, "openblas %s", openblas_get_corename());
    else
        snprintf(describe, sizeof describe, "onednn %s", cdb_onednn_isa());
}

cdb_backend cdb_compute_backend(void)
{
    pthread_once(&backend_once, choose_backend);
    return backend;
}

const char *cdb_compute_describe(void)
{
    pthread_once(&backend_once, choose_backend);
    return describe;
}

void cdb_sgemm(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta,
               float *C, int ldc)
{
    if (m <= 0 || n <= 0) return;
    if (cdb_compute_backend() == CDB_BACKEND_ONEDNN) {
        cdb_onednn_sgemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    cblas_sgemm(CblasRowMajor, ta == CDB_TRANS ? CblasTrans : CblasNoTrans,
                tb == CDB_TRANS ? CblasTrans : CblasNoTrans, m, n, k, alpha, A, lda, B, ldb,
                beta, C, ldc);
}

void cdb_sgemv(int m, int n, float alpha, const float *A, int lda, const float *x,
               float beta, float *y)
{
    cblas_sgemv(CblasRowMajor, CblasNoTrans, m, n, alpha, A, lda, x, 1, beta, y, 1);
}

float cdb_sdot(int n, const float *x, const float *y)
{
    return cblas_sdot(n, x, 1, y, 1);
}

float cdb_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
