/*
** onednn.c: the oneDNN side of the compute interface (compute.h).
**
** cdb_sgemm -> dnnl_sgemm (JIT for the CPU's ISA). Linear layers on packed
** weights -> one matmul primitive per pack, created with the row count M as a
** run-time dimension (DNNL_RUNTIME_DIM_VAL) and the weight layout left to
** oneDNN (format_tag_any): the weight is reordered into that layout once, at
** cdb_wpack_new, and the primitive serves every batch size, so there is no
** per-call weight conversion and no per-shape primitive creation.
** Primitives use a user-managed scratchpad (allocated per call when one is
** needed), so concurrent cdb_linear calls from several threads share no
** writable state.
**
** bf16 and int8 (where the ISA has them) run on fixed-row primitives
** instead: oneDNN 2.6's brgemm matmul (brg:avx512_core_bf16,
** brg:avx512_core_vnni, brg:avx512_core_amx), 2-3x faster here than the
** run-time-M gemm:jit it falls back to, has no run-time dimensions. So the
** rows are cut into pieces of PIECE_ROWS, and a last piece is padded (zero
** rows, a scratch output) to a multiple of PIECE_STEP: at most
** PIECE_ROWS / PIECE_STEP shapes per pack and sum mode, each primitive
** created on first use (JIT, a few ms; oneDNN's primitive cache shares the
** code between packs of one shape) and kept with the pack. The weight
** layout is the one the PIECE_ROWS primitive chose at pack time; every
** piece primitive is created for that layout.
** The elementwise passes (bf16 rounding of x, int8 quantisation and
** dequantisation) are convert.h's kernels (AVX-512 where the CPU has it).
** cdb_linear_ep's bias and QuickGELU ride along: in a bf16 matmul's own
** epilogue (bias argument, swish post-op; piece primitives per epilogue),
** in int8's dequantisation pass, so the output is written once. Measured
** on 2 cores of a Zen 5 (bench/README.md, bench_encode.py before and after,
** two runs each): bf16 images/s +13%, texts/s +10%; int8 +9% and +10%.
**
** Precisions (compute.h): fp32 matmul f32 x f32 -> f32;
**   bf16: x (m, in) is rounded to bf16 per call, W stored bf16, f32 accumulate;
**   int8: W stored s8 with a scale per output channel, sw[j] = max|W[j,:]| / 127;
**         x quantised per row, sx[i] = max|x[i,:]| / 127; acc (m, out) s32;
**         y[i][j] = beta * y[i][j] + acc[i][j] * sx[i] * sw[j].
**         The codes of x go to oneDNN as u8 (code + 128), and the pack's
**         comp[j] = 128 * sum_k Wq[j][k] is subtracted from the accumulators
**         in the dequantisation: the same integers, exactly. With s8 codes
**         oneDNN 2.6's brgemm wants weights carrying that compensation and
**         builds them in its reference reorder, 4x slower (measured, a 3072
**         x 768 weight on Zen 5: 6.7 ms simple:any against 1.7 ms jit:uni;
**         the matmul itself runs at the same rate either way).
** Where the ISA oneDNN may use has no bf16 instructions (ONEDNN_MAX_CPU_ISA=avx2,
** older CPUs) bf16 is emulated with the same rounding: W is rounded to bf16
** and stored as fp32, x is rounded to bf16 per call, the fp32 matmul
** accumulates (same answers up to summation order). Without VNNI, int8 uses
** vpmaddubsw, whose 16-bit pair sums saturate for full-range weights: there
** the weights are quantised to +-63 instead of +-127 (255*63*2 < 32767).
*/
#include <math.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "compute/convert.h"
#include "compute/onednn.h"

/* Rows of one fixed-shape matmul call, and the multiple a last piece is
** padded to (see the top). */
#define PIECE_ROWS 256
#define PIECE_STEP 32
#define N_PIECES (PIECE_ROWS / PIECE_STEP)

/* What a bf16 piece primitive does after the product, as bits: y += (a sum
** post-op), + bias (oneDNN's bias argument, f32), QuickGELU (an eltwise swish
** post-op, x * sigmoid(1.702 x)), y written as bf16 instead of f32 (rounded
** to nearest even, as cdb_f32_to_bf16: the next product's input). */
#define EPI_SUM 1
#define EPI_BIAS 2
#define EPI_GELU 4
#define EPI_BF16 8
#define EPI_N 16

struct cdb_wpack {
    cdb_prec prec;
    int emulated;            /* bf16 on an ISA without bf16: fp32 primitive */
    int n_out, n_in;
    void *w;                 /* packed weight in wmd's layout */
    int w_owned;             /* 0: w aliases the caller's fp32 W */
    size_t w_bytes;
    float *scale;            /* int8: (n_out) per output channel */
    int32_t *comp;           /* int8: (n_out) 128 * sum_k Wq[j][k], the u8 shift's share */
    dnnl_memory_desc_t wmd;  /* the layout the primitive wants */
    dnnl_primitive_t prim[2]; /* [0]: y = x W^T; [1]: y += x W^T (fp32, emulated bf16) */
    size_t scratch[2];       /* scratchpad bytes of each */
    int pieces;              /* 1: runs on piece[] (fixed rows), prim[] unused */
    pthread_mutex_t mu;      /* guards piece[] creation */
    /* piece[epi][i]: rows (i + 1) * PIECE_STEP, epilogue epi (EPI_*, bf16
    ** only: int8 applies its epilogue in the dequantisation); created on
    ** first use */
    dnnl_primitive_t piece[EPI_N][N_PIECES];
    size_t piece_scratch[EPI_N][N_PIECES];
};

/* ---- engine --------------------------------------------------------------- */

static pthread_once_t engine_once = PTHREAD_ONCE_INIT;
static dnnl_engine_t engine;
static dnnl_status_t engine_status = dnnl_runtime_error;

static void engine_init(void)
{
    engine_status = dnnl_engine_create(&engine, dnnl_cpu, 0);
}

static int get_engine(cdb_err *e)
{
    pthread_once(&engine_once, engine_init);
    if (engine_status != dnnl_success)
        return cdb_err_set(e, CLIPDB_ERROR, "oneDNN: no CPU engine (status %d)",
                           (int)engine_status);
    return CLIPDB_OK;
}

static int dnnl_fail(cdb_err *e, const char *what, dnnl_status_t s)
{
    return cdb_err_set(e, s == dnnl_out_of_memory ? CLIPDB_ENOMEM : CLIPDB_ERROR,
                       "oneDNN: %s failed (status %d)", what, (int)s);
}

/* ---- per-thread scratch ------------------------------------------------------ */

/* The buffers of one cdb_linear call (converted activations and int8
** accumulators, oneDNN's scratchpad, a padded output), kept per thread
** between calls: glibc serves blocks over 128 KiB from fresh mappings, so
** a malloc per call page-faulted them in afresh every time (measured: the
** first touch, in the bf16 conversion, was the largest cost after the GEMM
** on texts). Grown as needed, never shared between threads, freed when the
** thread exits. */
enum { SCR_ACT, SCR_PAD, SCR_OUT, SCR_MID, SCR_SLOTS };
typedef struct thread_scratch {
    void *p[SCR_SLOTS];
    size_t cap[SCR_SLOTS];
} thread_scratch;

static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static pthread_key_t scratch_key;
static int scratch_key_ok;

static void scratch_free(void *arg)
{
    thread_scratch *t = arg;
    int i;
    for (i = 0; i < SCR_SLOTS; i++) free(t->p[i]);
    free(t);
}

static void scratch_init(void)
{
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

/* A 64-byte aligned block of at least `bytes` in this thread's slot (contents
** not kept), or NULL when out of memory. */
static void *scratch_get(int slot, size_t bytes)
{
    thread_scratch *t;
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok) return NULL;
    if (!(t = pthread_getspecific(scratch_key))) {
        if (!(t = calloc(1, sizeof *t))) return NULL;
        if (pthread_setspecific(scratch_key, t)) {
            free(t);
            return NULL;
        }
    }
    if (t->cap[slot] < bytes) {
        size_t cap = (bytes + 63) / 64 * 64;
        free(t->p[slot]);
        t->cap[slot] = 0;
        if (cap < bytes || !(t->p[slot] = aligned_alloc(64, cap))) return NULL;
        t->cap[slot] = cap;
    }
    return t->p[slot];
}

