/*
** stub.c: the CUDA backend of a build without CUDA (make CUDA=0, or no
** nvcc): every call fails with CLIPDB_ENODEV "built without CUDA", so that
** callers need no #ifdef. Replaced by common.cu, search.cu and encoder.cu
** when the toolkit is found.
*/
#include "cuda/cuda.h"

#define NO_CUDA(e) cdb_err_set((e), CLIPDB_ENODEV, "built without CUDA (rebuild with nvcc on PATH or in /usr/local/cuda)")

int cdb_cuda_built(void) { return 0; }

const char *cdb_cuda_dtype_name(cdb_cuda_dtype t)
{
    return t == CDB_CUDA_BF16 ? "bf16" : t == CDB_CUDA_F16 ? "fp16" : "fp32";
}

int cdb_cuda_probe(cdb_err *e) { return NO_CUDA(e); }

void cdb_cuda_device_name(char *buf, size_t n)
{
    if (n) buf[0] = 0;
}

int cdb_cuda_flat_new(cdb_cuda_flat **out, const clipdb_vecs *base, cdb_cuda_dtype dt, cdb_err *e)
{
    (void)base;
    (void)dt;
    *out = NULL;
    return NO_CUDA(e);
}

void cdb_cuda_flat_free(cdb_cuda_flat *f) { (void)f; }

size_t cdb_cuda_flat_bytes(const cdb_cuda_flat *f)
{
    (void)f;
    return 0;
}

int cdb_cuda_flat_search(cdb_cuda_flat *f, const float *queries, size_t nq, int k,
                         clipdb_metric metric, const clipdb_filter *filter, clipdb_hit *out,
                         int *n_out, cdb_err *e)
{
    (void)f, (void)queries, (void)nq, (void)k, (void)metric, (void)filter, (void)out, (void)n_out;
    return NO_CUDA(e);
}

int cdb_cuda_model_new(cdb_cuda_model **out, const struct clipdb_model *m, cdb_cuda_dtype dt,
                       cdb_err *e)
{
    (void)m;
    (void)dt;
    *out = NULL;
    return NO_CUDA(e);
}

void cdb_cuda_model_free(cdb_cuda_model *g) { (void)g; }

int cdb_cuda_encode_images(cdb_cuda_model *g, const float *pixels, int n, float *out, cdb_err *e)
{
    (void)g, (void)pixels, (void)n, (void)out;
    return NO_CUDA(e);
}

int cdb_cuda_encode_texts(cdb_cuda_model *g, const int32_t *const *ids, const int *lens, int n,
                          float *out, cdb_err *e)
{
    (void)g, (void)ids, (void)lens, (void)n, (void)out;
    return NO_CUDA(e);
}
