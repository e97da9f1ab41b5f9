/*
** gemm.c: the compute interface (compute.h): the backend choice (CLIPDB_GEMM,
** read once), the dispatch to it, and the OpenBLAS side. The oneDNN side is
** in onednn.c, which this file calls and which never calls back.
**
** cdb_sgemv and cdb_sdot stay on OpenBLAS for both backends: they are
** memory-bound (one pass over A), so the ISA of the kernel matters little.
*/
#include <cblas.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute/onednn.h"

int openblas_get_num_threads(void);

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

int cdb_sgemm_bf16(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                   const float *A, int lda, const float *B, int ldb, float beta, float *C,
                   int ldc, cdb_err *e)
{
    /* oneDNN for both backends: OpenBLAS has no bf16 GEMM */
    return cdb_onednn_sgemm_bf16(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, e);
}

int cdb_gemm_bf16_native(void)
{
    return cdb_onednn_bf16_native();
}

int cdb_gemm_bf16_ops(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                      const float *A, const uint16_t *Ab, int lda, const float *B,
                      const uint16_t *Bb, int ldb, float beta, float *C, int ldc, cdb_err *e)
{
    return cdb_onednn_gemm_bf16_ops(ta, tb, m, n, k, alpha, A, Ab, lda, B, Bb, ldb, beta, C, ldc,
                                    e);
}

int cdb_compute_serial_enter(void)
{
    return cdb_onednn_serial_enter();
}

void cdb_compute_serial_leave(int saved)
{
    cdb_onednn_serial_leave(saved);
}

int cdb_compute_threads(void)
{
    if (cdb_compute_backend() == CDB_BACKEND_OPENBLAS) return openblas_get_num_threads();
    return cdb_onednn_threads();
}

int cdb_wpack_new(cdb_wpack **out, const float *W, cdb_trans tw, int n_out, int n_in,
                  cdb_prec prec, cdb_err *e)
{
    *out = NULL;
    if (!W || n_out <= 0 || n_in <= 0)
        return cdb_err_set(e, CLIPDB_EINVAL, "pack: bad weight (%d x %d)", n_out, n_in);
    if (prec == CDB_PREC_FP32 && cdb_compute_backend() == CDB_BACKEND_OPENBLAS)
        return CLIPDB_OK; /* CBLAS runs on the plain W */
    return cdb_onednn_wpack_new(out, W, tw, n_out, n_in, prec, e);
}

int cdb_linear(const cdb_wpack *pk, const float *W, int m, int n_out, int n_in,
               const float *x, int ldx, float beta, float *y, int ldy, cdb_err *e)
{
    if (m <= 0) return CLIPDB_OK;
    if (pk)
        return cdb_onednn_linear(pk, m, n_out, n_in, x, ldx, beta, y, ldy, NULL, CDB_ACT_NONE, e);
    /* x (m, in) @ W^T (in, out) -> y (m, out) */
    cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, m, n_out, n_in, 1.0f, x, ldx, W, n_in, beta, y, ldy);
    return CLIPDB_OK;
}

int cdb_linear_fuses(const cdb_wpack *pk)
{
    return pk ? cdb_onednn_linear_fuses(pk) : 0;
}

int cdb_linear_ep(const cdb_wpack *pk, int m, int n_out, int n_in, const float *x, float beta,
                  float *y, const float *bias, cdb_act act, cdb_err *e)
{
    if (!pk) return cdb_err_set(e, CLIPDB_EINVAL, "linear: an epilogue needs a pack");
    if (m <= 0) return CLIPDB_OK;
    return cdb_onednn_linear(pk, m, n_out, n_in, x, n_in, beta, y, n_out, bias, act, e);
}

int cdb_mlp_ep(const cdb_wpack *pk1, const cdb_wpack *pk2, int m, int d, int f, const float *h,
               const float *b1, const float *b2, float *x, cdb_err *e)
{
    if (!pk1 || !pk2) return cdb_err_set(e, CLIPDB_EINVAL, "mlp: an epilogue needs packs");
    if (m <= 0) return CLIPDB_OK;
    return cdb_onednn_mlp(pk1, pk2, m, d, f, h, b1, b2, x, e);
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

int cdb_gemm_u8s8s32(int m, int n, int k, const uint8_t *A, const int8_t *B, int32_t *C,
                     cdb_err *e)
{
    if (m <= 0 || n <= 0) return CLIPDB_OK;
    return cdb_onednn_gemm_u8s8s32(m, n, k, A, B, C, e);
}

int cdb_gemm_bf16(int m, int n, int k, const uint16_t *A, const uint16_t *B, float *C,
                  cdb_err *e)
{
    if (m <= 0 || n <= 0) return CLIPDB_OK;
    return cdb_onednn_gemm_bf16(m, n, k, A, B, C, e);
}