const char *cdb_onednn_isa(void)
{
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "generic";
    }
}

int cdb_onednn_threads(void)
{
    return omp_get_max_threads();
}

int cdb_onednn_serial_enter(void)
{
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    return saved;
}

void cdb_onednn_serial_leave(int saved)
{
    omp_set_num_threads(saved > 0 ? saved : 1);
}

void cdb_onednn_sgemm(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta,
                      float *C, int ldc)
{
    /* Row-major, as compute.h; the arguments were valid for CBLAS, so a
    ** failure status here can only be a bug: then C is left as is. */
    (void)dnnl_sgemm(ta == CDB_TRANS ? 'T' : 'N', tb == CDB_TRANS ? 'T' : 'N', m, n, k, alpha, A,
                     lda, B, ldb, beta, C, ldc);
}

/* ---- packing ---------------------------------------------------------------- */

static dnnl_data_type_t wtype(const cdb_wpack *pk)
{
    if (pk->prec == CDB_PREC_BF16) return pk->emulated ? dnnl_f32 : dnnl_bf16;
    return pk->prec == CDB_PREC_INT8 ? dnnl_s8 : dnnl_f32;
}

int cdb_int8_weight_max(void)
{
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_avx512_core_vnni:
    case dnnl_cpu_isa_avx512_core_bf16:
    case dnnl_cpu_isa_avx512_core_amx:
    case dnnl_cpu_isa_avx2_vnni: return 127;
    default: return 63;
    }
}

/* md of a 2-D (rows, cols) tensor in format `tag` (rows may be run-time). */
static dnnl_status_t md2(dnnl_memory_desc_t *md, dnnl_dim_t rows, dnnl_dim_t cols,
                         dnnl_data_type_t dt, dnnl_format_tag_t tag)
{
    dnnl_dims_t dims = {0};
    dims[0] = rows;
    dims[1] = cols;
    return dnnl_memory_desc_init_by_tag(md, 2, dims, dt, tag);
}

/* Matmul x (M, K) @ W (K, N) -> y (M, N) into *prim (scratchpad bytes in
** *scratch); M = rows, or at run time (DNNL_RUNTIME_DIM_VAL); epi: EPI_*
** bits (EPI_SUM: y += ...; EPI_BIAS: + bias (1, N); EPI_GELU: QuickGELU).
** first: the weight layout is chosen here (pk->wmd): fp32 weights (and the
** fp32 copies of emulated bf16) stay in their plain layout `plain_tag`, so
** an fp32 model uses its memory-mapped weights in place (no second copy;
** oneDNN's fp32 gemm packs panels per call either way); bf16 and int8 take
** the layout oneDNN prefers (format_tag_any). */
static int make_prim(cdb_wpack *pk, int epi, dnnl_dim_t rows, int first, dnnl_format_tag_t plain_tag,
                     dnnl_primitive_t *prim, size_t *scratch, cdb_err *e)
{
    const dnnl_data_type_t wt = wtype(pk);
    const dnnl_data_type_t dt = pk->prec == CDB_PREC_INT8 ? dnnl_s32
                                : epi & EPI_BF16          ? dnnl_bf16
                                                          : dnnl_f32;
    const dnnl_data_type_t st = pk->prec == CDB_PREC_INT8 ? dnnl_u8 : wt;
    dnnl_memory_desc_t smd, wmd, dmd, bmd;
    dnnl_matmul_desc_t mm;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_status_t s;
    int rc = CLIPDB_OK;

    if ((s = md2(&smd, rows, pk->n_in, st, dnnl_ab)) ||
        (s = md2(&dmd, rows, pk->n_out, dt, dnnl_ab)) ||
        (s = md2(&bmd, 1, pk->n_out, dnnl_f32, dnnl_ab)))
        return dnnl_fail(e, "memory descriptor", s);
    if (first) {
        if ((s = md2(&wmd, pk->n_in, pk->n_out, wt,
                     wt == dnnl_f32 ? plain_tag : dnnl_format_tag_any)))
            return dnnl_fail(e, "memory descriptor", s);
    } else {
        wmd = pk->wmd;
    }
    if ((s = dnnl_matmul_desc_init(&mm, &smd, &wmd, epi & EPI_BIAS ? &bmd : NULL, &dmd)))
        return dnnl_fail(e, "matmul descriptor", s);
    if ((s = dnnl_primitive_attr_create(&attr))) return dnnl_fail(e, "attributes", s);
    if ((s = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user))) {
        rc = dnnl_fail(e, "scratchpad mode", s);
        goto cleanup;
    }
    if (epi & (EPI_SUM | EPI_GELU)) {
        if ((s = dnnl_post_ops_create(&po)) ||
            (epi & EPI_SUM && (s = dnnl_post_ops_append_sum(po, 1.0f))) ||
            (epi & EPI_GELU &&
             (s = dnnl_post_ops_append_eltwise(po, 1.0f, dnnl_eltwise_swish, 1.702f, 0.0f))) ||
            (s = dnnl_primitive_attr_set_post_ops(attr, po))) {
            rc = dnnl_fail(e, "post-ops", s);
            goto cleanup;
        }
    }
    if ((s = dnnl_primitive_desc_create(&pd, &mm, attr, engine, NULL))) {
        rc = s == dnnl_unimplemented ? CLIPDB_ENOTFOUND /* the caller may fall back */
                                     : dnnl_fail(e, "matmul primitive descriptor", s);
        goto cleanup;
    }
    if (first) pk->wmd = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    *scratch =
        dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0));
    if ((s = dnnl_primitive_create(prim, pd))) rc = dnnl_fail(e, "matmul primitive", s);
cleanup:
    dnnl_primitive_desc_destroy(pd);
    dnnl_post_ops_destroy(po);
    dnnl_primitive_attr_destroy(attr);
    return rc;
}

/* The piece primitive of `rows` (a multiple of PIECE_STEP, <= PIECE_ROWS)
** and epilogue epi, created on first use. */
static int get_piece(cdb_wpack *pk, int epi, int rows, dnnl_primitive_t *prim, size_t *scratch,
                     cdb_err *e)
{
    const int i = rows / PIECE_STEP - 1;
    int rc = CLIPDB_OK;
    pthread_mutex_lock(&pk->mu);
    if (!pk->piece[epi][i])
        rc = make_prim(pk, epi, rows, 0, dnnl_ab, &pk->piece[epi][i], &pk->piece_scratch[epi][i], e);
    if (rc == CLIPDB_ENOTFOUND)
        rc = cdb_err_set(e, CLIPDB_ERROR, "oneDNN has no matmul of %d rows for this layout", rows);
    *prim = pk->piece[epi][i];
    *scratch = pk->piece_scratch[epi][i];
    pthread_mutex_unlock(&pk->mu);
    return rc;
}

/* One reorder: src (plain, at `from`) -> pk->w (pk->wmd). */
static int reorder_into(cdb_wpack *pk, const dnnl_memory_desc_t *src, const void *from,
                        cdb_err *e)
{
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_memory_t ms = NULL, md = NULL;
    dnnl_stream_t st = NULL;
    dnnl_status_t s;
    int rc = CLIPDB_OK;
    dnnl_exec_arg_t args[2];

    if ((s = dnnl_reorder_primitive_desc_create(&pd, src, engine, &pk->wmd, engine, NULL)) ||
        (s = dnnl_primitive_create(&prim, pd)) ||
        (s = dnnl_memory_create(&ms, src, engine, (void *)from)) ||
        (s = dnnl_memory_create(&md, &pk->wmd, engine, pk->w)) ||
        (s = dnnl_stream_create(&st, engine, dnnl_stream_default_flags))) {
        rc = dnnl_fail(e, "weight reorder", s);
        goto cleanup;
    }
    args[0].arg = DNNL_ARG_FROM;
    args[0].memory = ms;
    args[1].arg = DNNL_ARG_TO;
    args[1].memory = md;
    if ((s = dnnl_primitive_execute(prim, st, 2, args)) || (s = dnnl_stream_wait(st)))
        rc = dnnl_fail(e, "weight reorder", s);
cleanup:
    dnnl_stream_destroy(st);
    dnnl_memory_destroy(ms);
    dnnl_memory_destroy(md);
    dnnl_primitive_destroy(prim);
    dnnl_primitive_desc_destroy(pd);
    return rc;
}

