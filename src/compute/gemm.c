/*
** gemm.c: the compute interface (compute.h) on OpenBLAS's CBLAS.
*/
#include "compute/compute.h"

#include <cblas.h>

void cdb_sgemm(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta,
               float *C, int ldc)
{
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

int cdb_compute_threads(void)
{
    return openblas_get_num_threads();
}
