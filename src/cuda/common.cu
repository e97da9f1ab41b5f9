/*
** common.cu: device probing and the helpers of common.cuh.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/common.cuh"

int cdb_cuda_built(void) { return 1; }

const char *cdb_cuda_dtype_name(cdb_cuda_dtype t)
{
    return t == CDB_CUDA_BF16 ? "bf16" : t == CDB_CUDA_F16 ? "fp16" : "fp32";
}

int cdb_cu_check(cudaError_t st, const char *what, cdb_err *e)
{
    if (st == cudaSuccess) return CLIPDB_OK;
    if (st == cudaErrorMemoryAllocation)
        return cdb_err_set(e, CLIPDB_ENOMEM, "%s: out of GPU memory", what);
    return cdb_err_set(e, CLIPDB_ERROR, "%s: %s", what, cudaGetErrorString(st));
}

int cdb_cublas_check(cublasStatus_t st, const char *what, cdb_err *e)
{
    if (st == CUBLAS_STATUS_SUCCESS) return CLIPDB_OK;
    if (st == CUBLAS_STATUS_ALLOC_FAILED)
        return cdb_err_set(e, CLIPDB_ENOMEM, "%s: out of GPU memory (cuBLAS)", what);
    return cdb_err_set(e, CLIPDB_ERROR, "%s: cuBLAS %s", what, cublasGetStatusString(st));
}

int cdb_cuda_probe(cdb_err *e)
{
    int n = 0;
    cudaError_t st = cudaGetDeviceCount(&n);
    if (st != cudaSuccess || n < 1)
        return cdb_err_set(e, CLIPDB_ENODEV, "no CUDA device (%s)",
                           st != cudaSuccess ? cudaGetErrorString(st) : "none found");
    return CLIPDB_OK;
}

void cdb_cuda_device_name(char *buf, size_t n)
{
    cudaDeviceProp p;
    int cnt = 0;
    if (!n) return;
    buf[0] = 0;
    if (cudaGetDeviceCount(&cnt) != cudaSuccess || cnt < 1) return;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return;
    snprintf(buf, n, "%s (sm_%d%d, %.0f GiB)", p.name, p.major, p.minor,
             (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
}

cudaDataType_t cdb_cu_type(cdb_cuda_dtype t)
{
    return t == CDB_CUDA_BF16 ? CUDA_R_16BF : t == CDB_CUDA_F16 ? CUDA_R_16F : CUDA_R_32F;
}

size_t cdb_cu_size(cdb_cuda_dtype t) { return t == CDB_CUDA_F32 ? 4 : 2; }

int cdb_cu_grow(void **p, size_t *cap, size_t bytes, cdb_err *e)
{
    int rc = CLIPDB_OK;
    void *q = NULL;
    if (bytes <= *cap) return CLIPDB_OK;
    CU(cudaMalloc(&q, bytes), "GPU buffer");
    cudaFree(*p);
    *p = q;
    *cap = bytes;
cleanup:
    return rc;
}

/* fp32 -> fp16/bf16 on the CPU (round to nearest even, as the device's _rn). */
static void convert(void *dst, cdb_cuda_dtype dt, const float *src, size_t n)
{
    size_t i;
    if (dt == CDB_CUDA_F16) {
        __half *h = (__half *)dst;
        for (i = 0; i < n; i++) h[i] = __float2half_rn(src[i]);
    } else {
        __nv_bfloat16 *h = (__nv_bfloat16 *)dst;
        for (i = 0; i < n; i++) h[i] = __float2bfloat16_rn(src[i]);
    }
}

int cdb_cu_upload(void *dst, cdb_cuda_dtype dt, const float *src, size_t n, cudaStream_t s,
                  cdb_err *e)
{
    const size_t chunk = (size_t)1 << 22; /* values per staging step (8 MB of 16-bit) */
    int rc = CLIPDB_OK;
    void *stage = NULL;
    size_t i;
    if (dt == CDB_CUDA_F32) {
        CU(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyHostToDevice, s), "upload");
        CU(cudaStreamSynchronize(s), "upload");
        goto cleanup;
    }
    if (!(stage = malloc(chunk * 2))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (upload staging)");
        goto cleanup;
    }
    for (i = 0; i < n; i += chunk) {
        size_t m = n - i < chunk ? n - i : chunk;
        convert(stage, dt, src + i, m);
        CU(cudaMemcpyAsync((char *)dst + i * 2, stage, m * 2, cudaMemcpyHostToDevice, s),
           "upload");
        CU(cudaStreamSynchronize(s), "upload"); /* stage is reused */
    }
cleanup:
    free(stage);
    return rc;
}
