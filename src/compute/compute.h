/*
** compute.h: the one internal matrix interface. The transformer, the index
** kernels (batched search, k-means) and the training engine call these, never
** a BLAS directly, so that the backend (OpenBLAS today) is chosen in one
** place. Internal; not part of the public API. Owner: src/compute/gemm.c.
**
** Row-major throughout. op(X) is X or its transpose.
*/
#ifndef CDB_COMPUTE_H
#define CDB_COMPUTE_H

typedef enum { CDB_NO_TRANS = 0, CDB_TRANS = 1 } cdb_trans;

/* C (m, n) = alpha * op(A) (m, k) @ op(B) (k, n) + beta * C.
** lda, ldb, ldc: row strides of A, B, C as stored. */
void cdb_sgemm(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta,
               float *C, int ldc);

/* y (m) = alpha * A (m, n) @ x (n) + beta * y; lda: row stride of A. */
void cdb_sgemv(int m, int n, float alpha, const float *A, int lda, const float *x,
               float beta, float *y);

/* x (n) . y (n) */
float cdb_sdot(int n, const float *x, const float *y);

/* Threads the backend uses for one call (its pool size). */
int cdb_compute_threads(void);

#endif