/* W element (row j of the (n_out, n_in) view, column i). */
static inline float w_at(const float *W, cdb_trans tw, int n_out, int n_in, int j, int i)
{
    return tw == CDB_TRANS ? W[(size_t)j * n_in + i] : W[(size_t)i * n_out + j];
}

/* The plain (n_out, n_in) copy in the pack's data type: dims {K, N}, tag ba.
** int8 fills pk->scale. Caller frees *out. */
static int convert_plain(cdb_wpack *pk, const float *W, cdb_trans tw, void **out, cdb_err *e)
{
    const int N = pk->n_out, K = pk->n_in;
    int i, j;
    const float qmax = (float)cdb_int8_weight_max();
    size_t esz = pk->emulated ? 4 : pk->prec == CDB_PREC_BF16 ? 2 : 1;
    void *buf = cdb_malloc_array((size_t)N * K, esz);
    if (!buf) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (packing a %d x %d weight)", N, K);
    if (pk->emulated) {
        float *b = buf;
        for (j = 0; j < N; j++)
            for (i = 0; i < K; i++)
                b[(size_t)j * K + i] = cdb_bf16_to_f32(cdb_f32_to_bf16(w_at(W, tw, N, K, j, i)));
    } else if (pk->prec == CDB_PREC_BF16) {
        uint16_t *b = buf;
        if (tw == CDB_TRANS) /* W is already (n_out, n_in): one pass */
            cdb_convert_best()->to_bf16(W, (size_t)N * K, b);
        else
            for (j = 0; j < N; j++)
                for (i = 0; i < K; i++) b[(size_t)j * K + i] = cdb_f32_to_bf16(w_at(W, tw, N, K, j, i));
    } else {
        int8_t *q = buf;
        const float *Wt = W;
        float *tr = NULL;
        if (tw != CDB_TRANS) { /* W (n_in, n_out): its (n_out, n_in) transpose first */
            if (!(tr = cdb_malloc_array((size_t)N * K, sizeof(float)))) {
                free(buf);
                return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (packing a %d x %d weight)",
                                   N, K);
            }
            for (j = 0; j < N; j++)
                for (i = 0; i < K; i++) tr[(size_t)j * K + i] = w_at(W, tw, N, K, j, i);
            Wt = tr;
        }
        /* per output channel j: scale[j] = max|W[j,:]| / qmax, the same rule
        ** as the activations' rows */
        cdb_convert_best()->quantize_rows(Wt, (size_t)N, (size_t)K, qmax, 0, q, pk->scale);
        free(tr);
        /* the activations go in as u8 (code + 128): comp[j] is what the
        ** +128 adds to row j's products, taken off again in dequant_rows */
        for (j = 0; j < N; j++) {
            int32_t sum = 0;
            for (i = 0; i < K; i++) sum += q[(size_t)j * K + i];
            pk->comp[j] = 128 * sum;
        }
    }
    *out = buf;
    return CLIPDB_OK;
}

int cdb_onednn_wpack_new(cdb_wpack **out, const float *W, cdb_trans tw, int n_out, int n_in,
                         cdb_prec prec, cdb_err *e)
{
    cdb_wpack *pk = NULL;
    dnnl_memory_desc_t plain;
    dnnl_format_tag_t tag;
    void *tmp = NULL;
    dnnl_status_t s;
    int rc;

    *out = NULL;
    if ((rc = get_engine(e))) return rc;
    if (!(pk = calloc(1, sizeof *pk))) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    pthread_mutex_init(&pk->mu, NULL);
    pk->prec = prec;
    pk->n_out = n_out;
    pk->n_in = n_in;
    pk->pieces = prec != CDB_PREC_FP32; /* bf16, int8: fixed-row primitives */
    if (prec == CDB_PREC_INT8 && (!(pk->scale = malloc((size_t)n_out * sizeof(float))) ||
                                  !(pk->comp = malloc((size_t)n_out * sizeof(int32_t))))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    /* W (n_out, n_in) row-major is dims {K, N} in format ba; (n_in, n_out) is ab;
    ** converted copies (bf16, int8, emulated bf16) are written (n_out, n_in) */
    tag = prec == CDB_PREC_FP32 && tw == CDB_NO_TRANS ? dnnl_ab : dnnl_ba;
    if (pk->pieces)
        rc = make_prim(pk, 0, PIECE_ROWS, 1, tag, &pk->piece[0][N_PIECES - 1],
                       &pk->piece_scratch[0][N_PIECES - 1], e);
    else
        rc = make_prim(pk, 0, DNNL_RUNTIME_DIM_VAL, 1, tag, &pk->prim[0], &pk->scratch[0], e);
    if (rc == CLIPDB_ENOTFOUND && prec == CDB_PREC_BF16) {
        pk->emulated = 1; /* no bf16 matmul for this ISA: emulate (see the top) */
        pk->pieces = 0;
        rc = make_prim(pk, 0, DNNL_RUNTIME_DIM_VAL, 1, tag, &pk->prim[0], &pk->scratch[0], e);
    }
    if (rc == CLIPDB_ENOTFOUND)
        rc = cdb_err_set(e, CLIPDB_ERROR, "oneDNN has no %s matmul for ISA %s",
                         prec == CDB_PREC_INT8 ? "int8" : prec == CDB_PREC_BF16 ? "bf16" : "fp32",
                         cdb_onednn_isa());
    if (rc) goto cleanup;
    if (!pk->pieces &&
        (rc = make_prim(pk, 1, DNNL_RUNTIME_DIM_VAL, 0, tag, &pk->prim[1], &pk->scratch[1], e)))
        goto cleanup;

    /* The plain source: W itself (fp32) or its converted copy, dims {K, N} */
    if ((s = md2(&plain, n_in, n_out, wtype(pk), tag))) {
        rc = dnnl_fail(e, "memory descriptor", s);
        goto cleanup;
    }
    if (prec == CDB_PREC_FP32 && dnnl_memory_desc_equal(&plain, &pk->wmd)) {
        pk->w = (void *)W; /* already the wanted layout: used in place */
        goto cleanup;
    }
    if (prec != CDB_PREC_FP32 && (rc = convert_plain(pk, W, tw, &tmp, e))) goto cleanup;
    if (pk->emulated && dnnl_memory_desc_equal(&plain, &pk->wmd)) {
        pk->w = tmp; /* the rounded fp32 copy is already the wanted layout */
        pk->w_bytes = (size_t)n_out * n_in * sizeof(float);
        pk->w_owned = 1;
        tmp = NULL;
        goto cleanup;
    }
    pk->w_bytes = dnnl_memory_desc_get_size(&pk->wmd);
    if (!(pk->w = aligned_alloc(64, (pk->w_bytes + 63) / 64 * 64))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (%zu bytes of packed weights)",
                         pk->w_bytes);
        goto cleanup;
    }
    pk->w_owned = 1;
    rc = reorder_into(pk, &plain, tmp ? tmp : W, e);
cleanup:
    free(tmp);
    if (rc) cdb_wpack_free(pk);
    else *out = pk;
    return rc;
}

void cdb_wpack_free(cdb_wpack *pk)
{
    int i, j;
    if (!pk) return;
    dnnl_primitive_destroy(pk->prim[0]);
    dnnl_primitive_destroy(pk->prim[1]);
    for (j = 0; j < EPI_N; j++)
        for (i = 0; i < N_PIECES; i++) dnnl_primitive_destroy(pk->piece[j][i]);
    pthread_mutex_destroy(&pk->mu);
    if (pk->w_owned) free(pk->w);
    free(pk->scale);
    free(pk->comp);
    free(pk);
}

size_t cdb_wpack_bytes(const cdb_wpack *pk)
{
    if (!pk) return 0;
    return (pk->w_owned ? pk->w_bytes : 0) + (pk->scale ? (size_t)pk->n_out * sizeof(float) : 0) +
           (pk->comp ? (size_t)pk->n_out * sizeof(int32_t) : 0);
}

