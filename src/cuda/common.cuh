/*
** common.cuh: helpers shared by the .cu files of the CUDA backend: error
** checks that turn CUDA/cuBLAS failures into cdb_err messages, and the
** element-type conversions. Internal to src/cuda.
*/
#ifndef CDB_CUDA_COMMON_CUH
#define CDB_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/cuda.h"

/* CUDA status -> CLIPDB_ERROR "what: cuda message" in e (rc stays 0 on success). */
int cdb_cu_check(cudaError_t st, const char *what, cdb_err *e);
int cdb_cublas_check(cublasStatus_t st, const char *what, cdb_err *e);
/* cudaDataType of a cdb_cuda_dtype, and its size in bytes. */
cudaDataType_t cdb_cu_type(cdb_cuda_dtype t);
size_t cdb_cu_size(cdb_cuda_dtype t);
/* Converts n fp32 host values into dt, uploading to dst (device): staged
** through a pinned-free host buffer in chunks; errors in e. */
int cdb_cu_upload(void *dst, cdb_cuda_dtype dt, const float *src, size_t n, cudaStream_t s,
                  cdb_err *e);
/* Grows a device buffer to at least `bytes` (contents not kept). */
int cdb_cu_grow(void **p, size_t *cap, size_t bytes, cdb_err *e);

#define CU(call, what)                                                   \
    do {                                                                 \
        if ((rc = cdb_cu_check((call), (what), e)) != CLIPDB_OK) goto cleanup; \
    } while (0)
#define CUBLAS(call, what)                                                   \
    do {                                                                     \
        if ((rc = cdb_cublas_check((call), (what), e)) != CLIPDB_OK) goto cleanup; \
    } while (0)

/* Typed loads/stores used by the kernels (fp32 math everywhere). */
template <typename T> __device__ __forceinline__ float cdb_ld(const T *p);
template <> __device__ __forceinline__ float cdb_ld<float>(const float *p) { return *p; }
template <> __device__ __forceinline__ float cdb_ld<__half>(const __half *p) { return __half2float(*p); }
template <> __device__ __forceinline__ float cdb_ld<__nv_bfloat16>(const __nv_bfloat16 *p)
{
    return __bfloat162float(*p);
}
template <typename T> __device__ __forceinline__ void cdb_st(T *p, float v);
template <> __device__ __forceinline__ void cdb_st<float>(float *p, float v) { *p = v; }
template <> __device__ __forceinline__ void cdb_st<__half>(__half *p, float v) { *p = __float2half_rn(v); }
template <> __device__ __forceinline__ void cdb_st<__nv_bfloat16>(__nv_bfloat16 *p, float v)
{
    *p = __float2bfloat16_rn(v);
}

#endif
