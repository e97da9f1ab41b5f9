/*
** compute.h: the one internal matrix interface. The transformer, the index
** kernels (batched search, k-means) and the training engine call these, never
** a BLAS directly, so that the backend is chosen in one place. Internal; not
** part of the public API. Owner: src/compute/gemm.c (the dispatcher and the
** OpenBLAS side), which calls src/compute/onednn.c (the oneDNN backend,
** packed weights; its entry points in onednn.h) and never the other way.
**
** Backends, chosen once per process at first use from CLIPDB_GEMM:
**   onednn   (default) oneDNN: dnnl_sgemm for cdb_sgemm, matmul primitives
**            (JIT code for the CPU's best ISA: AVX2, AVX-512, AVX-512 BF16/VNNI,
**            AMX) for packed linear layers;
**   openblas OpenBLAS's CBLAS for cdb_sgemm and fp32 linear layers (fallback,
**            and for comparison).
** bf16 and int8 linear layers always run on oneDNN matmul (OpenBLAS has none).
** An unknown CLIPDB_GEMM value selects the default; cdb_compute_backend()
** says what was chosen.
**
** Row-major throughout. op(X) is X or its transpose.
*/
#ifndef CDB_COMPUTE_H
#define CDB_COMPUTE_H

#include "core/core.h"

typedef enum { CDB_NO_TRANS = 0, CDB_TRANS = 1 } cdb_trans;

/* C (m, n) = alpha * op(A) (m, k) @ op(B) (k, n) + beta * C.
** lda, ldb, ldc: row strides of A, B, C as stored. */
void cdb_sgemm(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
               const float *A, int lda, const float *B, int ldb, float beta,
               float *C, int ldc);

/* cdb_sgemm in bf16 with fp32 accumulation (training's --precision bf16):
** op(A) and op(B) are rounded to bf16 (round-to-nearest-even), their
** products are summed in fp32 and C (fp32) = alpha * sum + beta * C. Always
** on oneDNN (its bf16 matmul, a primitive cached per shape) whatever
** CLIPDB_GEMM says; where the ISA has no bf16 instructions the rounding is
** the same and the fp32 gemm sums (cdb_gemm_bf16_native() says which).
** CLIPDB_OK, or CLIPDB_ENOMEM / CLIPDB_ERROR with the message in e. */
int cdb_sgemm_bf16(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                   const float *A, int lda, const float *B, int ldb, float beta, float *C,
                   int ldc, cdb_err *e);
/* 1 if cdb_sgemm_bf16 runs on bf16 instructions, 0 if emulated. */
int cdb_gemm_bf16_native(void);
/* cdb_sgemm_bf16 with either operand, or both, given already rounded to
** bf16: Ab (Bb) non-NULL is op(A)'s (op(B)'s) storage as bf16 with row
** stride lda (ldb), used in place, and A (B) is then not read; else A (B)
** is fp32 and rounded here, as cdb_sgemm_bf16 rounds it. The same sums as
** cdb_sgemm_bf16 on the fp32 operands those bf16 values round from. Only
** where cdb_gemm_bf16_native() (CLIPDB_EINVAL for k <= 0 or a missing
** operand). */
int cdb_gemm_bf16_ops(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                      const float *A, const uint16_t *Ab, int lda, const float *B,
                      const uint16_t *Bb, int ldb, float beta, float *C, int ldc, cdb_err *e);

/* y (m) = alpha * A (m, n) @ x (n) + beta * y; lda: row stride of A. */
void cdb_sgemv(int m, int n, float alpha, const float *A, int lda, const float *x,
               float beta, float *y);

/* x (n) . y (n) */
float cdb_sdot(int n, const float *x, const float *y);

/* Threads the backend uses for one call (its pool size). */
int cdb_compute_threads(void);

/* Work split over the process's pool (core.h cdb_pool_run) whose tasks call
** the compute layer (attention: small GEMMs per sequence) already keeps the
** cores busy: inside such a task the backend must not start a team of
** threads of its own. cdb_compute_serial_enter makes the calling thread's
** compute calls single-threaded and returns the previous setting, which
** cdb_compute_serial_leave restores. (oneDNN's OpenMP threads are a
** per-thread setting; OpenBLAS runs GEMMs this small on one thread anyway.) */
int cdb_compute_serial_enter(void);
void cdb_compute_serial_leave(int saved);

/* ---- backends and precision ------------------------------------------------ */

typedef enum { CDB_BACKEND_ONEDNN = 0, CDB_BACKEND_OPENBLAS = 1 } cdb_backend;

/* The backend in use (CLIPDB_GEMM, read once). */
cdb_backend cdb_compute_backend(void);
/* "onednn <isa>" (oneDNN's effective ISA, e.g. "onednn avx512_core_bf16") or
** "openblas <core>" (OpenBLAS's detected core, e.g. "openblas Prescott").
** Static string. */
const char *cdb_compute_describe(void);
/* oneDNN's effective ISA name ("avx2", "avx512_core", "avx512_core_bf16",
** "avx512_core_amx", ...): the CPU's best, lowered by ONEDNN_MAX_CPU_ISA. */
const char *cdb_onednn_isa(void);

/* Encoder precision of a linear layer. fp32: exact. bf16: inputs and weights
** rounded to bf16, fp32 accumulation. int8: weights quantised symmetrically
** per output channel, activations symmetrically per row (token), int32
** accumulation, dequantised to fp32. */
typedef enum { CDB_PREC_FP32 = 0, CDB_PREC_BF16 = 1, CDB_PREC_INT8 = 2 } cdb_prec;

/* Largest int8 weight code: 127 where oneDNN's ISA has VNNI (exact s32 dot
** products), else 63 (see onednn.c). */
int cdb_int8_weight_max(void);