/* ---- running ------------------------------------------------------------------ */

/* Runs prim (scratchpad `scratch_bytes`) on src (m, K) of type st and dst
** (m, N) of type dt, with bias (N) f32 when prim was made with EPI_BIAS. */
static int run_prim(const cdb_wpack *pk, dnnl_primitive_t prim, size_t scratch_bytes, int m,
                    const void *src, dnnl_data_type_t st, void *dst, dnnl_data_type_t dt,
                    const float *bias, cdb_err *e)
{
    dnnl_memory_desc_t smd, dmd, bmd;
    dnnl_memory_t ms = NULL, mw = NULL, md = NULL, msp = NULL, mb = NULL;
    dnnl_stream_t strm = NULL;
    dnnl_exec_arg_t args[5];
    void *scratch = NULL;
    int nargs = 3, rc = CLIPDB_OK;
    dnnl_status_t s;

    if ((s = md2(&smd, m, pk->n_in, st, dnnl_ab)) || (s = md2(&dmd, m, pk->n_out, dt, dnnl_ab)) ||
        (s = dnnl_memory_create(&ms, &smd, engine, (void *)src)) ||
        (s = dnnl_memory_create(&mw, &pk->wmd, engine, pk->w)) ||
        (s = dnnl_memory_create(&md, &dmd, engine, dst)) ||
        (s = dnnl_stream_create(&strm, engine, dnnl_stream_default_flags))) {
        rc = dnnl_fail(e, "matmul arguments", s);
        goto cleanup;
    }
    args[0].arg = DNNL_ARG_SRC;
    args[0].memory = ms;
    args[1].arg = DNNL_ARG_WEIGHTS;
    args[1].memory = mw;
    args[2].arg = DNNL_ARG_DST;
    args[2].memory = md;
    if (bias) {
        if ((s = md2(&bmd, 1, pk->n_out, dnnl_f32, dnnl_ab)) ||
            (s = dnnl_memory_create(&mb, &bmd, engine, (void *)bias))) {
            rc = dnnl_fail(e, "bias argument", s);
            goto cleanup;
        }
        args[nargs].arg = DNNL_ARG_BIAS;
        args[nargs++].memory = mb;
    }
    if (scratch_bytes) {
        const dnnl_memory_desc_t *spmd;
        const_dnnl_primitive_desc_t pd;
        if ((s = dnnl_primitive_get_primitive_desc(prim, &pd))) {
            rc = dnnl_fail(e, "scratchpad", s);
            goto cleanup;
        }
        spmd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
        if (!(scratch = scratch_get(SCR_PAD, scratch_bytes))) {
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (scratchpad)");
            goto cleanup;
        }
        if ((s = dnnl_memory_create(&msp, spmd, engine, scratch))) {
            rc = dnnl_fail(e, "scratchpad", s);
            goto cleanup;
        }
        args[nargs].arg = DNNL_ARG_SCRATCHPAD;
        args[nargs++].memory = msp;
    }
    if ((s = dnnl_primitive_execute(prim, strm, nargs, args)) || (s = dnnl_stream_wait(strm)))
        rc = dnnl_fail(e, "matmul", s);
cleanup:
    dnnl_stream_destroy(strm);
    dnnl_memory_destroy(ms);
    dnnl_memory_destroy(mw);
    dnnl_memory_destroy(md);
    dnnl_memory_destroy(msp);
    dnnl_memory_destroy(mb);
    return rc;
}

/* Rows rounded up to the piece step. */
static size_t padded_rows(int m)
{
    return ((size_t)m + PIECE_STEP - 1) / PIECE_STEP * PIECE_STEP;
}

/* x (m, K) of type st (esz bytes) -> y (m, N) of type dt (ysz bytes), with
** epilogue epi (EPI_*; bias when EPI_BIAS) on the piece primitives. x holds
** padded_rows(m) rows, those past m zero; y_padded: y holds padded_rows(m)
** rows too (else a padded last piece runs into a scratch output, copied
** back). */
static int run_pieces(const cdb_wpack *cpk, int epi, const float *bias, int m, const void *x,
                      size_t esz, dnnl_data_type_t st, void *y, size_t ysz, dnnl_data_type_t dt,
                      int y_padded, cdb_err *e)
{
    cdb_wpack *pk = (cdb_wpack *)cpk; /* only the piece cache changes, under pk->mu */
    const size_t row_x = (size_t)pk->n_in * esz, row_y = (size_t)pk->n_out * ysz;
    void *tmp = NULL;
    int r0, rc = CLIPDB_OK;
    for (r0 = 0; r0 < m && !rc; r0 += PIECE_ROWS) {
        const int real = m - r0 < PIECE_ROWS ? m - r0 : PIECE_ROWS;
        const int rows = (int)padded_rows(real);
        char *yp = (char *)y + (size_t)r0 * row_y;
        void *dst = yp;
        dnnl_primitive_t prim;
        size_t scratch;
        if ((rc = get_piece(pk, epi, rows, &prim, &scratch, e))) break;
        if (rows != real && !y_padded) { /* only the last piece */
            if (!(tmp = scratch_get(SCR_OUT, (size_t)rows * row_y))) {
                rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (padded output)");
                break;
            }
            memset(tmp, 0, (size_t)rows * row_y);
            if (epi & EPI_SUM) memcpy(tmp, yp, (size_t)real * row_y);
            dst = tmp;
        }
        /* x rows [r0, r0 + rows) (rows, K) @ W (K, N) -> dst (rows, N) */
        rc = run_prim(pk, prim, scratch, rows, (const char *)x + (size_t)r0 * row_x, st, dst, dt,
                      epi & EPI_BIAS ? bias : NULL, e);
        if (!rc && dst == tmp) memcpy(yp, tmp, (size_t)real * row_y);
    }
    return rc;
}

/* The elementwise passes of cdb_onednn_linear (bf16 rounding, int8
** quantisation and dequantisation of the activations), row-wise: `call`
** runs on rows [lo, hi) of m rows of `cols`, one range per OpenMP thread
** (the threads the matmul runs on; the Makefile builds this file with
** -fopenmp under gcc), or all on the caller for small passes, inside a
** parallel region, or without OpenMP. Every row is computed as the serial
** pass computes it. Measured single-threaded before: the bf16 rounding of
** x was 4% of a bf16 text encode, run while the other core waited. */
#define PAR_MIN_ELEMS ((size_t)1 << 16)
#ifdef _OPENMP
#define ROWS_PAR(m, cols, call)                                                              \
    do {                                                                                     \
        const size_t rows_ = (size_t)(m), cols_ = (size_t)(cols);                            \
        const int nt_ = rows_ * cols_ < PAR_MIN_ELEMS || omp_in_parallel()                   \
                            ? 1 : omp_get_max_threads();                                     \
        int t_;                                                                              \
        _Pragma("omp parallel for num_threads(nt_) schedule(static)")                        \
        for (t_ = 0; t_ < nt_; t_++) {                                                       \
            const size_t lo = rows_ * (size_t)t_ / (size_t)nt_;                              \
            const size_t hi = rows_ * (size_t)(t_ + 1) / (size_t)nt_;                        \
            if (lo < hi) call;                                                               \
        }                                                                                    \
    } while (0)
#else
#define ROWS_PAR(m, cols, call)                                                              \
    do {                                                                                     \
        const size_t lo = 0, hi = (size_t)(m);                                               \
        (void)(cols);                                                                        \
        call;                                                                                \
    } while (0)
#endif

/* Whether bf16 matmuls take a bias and a swish post-op, and write a bf16
** output, on this CPU (asked once, on a small primitive: oneDNN 2.6 builds
** them for every ISA with a bf16 matmul, but a build that lacks one makes
** fusion off, not an error). */
static pthread_once_t fuse_once = PTHREAD_ONCE_INIT;
static int fuse_bf16;

