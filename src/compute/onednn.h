/*
** onednn.h: the oneDNN backend's entry points, called by the dispatcher
** (gemm.c) only. onednn.c calls nothing of gemm.c: the choice of backend is
** made above it. Internal to src/compute.
*/
#ifndef CDB_ONEDNN_H
#define CDB_ONEDNN_H

#include "compute/compute.h"

/* cdb_sgemm on dnnl_sgemm. */
void cdb_onednn_sgemm(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta,
                      float *C, int ldc);

/* oneDNN's thread count (its OpenMP pool). */
int cdb_onednn_threads(void);
/* cdb_compute_serial_enter / leave: the calling thread's OpenMP team size. */
int cdb_onednn_serial_enter(void);
void cdb_onednn_serial_leave(int saved);

/* cdb_wpack_new for every precision on oneDNN matmul primitives. */
int cdb_onednn_wpack_new(cdb_wpack **out, const float *W, cdb_trans tw, int n_out, int n_in,
                         cdb_prec prec, cdb_err *e);

/* cdb_linear and cdb_linear_ep with a pack (pk != NULL), and cdb_linear_fuses. */
int cdb_onednn_linear(const cdb_wpack *pk, int m, int n_out, int n_in, const float *x, int ldx,
                      float beta, float *y, int ldy, const float *bias, cdb_act act, cdb_err *e);
int cdb_onednn_linear_fuses(const cdb_wpack *pk);
/* cdb_mlp_ep (compute.h). */
int cdb_onednn_mlp(const cdb_wpack *pk1, const cdb_wpack *pk2, int m, int d, int f,
                   const float *h, const float *b1, const float *b2, float *x, cdb_err *e);

/* cdb_gemm_u8s8s32 and cdb_gemm_bf16 (compute.h). */
int cdb_onednn_gemm_u8s8s32(int m, int n, int k, const uint8_t *A, const int8_t *B, int32_t *C,
                            cdb_err *e);
int cdb_onednn_gemm_bf16(int m, int n, int k, const uint16_t *A, const uint16_t *B, float *C,
                         cdb_err *e);

/* cdb_gemm_bf16_ops (compute.h). */
int cdb_onednn_gemm_bf16_ops(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                             const float *A, const uint16_t *Ab, int lda, const float *B,
                             const uint16_t *Bb, int ldb, float beta, float *C, int ldc,
                             cdb_err *e);
/* cdb_sgemm_bf16 (compute.h); 1 if bf16 runs natively (not emulated). */
int cdb_onednn_sgemm_bf16(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                          const float *A, int lda, const float *B, int ldb, float beta, float *C,
                          int ldc, cdb_err *e);
int cdb_onednn_bf16_native(void);

#endif