/* ---- linear layers on prepacked weights ------------------------------------ */

/* A weight converted and reordered ONCE (at model load) into the layout the
** backend's primitive wants, with the primitives for it. Immutable after
** cdb_wpack_new: any number of threads may run cdb_linear on it at once.
** Opaque; owned by the caller (cdb_wpack_free). */
typedef struct cdb_wpack cdb_wpack;

/* Packs W for y = x @ W^T with W (n_out, n_in) row-major (tw = CDB_TRANS, the
** torch.nn.Linear layout), or y = x @ W with W (n_in, n_out) (tw =
** CDB_NO_TRANS). fp32 on the OpenBLAS backend packs nothing (*out = NULL,
** CLIPDB_OK: cdb_linear then runs on the plain W). W must stay valid while
** the pack lives only when *out is NULL or the pack says it aliases W. */
int cdb_wpack_new(cdb_wpack **out, const float *W, cdb_trans tw, int n_out, int n_in,
                  cdb_prec prec, cdb_err *e);
void cdb_wpack_free(cdb_wpack *pk);
/* Bytes the pack owns (0 when it uses W in place). */
size_t cdb_wpack_bytes(const cdb_wpack *pk);

/* y (m, n_out) = x (m, n_in) @ W^T (n_in, n_out) + beta * y   (beta 0 or 1).
** pk != NULL: runs on the pack (its precision); W is not read.
** pk == NULL: plain fp32 W (n_out, n_in) (the training engine's weights,
** which change every step), through cdb_sgemm; any strides.
** With a pack, x and y must be dense (ldx == n_in, ldy == n_out).
** Returns CLIPDB_OK, or CLIPDB_ENOMEM / CLIPDB_EINVAL (message in e). */
int cdb_linear(const cdb_wpack *pk, const float *W, int m, int n_out, int n_in,
               const float *x, int ldx, float beta, float *y, int ldy, cdb_err *e);

/* An activation a linear layer may apply to its output. QuickGELU is
** x * sigmoid(1.702 x), CLIP's. */
typedef enum { CDB_ACT_NONE = 0, CDB_ACT_QUICK_GELU = 1 } cdb_act;

/* 1 when cdb_linear_ep can apply a bias and an activation on pk in the same
** pass as the product: bf16 packs (oneDNN's bias argument and eltwise
** post-op, in the matmul's own epilogue) and int8 packs (in the
** dequantisation of the accumulators), so the output is written once
** instead of read and written again by separate passes. 0 for fp32 packs,
** emulated bf16 and pk == NULL: the caller then applies them itself (fp32
** keeps its exact order of operations). */
int cdb_linear_fuses(const cdb_wpack *pk);

/* y (m, n_out) = act(x @ W^T + bias) + beta * y, on a pack that fuses
** (cdb_linear_fuses), with bias (n_out) or NULL; an activation only with
** beta 0. Dense x and y as cdb_linear with a pack. int8 computes it in the
** order y + (acc * sx * sw) + bias, as the separate passes would; bf16 in
** oneDNN's (its swish for QuickGELU). CLIPDB_EINVAL on a pack that does not
** fuse. */
int cdb_linear_ep(const cdb_wpack *pk, int m, int n_out, int n_in, const float *x, float beta,
                  float *y, const float *bias, cdb_act act, cdb_err *e);

/* A transformer's MLP in inference, x (m, d) += QuickGELU(h @ W1^T + b1) @
** W2^T + b2 with W1 (f, d) and W2 (d, f) packed in one precision that fuses
** (cdb_linear_fuses), h (m, d): the same values as cdb_linear_ep of the two
** layers in turn, without the middle (m, f) activation in fp32 between
** them. bf16: the first product writes its activation as bf16 (rounded as
** the second product would round it); int8: each row of the first
** product's accumulators is dequantised, activated and quantised for the
** second product in one pass. CLIPDB_EINVAL on packs of other shapes or
** precisions or that do not fuse, CLIPDB_ENOMEM. */
int cdb_mlp_ep(const cdb_wpack *pk1, const cdb_wpack *pk2, int m, int d, int f, const float *h,
               const float *b1, const float *b2, float *x, cdb_err *e);

/* ---- bf16 helpers (also for compressed vectors) ---------------------------- */

/* bf16 -> fp32 (exact). */
static inline float cdb_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
/* fp32 -> bf16 with round-to-nearest-even (NaN kept NaN). */
static inline uint16_t cdb_f32_to_bf16(float f)
{
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- integer and bf16 products (compressed vectors, batched search) ------- */

/* C (m, n) s32 = A (m, k) u8 @ B^T (k, n), B stored (n, k) s8, every row
** dense. oneDNN whatever the backend (OpenBLAS has no int8 GEMM): a matmul
** primitive per shape, created on first use and kept (AMX where the CPU has
** it), or dnnl_gemm_u8s8s32 where oneDNN has no such matmul; exact where
** oneDNN's ISA has VNNI, else its u8 x s8 pair sums may saturate at 16 bits
** unless |B| <= cdb_int8_weight_max() (63). */
int cdb_gemm_u8s8s32(int m, int n, int k, const uint8_t *A, const int8_t *B, int32_t *C,
                     cdb_err *e);

/* C (m, n) f32 = A (m, k) bf16 @ B^T (k, n), B stored (n, k) bf16, every row
** dense, f32 accumulation: the oneDNN bf16 matmul of cdb_sgemm_bf16 (one
** primitive per shape, created on first use and kept) on the plain layouts.
** CLIPDB_ENOTFOUND where oneDNN has no bf16 matmul for its ISA (the caller
** falls back to fp32). */
int cdb_gemm_bf16(int m, int n, int k, const uint16_t *A, const uint16_t *B, float *C,
                  cdb_err *e);

#endif