static void fuse_probe(void)
{
    cdb_wpack probe = {.prec = CDB_PREC_BF16, .n_out = 64, .n_in = 64};
    dnnl_primitive_t prim = NULL;
    size_t scratch;
    cdb_err e;
    if (make_prim(&probe, 0, PIECE_STEP, 1, dnnl_ba, &prim, &scratch, &e) == CLIPDB_OK) {
        dnnl_primitive_destroy(prim);
        prim = NULL;
        fuse_bf16 = make_prim(&probe, EPI_BIAS | EPI_GELU, PIECE_STEP, 0, dnnl_ba, &prim,
                              &scratch, &e) == CLIPDB_OK;
        dnnl_primitive_destroy(prim);
        prim = NULL;
        fuse_bf16 = fuse_bf16 && make_prim(&probe, EPI_BIAS | EPI_SUM, PIECE_STEP, 0, dnnl_ba,
                                           &prim, &scratch, &e) == CLIPDB_OK;
        dnnl_primitive_destroy(prim);
        prim = NULL;
        /* cdb_onednn_mlp's first product: its output as bf16 */
        fuse_bf16 = fuse_bf16 && make_prim(&probe, EPI_BIAS | EPI_GELU | EPI_BF16, PIECE_STEP, 0,
                                           dnnl_ba, &prim, &scratch, &e) == CLIPDB_OK;
        dnnl_primitive_destroy(prim);
    }
}

int cdb_onednn_linear_fuses(const cdb_wpack *pk)
{
    if (pk->prec == CDB_PREC_INT8) return 1;
    if (pk->prec != CDB_PREC_BF16 || pk->emulated || !pk->pieces) return 0;
    pthread_once(&fuse_once, fuse_probe);
    return fuse_bf16;
}

/* An int8 product's activations in this thread's SCR_ACT: q (mp, n_in) u8
** (64-byte aligned) | acc (mp, n_out) s32 | sx (m) f32, with the rows of m
** quantised into q and sx (the rows past m of q zero). CLIPDB_ENOMEM. */
static int int8_acts(const cdb_convert_kernels *kern, const float *x, int m, int n_in, int n_out,
                     int8_t **q, int32_t **acc, float **sx, cdb_err *e)
{
    const size_t mp = padded_rows(m), mk = (size_t)m * (size_t)n_in;
    size_t qb, ab, bytes;
    int8_t *qq;
    float *s;
    if (!cdb_mul_ok(mp, (size_t)n_in, &qb) || !cdb_add_ok(qb, 63, &qb) ||
        !cdb_mul_ok(mp, (size_t)n_out * 4, &ab) || !cdb_add_ok(ab, (size_t)m * 4, &bytes) ||
        !cdb_add_ok(bytes, qb / 64 * 64, &bytes) || !(qq = scratch_get(SCR_ACT, bytes)))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (int8 activations)");
    qb = qb / 64 * 64;
    *q = qq;
    *acc = (int32_t *)((char *)qq + qb);
    *sx = s = (float *)((char *)*acc + ab);
    ROWS_PAR(m, n_in, kern->quantize_rows(x + lo * n_in, hi - lo, (size_t)n_in, 127.0f, 1,
                                           qq + lo * n_in, s + lo));
    memset(qq + mk, 0, mp * (size_t)n_in - mk);
    return CLIPDB_OK;
}

int cdb_onednn_linear(const cdb_wpack *pk, int m, int n_out, int n_in, const float *x, int ldx,
                      float beta, float *y, int ldy, const float *bias, cdb_act act, cdb_err *e)
{
    const cdb_convert_kernels *kern = cdb_convert_best();
    const size_t mk = (size_t)m * (size_t)n_in, mp = padded_rows(m);
    const int gelu = act == CDB_ACT_QUICK_GELU;
    void *buf = NULL;
    int rc = CLIPDB_OK;
    size_t i, bytes;

    if (m <= 0) return CLIPDB_OK;
    if (pk->n_out != n_out || pk->n_in != n_in || ldx != n_in || ldy != n_out ||
        (beta != 0.0f && beta != 1.0f))
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "linear: pack (%d, %d) called as (%d, %d), ld %d/%d, beta %g",
                           pk->n_out, pk->n_in, n_out, n_in, ldx, ldy, (double)beta);
    if ((bias || act != CDB_ACT_NONE) && !cdb_onednn_linear_fuses(pk))
        return cdb_err_set(e, CLIPDB_EINVAL, "linear: this pack applies no bias or activation");
    if (gelu && beta != 0.0f)
        return cdb_err_set(e, CLIPDB_EINVAL, "linear: an activation needs beta 0");
    switch (pk->prec) {
    case CDB_PREC_FP32:
        return run_prim(pk, pk->prim[beta != 0.0f], pk->scratch[beta != 0.0f], m, x, dnnl_f32, y,
                        dnnl_f32, NULL, e);
    case CDB_PREC_BF16: {
        uint16_t *xb;
        if (pk->emulated) { /* x rounded to bf16, kept in fp32 */
            float *xr = buf = cdb_malloc_array(mk, sizeof(float));
            if (!xr) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (bf16 activations)");
            for (i = 0; i < mk; i++) xr[i] = cdb_bf16_to_f32(cdb_f32_to_bf16(x[i]));
            rc = run_prim(pk, pk->prim[beta != 0.0f], pk->scratch[beta != 0.0f], m, xr, dnnl_f32,
                          y, dnnl_f32, NULL, e);
            break;
        }
        /* xb (mp, in) bf16, rows past m zero */
        if (!cdb_mul_ok(mp, (size_t)n_in * sizeof(uint16_t), &bytes) ||
            !(xb = scratch_get(SCR_ACT, bytes)))
            return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (bf16 activations)");
        ROWS_PAR(m, n_in, kern->to_bf16(x + lo * n_in, (hi - lo) * n_in, xb + lo * n_in));
        memset(xb + mk, 0, bytes - mk * sizeof(uint16_t));
        /* y (m, out) = act(x W^T [+ bias]) [+ y], in the matmul's epilogue */
        rc = run_pieces(pk,
                        (beta != 0.0f ? EPI_SUM : 0) | (bias ? EPI_BIAS : 0) | (gelu ? EPI_GELU : 0),
                        bias, m, xb, 2, dnnl_bf16, y, 4, dnnl_f32, 0, e);
        break;
    }
    case CDB_PREC_INT8: {
        /* q (mp, in) u8 | acc (mp, out) s32 | sx (m) f32, in one allocation */
        int8_t *q;
        int32_t *acc;
        float *sx;
        if ((rc = int8_acts(kern, x, m, n_in, n_out, &q, &acc, &sx, e))) return rc;
        /* q (mp, in) u8 @ Wq^T (in, out) -> acc (mp, out) s32, + comp[j] in every row */
        if ((rc = run_pieces(pk, 0, NULL, m, q, 1, dnnl_u8, acc, 4, dnnl_s32, 1, e))) break;
        /* y (m, out) = act([y +] (acc - comp[j]) * sx[i] * scale[j] [+ bias[j]]) */
        ROWS_PAR(m, n_out, kern->dequant_rows(acc + lo * n_out, pk->comp, hi - lo, (size_t)n_out,
                                              sx + lo, pk->scale, beta != 0.0f, bias, gelu,
                                              y + lo * n_out));
        break;
    }
    }
    free(buf);
    return rc;
}

/* Rows [lo, hi) of cdb_onednn_mlp's int8 middle: the first layer's
** accumulators acc (rows, f) -> act(dequantised + b1) -> the second layer's
** codes q (rows, f) u8 and scales sx2, one row at a time through row (f):
** the kernels of the two separate passes, in their order, so the same bits,
** but the row is quantised while it is in cache instead of written out as
** fp32 and read back twice. */
static void requant_rows(const cdb_convert_kernels *kern, const cdb_wpack *pk1, const int32_t *acc,
                         const float *sx, const float *b1, size_t lo, size_t hi, size_t f,
                         float *row, int8_t *q, float *sx2)
{
    size_t i;
    for (i = lo; i < hi; i++) {
        kern->dequant_rows(acc + i * f, pk1->comp, 1, f, sx + i, pk1->scale, 0, b1, 1, row);
        kern->quantize_rows(row, 1, f, 127.0f, 1, q + i * f, sx2 + i);
    }
}

