/*
** cuda.h: the CUDA backend's internal interface (src/cuda). Two parts, each
** behind the same shapes as its CPU counterpart:
**   - exact search (as cdb_flat_search, src/index): the base vectors resident
**     on the GPU, scores by cuBLAS GEMM, top-k selected on the GPU;
**   - the CLIP encoders (as cdb_vision_forward / cdb_text_forward,
**     src/model/transformer.c): weights uploaded once, GEMMs in cuBLAS,
**     fused kernels for layer norm, softmax-attention and QuickGELU.
** Built from search.cu, encoder.cu and common.cu when nvcc is found; with
** CUDA=0 stub.c implements every call as CLIPDB_ENODEV "built without
** CUDA", so the rest of the tree has no #ifdef. Internal; the public view is
** clipdb_device (include/clipdb.h).
*/
#ifndef CDB_CUDA_H
#define CDB_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "clipdb.h"
#include "core/core.h"

/* Element type of what lives on the GPU (vectors, weights, GEMM inputs).
** GEMMs always accumulate in fp32. */
typedef enum cdb_cuda_dtype {
    CDB_CUDA_F32 = 0,
    CDB_CUDA_F16 = 1,
    CDB_CUDA_BF16 = 2
} cdb_cuda_dtype;

/* "fp32" / "fp16" / "bf16" (static string). */
const char *cdb_cuda_dtype_name(cdb_cuda_dtype t);
/* The GPU element type of a clipdb_precision (device.c): fp32, fp16 or
** bf16; int8 (a CPU encoder precision only) maps to fp32. */
cdb_cuda_dtype cdb_cuda_dtype_of(clipdb_precision p);

/* 1 when this build contains the CUDA backend. */
int cdb_cuda_built(void);
/* CLIPDB_OK when a CUDA device is usable; else CLIPDB_ENODEV with "no CUDA
** device (...)" or "built without CUDA" in e. */
int cdb_cuda_probe(cdb_err *e);
/* Name of device 0 and its compute capability ("NVIDIA H200 (sm_90)") into
** buf; "" without a device. */
void cdb_cuda_device_name(char *buf, size_t n);

/* ---- exact search ---------------------------------------------------------- */

/* Largest k the GPU selects (Faiss's GPU limit is 2048); larger k: CPU. */
#define CDB_CUDA_MAX_K 1024

typedef struct cdb_cuda_flat cdb_cuda_flat;

/* Uploads base (n, d) as `dt` with its norms (computed on the CPU, as the
** CPU path does, when base->norms is NULL) and keeps a copy of its ids.
** *out: free with cdb_cuda_flat_free (NULL allowed). */
int cdb_cuda_flat_new(cdb_cuda_flat **out, const clipdb_vecs *base, cdb_cuda_dtype dt,
                      cdb_err *e);
void cdb_cuda_flat_free(cdb_cuda_flat *f);
/* Bytes the resident vectors take on the GPU. */
size_t cdb_cuda_flat_bytes(const cdb_cuda_flat *f);
/* As cdb_flat_search on the uploaded base: nq queries (nq, d) -> out (nq, k)
** best first, *n_out = min(k, #allowed rows); filter keys are rows. Ties
** rank by the smaller row (= smaller id when ids ascend with rows).
** k <= CDB_CUDA_MAX_K, else CLIPDB_ELIMIT. */
int cdb_cuda_flat_search(cdb_cuda_flat *f, const float *queries, size_t nq, int k,
                         clipdb_metric metric, const clipdb_filter *filter,
                         clipdb_hit *out, int *n_out, cdb_err *e);

/* ---- encoders -------------------------------------------------------------- */

struct clipdb_model;
typedef struct cdb_cuda_model cdb_cuda_model;

/* Uploads both towers of m (fp32 weights converted to dt: F32 or BF16).
** *out: free with cdb_cuda_model_free (NULL allowed). */
int cdb_cuda_model_new(cdb_cuda_model **out, const struct clipdb_model *m, cdb_cuda_dtype dt,
                       cdb_err *e);
void cdb_cuda_model_free(cdb_cuda_model *g);
/* As cdb_vision_forward: pixels (n, 3, S, S) -> out (n, embed_dim). */
int cdb_cuda_encode_images(cdb_cuda_model *g, const float *pixels, int n, float *out,
                           cdb_err *e);
/* As cdb_text_forward (full = 0): ids[i] holds lens[i] ids -> out (n, embed_dim). */
int cdb_cuda_encode_texts(cdb_cuda_model *g, const int32_t *const *ids, const int *lens,
                          int n, float *out, cdb_err *e);

/* ---- devices (device.c, compiled in every build) -------------------------- */

/* As clipdb_device_resolve, the message in e. */
int cdb_device_resolve(clipdb_device want, clipdb_device *got, cdb_err *e);

#ifdef __cplusplus
}
#endif
#endif /* CDB_CUDA_H */