int cdb_onednn_mlp(const cdb_wpack *pk1, const cdb_wpack *pk2, int m, int d, int f,
                   const float *h, const float *b1, const float *b2, float *x, cdb_err *e)
{
    const cdb_convert_kernels *kern = cdb_convert_best();
    const size_t mp = padded_rows(m), md = (size_t)m * (size_t)d;
    size_t bytes, mid;
    int rc = CLIPDB_OK;

    if (m <= 0) return CLIPDB_OK;
    if (pk1->prec != pk2->prec || pk1->n_in != d || pk1->n_out != f || pk2->n_in != f ||
        pk2->n_out != d || !cdb_onednn_linear_fuses(pk1) || !cdb_onednn_linear_fuses(pk2))
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "mlp: packs (%d, %d) and (%d, %d) of precisions %d/%d for d %d, f %d",
                           pk1->n_out, pk1->n_in, pk2->n_out, pk2->n_in, (int)pk1->prec,
                           (int)pk2->prec, d, f);
    if (pk1->prec == CDB_PREC_BF16) {
        uint16_t *hb, *mb;
        /* hb (mp, d) bf16 | mb (mp, f) bf16, rows past m of hb zero */
        if (!cdb_mul_ok(mp, (size_t)d * 2, &bytes) || !cdb_mul_ok(mp, (size_t)f * 2, &mid) ||
            !(hb = scratch_get(SCR_ACT, bytes)) || !(mb = scratch_get(SCR_MID, mid)))
            return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (bf16 activations)");
        ROWS_PAR(m, d, kern->to_bf16(h + lo * d, (hi - lo) * d, hb + lo * d));
        memset(hb + md, 0, bytes - md * sizeof(uint16_t));
        /* mb (mp, f) = bf16(gelu(hb W1^T + b1)): its padded rows hold gelu(b1), and
        ** give only the second product's padded rows, which are dropped */
        if ((rc = run_pieces(pk1, EPI_BIAS | EPI_GELU | EPI_BF16, b1, m, hb, 2, dnnl_bf16, mb, 2,
                             dnnl_bf16, 1, e)))
            return rc;
        /* x (m, d) += mb W2^T + b2 */
        return run_pieces(pk2, EPI_SUM | EPI_BIAS, b2, m, mb, 2, dnnl_bf16, x, 4, dnnl_f32, 0, e);
    }
    {
        /* SCR_ACT: q (mp, d) u8 | acc (mp, f) s32, reused for the second
        ** product's (mp, d) | sx (m) f32; SCR_MID: q2 (mp, f) u8 | sx2 (m) f32 |
        ** a row of f floats per thread */
        const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
        size_t q2b, rowb;
        int8_t *q, *q2;
        int32_t *acc;
        float *sx, *sx2, *rows;
        if ((rc = int8_acts(kern, h, m, d, f, &q, &acc, &sx, e))) return rc;
        if (!cdb_mul_ok(mp, (size_t)f, &q2b) || !cdb_add_ok(q2b, 63, &q2b) ||
            !cdb_mul_ok((size_t)nt, (size_t)f * 4, &rowb) ||
            !cdb_add_ok(q2b / 64 * 64, rowb, &mid) || !cdb_add_ok(mid, (size_t)m * 4, &mid) ||
            !(q2 = scratch_get(SCR_MID, mid)))
            return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (int8 activations)");
        q2b = q2b / 64 * 64;
        rows = (float *)((char *)q2 + q2b);
        sx2 = rows + (size_t)nt * f;
        /* q (mp, d) u8 @ W1q^T -> acc (mp, f) s32 */
        if ((rc = run_pieces(pk1, 0, NULL, m, q, 1, dnnl_u8, acc, 4, dnnl_s32, 1, e))) return rc;
        /* acc -> q2 (m, f) u8, sx2 (m): gelu(dequant + b1), quantised */
#ifdef _OPENMP
        {
            int t;
#pragma omp parallel for num_threads(nt) schedule(static)
            for (t = 0; t < nt; t++)
                requant_rows(kern, pk1, acc, sx, b1, (size_t)m * t / nt, (size_t)m * (t + 1) / nt,
                             (size_t)f, rows + (size_t)t * f, q2, sx2);
        }
#else
        requant_rows(kern, pk1, acc, sx, b1, 0, (size_t)m, (size_t)f, rows, q2, sx2);
#endif
        memset(q2 + (size_t)m * f, 0, (mp - (size_t)m) * (size_t)f);
        /* q2 (mp, f) u8 @ W2q^T -> acc (mp, d) s32 */
        if ((rc = run_pieces(pk2, 0, NULL, m, q2, 1, dnnl_u8, acc, 4, dnnl_s32, 1, e))) return rc;
        /* x (m, d) += (acc - comp2[j]) * sx2[i] * scale2[j] + b2[j] */
        ROWS_PAR(m, d, kern->dequant_rows(acc + lo * d, pk2->comp, hi - lo, (size_t)d, sx2 + lo,
                                          pk2->scale, 1, b2, 0, x + lo * d));
    }
    return rc;
}

/* ---- matmul on plain operands (training, batched and compressed search) -------- */

/* One matmul path on plain operands, for bf16 (bf16_matmul) and, with the
** same cache, for the u8 x s8 -> s32 products of sq8 copies
** (cdb_onednn_gemm_u8s8s32, at the end). bf16_matmul: bf16 x bf16 -> f32
** (fp32 accumulation; alpha as an output scale, beta as a sum post-op) on
** operands in their own orientation with their own row strides (a
** transpose or a column window costs nothing: strides in the memory
** descriptor). Primitives are created once per shape (ta, tb, m, n, k,
** lda, ldb, ldc, alpha, beta, team size, types) and kept in a small
** table for the life of the process (a training step has a few dozen
** shapes, a batched search a few tile shapes); past BF16_CACHE_MAX shapes a
** primitive is made and destroyed per call. Scratchpads are per call, so
** any number of threads may run one primitive at once.
**   cdb_onednn_sgemm_bf16 (training): fp32 op(A), op(B) rounded to bf16
**     copies, then bf16_matmul; cdb_onednn_gemm_bf16_ops the same with
**     either operand given as bf16 already (the ResNet's im2col). Where oneDNN has no bf16 matmul for the ISA
**     (below avx512_core) the same rounding is applied and dnnl_sgemm runs
**     on the rounded fp32 copies (same answers up to the summation order).
**   cdb_onednn_gemm_bf16 (compressed vectors): operands already bf16,
**     straight to bf16_matmul; CLIPDB_ENOTFOUND without a bf16 matmul (the
**     caller widens to fp32). */
#define BF16_CACHE_MAX 256

enum { MM_BF16, MM_U8S8 }; /* bf16 x bf16 -> f32; u8 x s8 -> s32 */

typedef struct bf16_key {
    int ta, tb, m, n, k, lda, ldb, ldc;
    float alpha, beta;
    int threads; /* the caller's OpenMP team size: a primitive is made for one */
    int types;   /* MM_* */
} bf16_key;

typedef struct bf16_prim {
    bf16_key key;
    dnnl_primitive_t prim;
    size_t scratch; /* scratchpad bytes */
} bf16_prim;

static struct {
    pthread_mutex_t mu;
    bf16_prim *tab;
    size_t n, cap;
    int emulate; /* 1: oneDNN has no bf16 matmul on this ISA */
    int no_u8s8; /* 1: nor a u8 x s8 one (dnnl_gemm_u8s8s32 instead) */
} B16 = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* src (rows, cols) with row stride ld -> dst (rows, cols) dense bf16. */
static void to_bf16(const float *src, int rows, int cols, int ld, uint16_t *dst)
{
    for (int i = 0; i < rows; i++) {
        const float *s = src + (size_t)i * ld;
        cdb_convert_best()->to_bf16(s, (size_t)cols, dst + (size_t)i * cols);
    }
}

/* The same rounding kept in fp32 (the emulated path). */
static void round_bf16(const float *src, int rows, int cols, int ld, float *dst)
{
    for (int i = 0; i < rows; i++) {
        const float *s = src + (size_t)i * ld;
        float *d = dst + (size_t)i * cols;
        for (int j = 0; j < cols; j++) d[j] = cdb_bf16_to_f32(cdb_f32_to_bf16(s[j]));
    }
}

/* md of the (rows, cols) operand op(X), stored as (rows, cols) or,
** transposed, as (cols, rows), with row stride ld. */
static dnnl_status_t md_op(dnnl_memory_desc_t *md, int rows, int cols, int trans, int ld,
                           dnnl_data_type_t dt)
{
    dnnl_dims_t dims = {0}, strides = {0};
    dims[0] = rows, dims[1] = cols;
    strides[0] = trans ? 1 : ld;
    strides[1] = trans ? ld : 1;
    return dnnl_memory_desc_init_by_strides(md, 2, dims, dt, strides);
}

/* Creates the primitive for key (CLIPDB_ENOTFOUND: no such matmul here). */
static int bf16_make(const bf16_key *k, bf16_prim *out)
{
    const int u8 = k->types == MM_U8S8;
    dnnl_memory_desc_t smd, wmd, dmd;
    dnnl_dims_t ddims = {0}, dstr = {0};
    dnnl_matmul_desc_t mm;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_status_t s;
    int rc = CLIPDB_ERROR;

    ddims[0] = k->m, ddims[1] = k->n;
    dstr[0] = k->ldc, dstr[1] = 1;
    if (md_op(&smd, k->m, k->k, k->ta, k->lda, u8 ? dnnl_u8 : dnnl_bf16) ||
        md_op(&wmd, k->k, k->n, k->tb, k->ldb, u8 ? dnnl_s8 : dnnl_bf16) ||
        dnnl_memory_desc_init_by_strides(&dmd, 2, ddims, u8 ? dnnl_s32 : dnnl_f32, dstr) ||
        dnnl_matmul_desc_init(&mm, &smd, &wmd, NULL, &dmd) || dnnl_primitive_attr_create(&attr))
        goto cleanup;
    if (dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user) ||
        (k->alpha != 1.0f && dnnl_primitive_attr_set_output_scales(attr, 1, 0, &k->alpha)))
        goto cleanup;
    if (k->beta != 0.0f && (dnnl_post_ops_create(&po) || dnnl_post_ops_append_sum(po, k->beta) ||
                            dnnl_primitive_attr_set_post_ops(attr, po)))
        goto cleanup;
    s = dnnl_primitive_desc_create(&pd, &mm, attr, engine, NULL);
    if (s == dnnl_unimplemented) {
        rc = CLIPDB_ENOTFOUND;
        goto cleanup;
    }
    if (s) goto cleanup;
    out->key = *k;
    out->scratch =
        dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0));
    if (dnnl_primitive_create(&out->prim, pd) == dnnl_success) rc = CLIPDB_OK;
cleanup:
    dnnl_primitive_desc_destroy(pd);
    dnnl_post_ops_destroy(po);
    dnnl_primitive_attr_destroy(attr);
    return rc;
}

/* The cached primitive for key, made on first use; *owned = 1 when the
** table is full and the caller must destroy it. */
static int bf16_get(const bf16_key *k, bf16_prim *out, int *owned)
{
    int rc = CLIPDB_OK;
    size_t i;
    *owned = 0;
    pthread_mutex_lock(&B16.mu);
    if (k->types == MM_BF16 ? B16.emulate : B16.no_u8s8) {
        rc = CLIPDB_ENOTFOUND;
        goto done;
    }
    for (i = 0; i < B16.n; i++)
        if (!memcmp(&B16.tab[i].key, k, sizeof *k)) {
            *out = B16.tab[i];
            goto done;
        }
    if ((rc = bf16_make(k, out))) {
        if (rc == CLIPDB_ENOTFOUND) *(k->types == MM_BF16 ? &B16.emulate : &B16.no_u8s8) = 1;
        goto done;
    }
    if (B16.n < BF16_CACHE_MAX && !cdb_grow((void **)&B16.tab, &B16.cap, B16.n + 1, sizeof *B16.tab))
        B16.tab[B16.n++] = *out;
    else
        *owned = 1;
done:
    pthread_mutex_unlock(&B16.mu);
    return rc;
}

/* Runs p on the operands a, b (bf16, or u8 and s8) and C (f32, or s32). */
static int bf16_run(const bf16_prim *p, const void *a, const void *b, void *C)
{
    const_dnnl_primitive_desc_t pd;
    dnnl_memory_t ms = NULL, mw = NULL, md = NULL, msp = NULL;
    dnnl_stream_t strm = NULL;
    dnnl_exec_arg_t args[4];
    void *scratch = NULL;
    int nargs = 3, rc = CLIPDB_ERROR;

    if (dnnl_primitive_get_primitive_desc(p->prim, &pd) ||
        dnnl_memory_create(&ms, dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0), engine,
                           (void *)a) ||
        dnnl_memory_create(&mw, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0),
                           engine, (void *)b) ||
        dnnl_memory_create(&md, dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0), engine,
                           C) ||
        dnnl_stream_create(&strm, engine, dnnl_stream_default_flags))
        goto cleanup;
    args[0].arg = DNNL_ARG_SRC, args[0].memory = ms;
    args[1].arg = DNNL_ARG_WEIGHTS, args[1].memory = mw;
    args[2].arg = DNNL_ARG_DST, args[2].memory = md;
    if (p->scratch) {
        if (!(scratch = aligned_alloc(64, (p->scratch + 63) / 64 * 64)) ||
            dnnl_memory_create(&msp, dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0),
                               engine, scratch))
            goto cleanup;
        args[3].arg = DNNL_ARG_SCRATCHPAD, args[3].memory = msp;
        nargs = 4;
    }
    if (!dnnl_primitive_execute(p->prim, strm, nargs, args) && !dnnl_stream_wait(strm))
        rc = CLIPDB_OK;
cleanup:
    dnnl_stream_destroy(strm);
    dnnl_memory_destroy(ms);
    dnnl_memory_destroy(mw);
    dnnl_memory_destroy(md);
    dnnl_memory_destroy(msp);
    free(scratch);
    return rc;
}

/* C (m, n) = alpha * op(a) op(b) + beta * C on bf16 operands (a: (m, k),
** or (k, m) when ta, row stride lda; b: (k, n), or (n, k) when tb, row
** stride ldb), through the cached primitive of the shape.
** CLIPDB_ENOTFOUND (message in e) where oneDNN has no bf16 matmul. */
static int bf16_matmul(int ta, int tb, int m, int n, int k, float alpha, const uint16_t *a,
                       int lda, const uint16_t *b, int ldb, float beta, float *C, int ldc,
                       cdb_err *e)
{
    const bf16_key key = {ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, omp_get_max_threads(),
                          MM_BF16};
    bf16_prim p;
    int rc, owned = 0;
    if ((rc = get_engine(e))) return rc;
    rc = bf16_get(&key, &p, &owned);
    if (rc == CLIPDB_ENOTFOUND)
        return cdb_err_set(e, CLIPDB_ENOTFOUND, "oneDNN: no bf16 matmul on %s", cdb_onednn_isa());
    if (rc) return cdb_err_set(e, CLIPDB_ERROR, "oneDNN: bf16 matmul (%d x %d x %d) failed", m, n, k);
    // op(a) (m, k) bf16 @ op(b) (k, n) bf16 -> C (m, n) f32, ldc
    if (bf16_run(&p, a, b, C))
        rc = cdb_err_set(e, CLIPDB_ERROR, "oneDNN: bf16 matmul (%d x %d x %d) failed", m, n, k);
    if (owned) dnnl_primitive_destroy(p.prim);
    return rc;
}

int cdb_onednn_gemm_bf16(int m, int n, int k, const uint16_t *A, const uint16_t *B, float *C,
                         cdb_err *e)
{
    /* A (m, k) as stored; B stored (n, k): op(B) = B^T, transposed */
    return bf16_matmul(0, 1, m, n, k, 1.0f, A, k, B, k, 0.0f, C, n, e);
}

/* u8 x s8 -> s32 through the cached matmul primitive of the shape, which
** oneDNN runs on AMX where the CPU has it (brg:avx512_core_amx_int8);
** dnnl_gemm_u8s8s32 where oneDNN has no such matmul. Measured one thread,
** (256, 256, 512), the sq8 tile shape, best of 200: on an AMX Xeon 32.6 us
** (2,061 GOP/s) against dnnl_gemm_u8s8s32's 156.1 us (430); capped at
** AVX512_CORE_VNNI 90.2 against 105.9 us; AVX2 327.5 against 318.6 us. The
** same integers either way. */
int cdb_onednn_gemm_u8s8s32(int m, int n, int k, const uint8_t *A, const int8_t *B, int32_t *C,
                            cdb_err *e)
{
    /* A (m, k) as stored; B stored (n, k): op(B) = B^T, transposed */
    const bf16_key key = {0, 1, m, n, k, k, k, n, 1.0f, 0.0f, omp_get_max_threads(), MM_U8S8};
    const int32_t zero = 0;
    bf16_prim p;
    dnnl_status_t s;
    int rc, owned = 0;
    if ((rc = get_engine(e))) return rc;
    rc = bf16_get(&key, &p, &owned);
    if (rc == CLIPDB_OK) {
        // A (m, k) u8 @ B^T (k, n) s8 -> C (m, n) s32
        if (bf16_run(&p, A, B, C))
            rc = cdb_err_set(e, CLIPDB_ERROR, "oneDNN: u8s8s32 matmul (%d x %d x %d) failed", m,
                             n, k);
        if (owned) dnnl_primitive_destroy(p.prim);
        return rc;
    }
    if (rc != CLIPDB_ENOTFOUND)
        return cdb_err_set(e, CLIPDB_ERROR, "oneDNN: u8s8s32 matmul (%d x %d x %d) failed", m, n, k);
    /* row-major: A (m, k) 'N', B stored (n, k) 'T', fixed zero offsets */
    s = dnnl_gemm_u8s8s32('N', 'T', 'F', m, n, k, 1.0f, A, k, 0, B, k, 0, 0.0f, C, n, &zero);
    return s == dnnl_success ? CLIPDB_OK : dnnl_fail(e, "u8s8s32 gemm", s);
}

/* The bf16 copies of cdb_onednn_sgemm_bf16's operands live in buffers kept
** between calls (OPBUF_KEEP of them, one per thread converting at once):
** a fresh malloc of the ResNet's im2col copy (tens of MB) is a fresh mmap,
** and faulting its pages in cost a bf16 training step more kernel time than
** the conversion itself saves. opbuf_take returns a kept buffer of at least
** `bytes` (its size in *cap) or a new one; opbuf_give keeps the largest. */
#define OPBUF_KEEP 2
static struct {
    pthread_mutex_t mu;
    void *p[OPBUF_KEEP];
    size_t cap[OPBUF_KEEP];
} OPBUF = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void *opbuf_take(size_t bytes, size_t *cap)
{
    void *p = NULL, *drop = NULL;
    int i, best = -1, small = -1;
    pthread_mutex_lock(&OPBUF.mu);
    for (i = 0; i < OPBUF_KEEP; i++) {
        if (!OPBUF.p[i]) continue;
        if (OPBUF.cap[i] >= bytes && (best < 0 || OPBUF.cap[i] < OPBUF.cap[best])) best = i;
        if (small < 0 || OPBUF.cap[i] < OPBUF.cap[small]) small = i;
    }
    if (best >= 0) {
        p = OPBUF.p[best], *cap = OPBUF.cap[best];
        OPBUF.p[best] = NULL;
    } else if (small >= 0) { /* too small for this call: make room for a larger one */
        drop = OPBUF.p[small];
        OPBUF.p[small] = NULL;
    }
    pthread_mutex_unlock(&OPBUF.mu);
    free(drop);
    if (!p && (p = malloc(bytes ? bytes : 1))) *cap = bytes;
    return p;
}

static void opbuf_give(void *p, size_t cap)
{
    int i, slot = -1; /* an empty slot, else the smallest kept buffer */
    pthread_mutex_lock(&OPBUF.mu);
    for (i = 0; i < OPBUF_KEEP && (slot < 0 || OPBUF.p[slot]); i++)
        if (slot < 0 || !OPBUF.p[i] || OPBUF.cap[i] < OPBUF.cap[slot]) slot = i;
    if (!OPBUF.p[slot] || OPBUF.cap[slot] < cap) {
        void *old = OPBUF.p[slot];
        OPBUF.p[slot] = p, OPBUF.cap[slot] = cap;
        p = old;
    }
    pthread_mutex_unlock(&OPBUF.mu);
    free(p);
}

int cdb_onednn_sgemm_bf16(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                          const float *A, int lda, const float *B, int ldb, float beta, float *C,
                          int ldc, cdb_err *e)
{
    /* stored shapes: A (m, k) or, transposed, (k, m); B (k, n) or (n, k) */
    const int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    const size_t na = (size_t)m * k, nb = (size_t)k * n;
    void *buf = NULL;
    int rc;

    if (m <= 0 || n <= 0) return CLIPDB_OK;
    if (k <= 0) { /* C = beta C (op(A) op(B) is empty) */
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                C[(size_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(size_t)i * ldc + j];
        return CLIPDB_OK;
    }
    if ((rc = get_engine(e))) return rc;
    if (!cdb_onednn_bf16_native()) { /* emulated: the rounding, then the fp32 gemm */
        float *a = buf = cdb_malloc_array(na + nb, sizeof(float));
        if (!a) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (bf16 operands)");
        round_bf16(A, ar, ac, lda, a);
        round_bf16(B, br, bc, ldb, a + na);
        (void)dnnl_sgemm(ta == CDB_TRANS ? 'T' : 'N', tb == CDB_TRANS ? 'T' : 'N', m, n, k, alpha,
                         a, ac, a + na, bc, beta, C, ldc);
        free(buf);
        return CLIPDB_OK;
    }
    return cdb_onednn_gemm_bf16_ops(ta, tb, m, n, k, alpha, A, NULL, lda, B, NULL, ldb, beta, C,
                                    ldc, e);
}

int cdb_onednn_gemm_bf16_ops(cdb_trans ta, cdb_trans tb, int m, int n, int k, float alpha,
                             const float *A, const uint16_t *Ab, int lda, const float *B,
                             const uint16_t *Bb, int ldb, float beta, float *C, int ldc,
                             cdb_err *e)
{
    /* stored shapes: A (m, k) or, transposed, (k, m); B (k, n) or (n, k) */
    const int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
    const size_t na = Ab ? 0 : (size_t)m * k, nb = Bb ? 0 : (size_t)k * n;
    void *buf = NULL;
    size_t cap = 0;
    int rc;

    if (m <= 0 || n <= 0) return CLIPDB_OK;
    if (k <= 0 || !(Ab || A) || !(Bb || B))
        return cdb_err_set(e, CLIPDB_EINVAL, "bf16 gemm: k %d or an operand missing", k);
    if ((rc = get_engine(e))) return rc;
    if (na + nb > 0 && (na + nb < na || na + nb > SIZE_MAX / sizeof(uint16_t) ||
                        !(buf = opbuf_take((na + nb) * sizeof(uint16_t), &cap))))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (bf16 operands)");
    /* the fp32 operands rounded into dense copies; bf16 ones used in place */
    if (!Ab) {
        to_bf16(A, ar, ac, lda, buf);
        Ab = buf, lda = ac;
    }
    if (!Bb) {
        to_bf16(B, br, bc, ldb, (uint16_t *)buf + na);
        Bb = (uint16_t *)buf + na, ldb = bc;
    }
    rc = bf16_matmul(ta == CDB_TRANS, tb == CDB_TRANS, m, n, k, alpha, Ab, lda, Bb, ldb, beta, C,
                     ldc, e);
    if (buf) opbuf_give(buf, cap);
    return rc;
}

int cdb_onednn_bf16_native(void)
{
    bf16_prim p;
    int owned = 0;
    const bf16_key key = {0, 0, 1, 1, 1, 1, 1, 1, 1.0f, 0.0f, omp_get_max_threads(), MM_BF16};
    cdb_err e;
    cdb_err_clear(&e);
    if (get_engine(&e) || bf16_get(&key, &p, &owned)) return 0;
    if (owned) dnnl_primitive_destroy(p.prim);
    return 1;
}
