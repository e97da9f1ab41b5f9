/*
** encoder.cu: the CLIP towers on the GPU, the CUDA counterpart of
** src/model/transformer.c and the same math step for step:
**   block:  h = ln_1(x); qkv = h @ Wqkv^T (+ b, fused into attention);
**           a = softmax(q k^T / 8) v per head (causal for text);
**           [last block: keep one token per sequence];
**           x += a @ Wo^T; x += bo; h = ln_2(x); m = quick_gelu(h @ W1^T + b1);
**           x += m @ W2^T; x += b2
**   vision: im2col(pixels) @ conv1^T, [class; patches] + pos, ln_pre, blocks,
**           ln_post(class token) @ proj
**   text:   tok_emb[ids] + pos, causal blocks, ln_final(end token) @ proj
** GEMMs: cuBLAS GemmEx with fp32 accumulation; weights and GEMM inputs are
** fp32 or bf16 (tensor cores), the residual stream and every reduction fp32.
** Fused kernels: layer norm (with the preceding bias add), bias + QuickGELU,
** and softmax-attention (scores, softmax and the value sum of one (sequence,
** head) in shared memory). Weights are uploaded once per handle;
** activations live in buffers grown on demand and reused.
**
** Shapes: d = width, f = MLP width, T = tokens per sequence, nseq =
** sequences of a batch, rows = nseq * T, e = embedding size, hd = 64.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/common.cuh"

extern "C" {
#include "model/model.h"
#include "model/transformer.h"
}

#define ATT_THREADS 128
#define LN_THREADS 256
#define VISION_BATCH 256   /* images per GPU forward pass */
#define TEXT_BATCH 256     /* texts per GPU forward pass */
#define ATT_MAX_T 432      /* tokens per sequence the attention kernel takes: K, V
                           ** and the scores of one head in 227 KB of shared memory */

typedef struct gblock {
    float *ln1_w, *ln1_b, *bqkv, *bo, *ln2_w, *ln2_b, *fc1_b, *fc2_b; /* fp32 */
    void *wqkv;  /* (3d, d): Wq | Wk | Wv rows */
    void *wo;    /* (d, d) */
    void *fc1;   /* (f, d) */
    void *fc2;   /* (d, f) */
} gblock;

typedef struct gtower {
    int d, f, layers;
    gblock *b;              /* [layers], host array of device pointers */
    float *lnp_w, *lnp_b;   /* (d) */
    void *proj;             /* (e, d): y = x @ proj^T */
} gtower;

struct cdb_cuda_model {
    cdb_cuda_dtype dt;
    int e;
    int has_vision, has_text;
    gtower vt, tt;
    int S, P, G, Tv;
    void *patch_w;                      /* (d, 3*P*P) */
    float *class_emb, *pos_v, *ln_pre_w, *ln_pre_b;
    int C, vocab;
    const cdb_text *text;               /* the host tower (checks of the ids) */
    float *tok_emb, *pos_t;             /* (vocab, d), (C, d) fp32 */
    cublasHandle_t blas;
    cudaStream_t st;
    void **allocs; size_t n_allocs, cap_allocs; /* every weight buffer */
    /* activations */
    float *pix;  size_t cap_pix;   /* (nb, 3, S, S) */
    float *x;    size_t cap_x;     /* (rows, d) residual */
    float *x2;   size_t cap_x2;    /* (nseq, d) kept tokens */
    void *h;     size_t cap_h;     /* (rows, d) dt: layer-norm output */
    float *qkv;  size_t cap_qkv;   /* (rows, 3d); patch embeddings */
    void *att;   size_t cap_att;   /* (rows, d) dt */
    float *mlpf; size_t cap_mlpf;  /* (rows, f) */
    void *mlpa;  size_t cap_mlpa;  /* (rows, f) dt; image patches */
    float *out;  size_t cap_out;   /* (nseq, e) */
    int *ids;    size_t cap_ids;   /* (nseq, L) */
    int *qpos;   size_t cap_qpos;  /* (nseq) */
};

/* ---- kernels ------------------------------------------------------------------ */

/* Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets it. */
__device__ float block_sum(float v, float *red)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads(); /* red is reused by the next call */
    if (lane == 0) red[w] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Row r of x (rows, n): x += bias (if any); y = (x - mean) / sqrt(var + eps) * w + b.
** y may be x (each thread reads and writes its own columns). */
template <typename T>
__global__ void __launch_bounds__(LN_THREADS) ln_kernel(float *x, const float *bias,
                                                        const float *w, const float *b, T *y,
                                                        int n)
{
    __shared__ float red[32];
    float *xr = x + (size_t)blockIdx.x * n;
    T *yr = y + (size_t)blockIdx.x * n;
    float s = 0.0f, mean, var, rstd;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = xr[j];
        if (bias) xr[j] = v = v + bias[j];
        s += v;
    }
    mean = block_sum(s, red) / (float)n;
    s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float dl = xr[j] - mean;
        s += dl * dl;
    }
    var = block_sum(s, red) / (float)n;
    rstd = 1.0f / sqrtf(var + CDB_LN_EPS);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        cdb_st(&yr[j], (xr[j] - mean) * rstd * w[j] + b[j]);
}

/* out (rows, n) = quick_gelu(in + bias), quick_gelu(v) = v * sigmoid(1.702 v). */
template <typename T>
__global__ void bias_gelu(const float *in, const float *bias, T *out, size_t total, int n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = in[i] + bias[i % n];
        cdb_st(&out[i], v / (1.0f + expf(-1.702f * v)));
    }
}

/* x (rows, n) += bias (n). */
__global__ void add_bias(float *x, const float *bias, size_t total, int n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += bias[i % n];
}

/* Softmax-attention of one (sequence s = blockIdx.x, head = blockIdx.y).
** qkv (nseq*T, 3d) without biases; bqkv (3d). K (T, 64) and V (T, 64) of the
** head go to shared memory (K rows padded to 65 floats: no bank conflicts);
** each warp takes query rows in turn: lane j scores keys j, j+32, ...,
** softmax(scores / 8) by warp shuffles, then lane c sums columns c and c+32
** of V. qpos: NULL for every row (att (nseq*T, d)), else the one row qpos[s]
** (att (nseq, d)). Causal: row i sees keys 0..i. */
template <typename T>
__global__ void __launch_bounds__(ATT_THREADS) attention(const float *qkv, const float *bqkv,
                                                         T *att, int d, int Tn, int causal,
                                                         const int *qpos)
{
    extern __shared__ float sm[];
    const int s = blockIdx.x, hh = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int nw = ATT_THREADS / 32, ld = 3 * d, off = hh * CDB_HEAD_DIM;
    float *K = sm;                                 /* (Tn, 65) */
    float *V = K + (size_t)Tn * 65;                /* (Tn, 64) */
    float *Qw = V + (size_t)Tn * 64 + w * CDB_HEAD_DIM; /* (64) this warp's query */
    float *P = V + (size_t)Tn * 64 + nw * CDB_HEAD_DIM + (size_t)w * Tn; /* (Tn) */
    const float *base = qkv + (size_t)s * Tn * ld;
    const float scale = 1.0f / sqrtf((float)CDB_HEAD_DIM);
    const int nq = qpos ? 1 : Tn;
    for (int i = threadIdx.x; i < Tn * CDB_HEAD_DIM; i += blockDim.x) {
        int t = i / CDB_HEAD_DIM, c = i % CDB_HEAD_DIM;
        K[t * 65 + c] = base[(size_t)t * ld + d + off + c] + bqkv[d + off + c];
        V[t * 64 + c] = base[(size_t)t * ld + 2 * d + off + c] + bqkv[2 * d + off + c];
    }
    __syncthreads();
    for (int qi = w; qi < nq; qi += nw) {
        const int i = qpos ? qpos[s] : qi;         /* token of this query row */
        const int nk = causal ? i + 1 : Tn;
        float mx = -INFINITY, sum = 0.0f, o0 = 0.0f, o1 = 0.0f;
        Qw[lane] = base[(size_t)i * ld + off + lane] + bqkv[off + lane];
        Qw[lane + 32] = base[(size_t)i * ld + off + lane + 32] + bqkv[off + lane + 32];
        __syncwarp();
        for (int j = lane; j < nk; j += 32) {
            float dot = 0.0f;
#pragma unroll 16
            for (int c = 0; c < CDB_HEAD_DIM; c++) dot += Qw[c] * K[j * 65 + c];
            P[j] = dot;
            mx = fmaxf(mx, dot);
        }
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        for (int j = lane; j < nk; j += 32) { /* as cdb_softmax: exp(scale v - scale max) */
            float p = expf(P[j] * scale - mx * scale);
            P[j] = p;
            sum += p;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        __syncwarp();
        for (int j = 0; j < nk; j++) {
            float p = P[j];
            o0 += p * V[j * 64 + lane];
            o1 += p * V[j * 64 + lane + 32];
        }
        {
            const float inv = 1.0f / sum;
            T *dst = att + ((size_t)s * nq + (qpos ? 0 : qi)) * d + off;
            cdb_st(&dst[lane], o0 * inv);
            cdb_st(&dst[lane + 32], o1 * inv);
        }
        __syncwarp(); /* Qw and P are rewritten by the next row */
    }
}

/* pixels (nb, 3, S, S) -> patches (nb*G*G, 3*P*P) in conv1's (c, ky, kx) order. */
template <typename T>
__global__ void im2col(const float *pix, T *patches, int nb, int S, int P, int G)
{
    const int np = G * G, K = 3 * P * P;
    const size_t total = (size_t)nb * np * K;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / K;
        int col = (int)(i % K), img = (int)(row / np), p = (int)(row % np);
        int gy = p / G, gx = p % G, c = col / (P * P), rem = col % (P * P);
        int ky = rem / P, kx = rem % P;
        cdb_st(&patches[i], pix[(((size_t)img * 3 + c) * S + (size_t)gy * P + ky) * S +
                                (size_t)gx * P + kx]);
    }
}

/* x (nb*T, d): per image [class_emb; patch embeddings pe (nb*(T-1), d)] + pos (T, d). */
__global__ void embed_vision(float *x, const float *pe, const float *cls, const float *pos,
                             int nb, int Tn, int d)
{
    const size_t total = (size_t)nb * Tn * d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t tok = i / d;
        int c = (int)(i % d), img = (int)(tok / Tn), t = (int)(tok % Tn);
        float v = t == 0 ? cls[c] : pe[((size_t)img * (Tn - 1) + t - 1) * d + c];
        x[i] = v + pos[(size_t)t * d + c];
    }
}

/* x (cnt*L, d) = tok (vocab, d)[ids (cnt, L)] + pos (C, d)[position]. */
__global__ void embed_text(float *x, const int *ids, const float *tok, const float *pos, int cnt,
                           int L, int d)
{
    const size_t total = (size_t)cnt * L * d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / d;
        int c = (int)(i % d), j = (int)(t % L);
        x[i] = tok[(size_t)ids[t] * d + c] + pos[(size_t)j * d + c];
    }
}

/* y (nseq, d) = x (nseq*T, d) rows s*T + qpos[s]. */
__global__ void gather_rows(const float *x, float *y, const int *qpos, int nseq, int Tn, int d)
{
    const size_t total = (size_t)nseq * d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int s = (int)(i / d), c = (int)(i % d);
        y[i] = x[((size_t)s * Tn + qpos[s]) * d + c];
    }
}

static unsigned grid_for(size_t total)
{
    size_t g = (total + 255) / 256;
    return (unsigned)(g > 65535 ? 65535 : g < 1 ? 1 : g);
}

/* ---- host side ---------------------------------------------------------------- */

static int track(cdb_cuda_model *g, void *p, cdb_err *e)
{
    if (g->n_allocs == g->cap_allocs) {
        size_t nc = g->cap_allocs ? g->cap_allocs * 2 : 64;
        void **na = (void **)realloc(g->allocs, nc * sizeof *na);
        if (!na) {
            cudaFree(p);
            return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        }
        g->allocs = na;
        g->cap_allocs = nc;
    }
    g->allocs[g->n_allocs++] = p;
    return CLIPDB_OK;
}

/* *out = a new device copy of n fp32 values as dt. */
static int up(cdb_cuda_model *g, const float *src, size_t n, cdb_cuda_dtype dt, void **out,
              cdb_err *e)
{
    int rc = CLIPDB_OK;
    void *p = NULL;
    *out = NULL;
    CU(cudaMalloc(&p, n * cdb_cu_size(dt)), "GPU weights");
    if ((rc = track(g, p, e)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_cu_upload(p, dt, src, n, g->st, e)) != CLIPDB_OK) goto cleanup;
    *out = p;
cleanup:
    return rc;
}
static int upf(cdb_cuda_model *g, const float *src, size_t n, float **out, cdb_err *e)
{
    return up(g, src, n, CDB_CUDA_F32, (void **)out, e);
}

static int upload_tower(cdb_cuda_model *g, const cdb_tower *t, int e_dim, gtower *o, cdb_err *e)
{
    int rc = CLIPDB_OK;
    const size_t d = (size_t)t->width, f = (size_t)t->mlp, es = cdb_cu_size(g->dt);
    float *projT = NULL;
    o->d = t->width;
    o->f = t->mlp;
    o->layers = t->layers;
    if (!(o->b = (gblock *)calloc((size_t)t->layers, sizeof *o->b)))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    for (int l = 0; l < t->layers; l++) {
        const cdb_block *b = &t->blocks[l];
        gblock *gb = &o->b[l];
        if ((rc = upf(g, b->ln1_w, d, &gb->ln1_w, e)) || (rc = upf(g, b->ln1_b, d, &gb->ln1_b, e)) ||
            (rc = upf(g, b->bo, d, &gb->bo, e)) || (rc = upf(g, b->ln2_w, d, &gb->ln2_w, e)) ||
            (rc = upf(g, b->ln2_b, d, &gb->ln2_b, e)) || (rc = upf(g, b->fc1_b, f, &gb->fc1_b, e)) ||
            (rc = upf(g, b->fc2_b, d, &gb->fc2_b, e)) ||
            (rc = up(g, b->wo, d * d, g->dt, &gb->wo, e)) ||
            (rc = up(g, b->fc1_w, f * d, g->dt, &gb->fc1, e)) ||
            (rc = up(g, b->fc2_w, d * f, g->dt, &gb->fc2, e)))
            goto cleanup;
        /* Wqkv (3d, d) and bqkv (3d): the three projections stacked */
        CU(cudaMalloc(&gb->wqkv, 3 * d * d * es), "GPU weights");
        if ((rc = track(g, gb->wqkv, e))) goto cleanup;
        CU(cudaMalloc((void **)&gb->bqkv, 3 * d * sizeof(float)), "GPU weights");
        if ((rc = track(g, gb->bqkv, e))) goto cleanup;
        if ((rc = cdb_cu_upload(gb->wqkv, g->dt, b->wq, d * d, g->st, e)) ||
            (rc = cdb_cu_upload((char *)gb->wqkv + d * d * es, g->dt, b->wk, d * d, g->st, e)) ||
            (rc = cdb_cu_upload((char *)gb->wqkv + 2 * d * d * es, g->dt, b->wv, d * d, g->st, e)) ||
            (rc = cdb_cu_upload(gb->bqkv, CDB_CUDA_F32, b->bq, d, g->st, e)) ||
            (rc = cdb_cu_upload(gb->bqkv + d, CDB_CUDA_F32, b->bk, d, g->st, e)) ||
            (rc = cdb_cu_upload(gb->bqkv + 2 * d, CDB_CUDA_F32, b->bv, d, g->st, e)))
            goto cleanup;
    }
    if ((rc = upf(g, t->ln_post_w, d, &o->lnp_w, e)) || (rc = upf(g, t->ln_post_b, d, &o->lnp_b, e)))
        goto cleanup;
    if (t->proj_transposed) { /* (e, d) already */
        rc = up(g, t->proj, (size_t)e_dim * d, g->dt, &o->proj, e);
    } else { /* (d, e) -> (e, d) */
        if (!(projT = (float *)cdb_malloc_array((size_t)e_dim * d, sizeof *projT))) {
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        for (size_t i = 0; i < d; i++)
            for (size_t j = 0; j < (size_t)e_dim; j++) projT[j * d + i] = t->proj[i * e_dim + j];
        rc = up(g, projT, (size_t)e_dim * d, g->dt, &o->proj, e);
    }
cleanup:
    free(projT);
    return rc;
}

void cdb_cuda_model_free(cdb_cuda_model *g)
{
    if (!g) return;
    for (size_t i = 0; i < g->n_allocs; i++) cudaFree(g->allocs[i]);
    free(g->allocs);
    free(g->vt.b);
    free(g->tt.b);
    cudaFree(g->pix);
    cudaFree(g->x);
    cudaFree(g->x2);
    cudaFree(g->h);
    cudaFree(g->qkv);
    cudaFree(g->att);
    cudaFree(g->mlpf);
    cudaFree(g->mlpa);
    cudaFree(g->out);
    cudaFree(g->ids);
    cudaFree(g->qpos);
    if (g->blas) cublasDestroy(g->blas);
    if (g->st) cudaStreamDestroy(g->st);
    free(g);
}

int cdb_cuda_model_new(cdb_cuda_model **out, const clipdb_model *m, cdb_cuda_dtype dt, cdb_err *e)
{
    int rc = CLIPDB_OK;
    cdb_cuda_model *g = NULL;
    *out = NULL;
    if (!m || !m->st)
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU encoder: the model has no weights");
    if (dt == CDB_CUDA_F16)
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU encoder: fp32 or bf16 only");
    if ((rc = cdb_cuda_probe(e)) != CLIPDB_OK) return rc;
    if (!(g = (cdb_cuda_model *)calloc(1, sizeof *g)))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    g->dt = dt;
    g->e = m->embed_dim;
    CU(cudaStreamCreateWithFlags(&g->st, cudaStreamNonBlocking), "GPU stream");
    CUBLAS(cublasCreate(&g->blas), "cuBLAS");
    CUBLAS(cublasSetStream(g->blas, g->st), "cuBLAS");
    if (m->vision.t.blocks) {
        const cdb_vision *v = &m->vision;
        const size_t d = (size_t)v->t.width;
        g->has_vision = 1;
        g->S = v->image_size;
        g->P = v->patch;
        g->G = v->grid;
        g->Tv = v->n_pos;
        if (g->Tv > ATT_MAX_T) {
            rc = cdb_err_set(e, CLIPDB_ELIMIT, "GPU encoder: %d image tokens (at most %d)", g->Tv,
                             ATT_MAX_T);
            goto cleanup;
        }
        if ((rc = upload_tower(g, &v->t, g->e, &g->vt, e)) ||
            (rc = up(g, v->patch_w, d * 3 * v->patch * v->patch, dt, &g->patch_w, e)) ||
            (rc = upf(g, v->class_emb, d, &g->class_emb, e)) ||
            (rc = upf(g, v->pos_emb, (size_t)v->n_pos * d, &g->pos_v, e)) ||
            (rc = upf(g, v->ln_pre_w, d, &g->ln_pre_w, e)) ||
            (rc = upf(g, v->ln_pre_b, d, &g->ln_pre_b, e)))
            goto cleanup;
    }
    if (m->text.t.blocks) {
        const cdb_text *t = &m->text;
        const size_t d = (size_t)t->t.width;
        g->has_text = 1;
        g->text = t;
        g->C = t->context;
        g->vocab = t->vocab;
        if (g->C > ATT_MAX_T) {
            rc = cdb_err_set(e, CLIPDB_ELIMIT, "GPU encoder: context %d (at most %d)", g->C,
                             ATT_MAX_T);
            goto cleanup;
        }
        if ((rc = upload_tower(g, &t->t, g->e, &g->tt, e)) ||
            (rc = upf(g, t->tok_emb, (size_t)t->vocab * d, &g->tok_emb, e)) ||
            (rc = upf(g, t->pos_emb, (size_t)t->context * d, &g->pos_t, e)))
            goto cleanup;
    }
cleanup:
    if (rc) cdb_cuda_model_free(g);
    else *out = g;
    return rc;
}

/* Y (rows, out) [ldy] = X (rows, in) @ W^T (in, out) + beta * Y; X, W in dt.
** Column-major view: Y^T (out, rows) = W (out, in) . X^T (in, rows). */
static int linear(cdb_cuda_model *g, const void *X, const void *W, int rows, int n_out, int n_in,
                  float beta, float *Y, cdb_err *e)
{
    const float one = 1.0f;
    const cudaDataType_t t = cdb_cu_type(g->dt);
    return cdb_cublas_check(cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, n_in,
                                         &one, W, t, n_in, X, t, n_in, &beta, Y, CUDA_R_32F,
                                         n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                            "GPU encoder: GEMM", e);
}

/* Activations for rows tokens of nseq sequences of T. */
static int reserve(cdb_cuda_model *g, const gtower *t, size_t rows, size_t nseq, cdb_err *e)
{
    const size_t es = cdb_cu_size(g->dt), d = (size_t)t->d, f = (size_t)t->f;
    int rc;
    if ((rc = cdb_cu_grow((void **)&g->x, &g->cap_x, rows * d * 4, e)) ||
        (rc = cdb_cu_grow((void **)&g->x2, &g->cap_x2, nseq * d * 4, e)) ||
        (rc = cdb_cu_grow(&g->h, &g->cap_h, rows * d * es, e)) ||
        (rc = cdb_cu_grow((void **)&g->qkv, &g->cap_qkv, rows * 3 * d * 4, e)) ||
        (rc = cdb_cu_grow(&g->att, &g->cap_att, rows * d * es, e)) ||
        (rc = cdb_cu_grow((void **)&g->mlpf, &g->cap_mlpf, rows * f * 4, e)) ||
        (rc = cdb_cu_grow(&g->mlpa, &g->cap_mlpa, rows * f * es, e)) ||
        (rc = cdb_cu_grow((void **)&g->out, &g->cap_out, nseq * g->e * 4, e)) ||
        (rc = cdb_cu_grow((void **)&g->qpos, &g->cap_qpos, nseq * 4, e)))
        return rc;
    return CLIPDB_OK;
}

template <typename T> static void launch_ln(cdb_cuda_model *g, float *x, const float *bias,
                                            const float *w, const float *b, void *y, int rows, int n)
{
    ln_kernel<T><<<rows, LN_THREADS, 0, g->st>>>(x, bias, w, b, (T *)y, n);
}

/* y = ln(x [+ bias]) into the dt buffer y. */
static void ln_act(cdb_cuda_model *g, float *x, const float *bias, const float *w, const float *b,
                   void *y, int rows, int n)
{
    if (g->dt == CDB_CUDA_BF16) launch_ln<__nv_bfloat16>(g, x, bias, w, b, y, rows, n);
    else launch_ln<float>(g, x, bias, w, b, y, rows, n);
}

/* Runs the tower's blocks on g->x (nseq*T, d); the last keeps qpos (device,
** nseq) only, leaving g->x (nseq, d). */
static int run_blocks(cdb_cuda_model *g, const gtower *t, int nseq, int Tn, int causal, cdb_err *e)
{
    const int d = t->d, f = t->f, heads = d / CDB_HEAD_DIM;
    const size_t smem = ((size_t)Tn * 129 + (ATT_THREADS / 32) * ((size_t)CDB_HEAD_DIM + Tn)) * 4;
    int rc = CLIPDB_OK;
    int rows = nseq * Tn;
    const dim3 agrid((unsigned)nseq, (unsigned)heads);
    if (g->dt == CDB_CUDA_BF16)
        CU(cudaFuncSetAttribute(attention<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)smem), "GPU attention");
    else
        CU(cudaFuncSetAttribute(attention<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)smem), "GPU attention");
    for (int l = 0; l < t->layers; l++) {
        const gblock *b = &t->b[l];
        const int last = l == t->layers - 1;
        /* h (rows, d) = ln_1(x) */
        ln_act(g, g->x, NULL, b->ln1_w, b->ln1_b, g->h, rows, d);
        /* qkv (rows, 3d) = h (rows, d) @ Wqkv^T (d, 3d); biases added in attention */
        if ((rc = linear(g, g->h, b->wqkv, rows, 3 * d, d, 0.0f, g->qkv, e))) goto cleanup;
        /* att (rows', d) = softmax(q k^T / 8) v per head; rows' = rows, or nseq */
        if (g->dt == CDB_CUDA_BF16)
            attention<__nv_bfloat16><<<agrid, ATT_THREADS, smem, g->st>>>(
                g->qkv, b->bqkv, (__nv_bfloat16 *)g->att, d, Tn, causal, last ? g->qpos : NULL);
        else
            attention<float><<<agrid, ATT_THREADS, smem, g->st>>>(
                g->qkv, b->bqkv, (float *)g->att, d, Tn, causal, last ? g->qpos : NULL);
        if (last) { /* x (nseq*T, d) -> (nseq, d): the kept token of each sequence */
            float *tmp;
            gather_rows<<<grid_for((size_t)nseq * d), 256, 0, g->st>>>(g->x, g->x2, g->qpos, nseq,
                                                                        Tn, d);
            tmp = g->x; g->x = g->x2; g->x2 = tmp;
            { size_t c = g->cap_x; g->cap_x = g->cap_x2; g->cap_x2 = c; }
            rows = nseq;
        }
        /* x (rows, d) += att (rows, d) @ Wo^T (d, d) */
        if ((rc = linear(g, g->att, b->wo, rows, d, d, 1.0f, g->x, e))) goto cleanup;
        /* x += bo; h (rows, d) = ln_2(x) */
        ln_act(g, g->x, b->bo, b->ln2_w, b->ln2_b, g->h, rows, d);
        /* mlpf (rows, f) = h (rows, d) @ W1^T (d, f); mlpa = quick_gelu(mlpf + b1) */
        if ((rc = linear(g, g->h, b->fc1, rows, f, d, 0.0f, g->mlpf, e))) goto cleanup;
        if (g->dt == CDB_CUDA_BF16)
            bias_gelu<<<grid_for((size_t)rows * f), 256, 0, g->st>>>(
                g->mlpf, b->fc1_b, (__nv_bfloat16 *)g->mlpa, (size_t)rows * f, f);
        else
            bias_gelu<<<grid_for((size_t)rows * f), 256, 0, g->st>>>(
                g->mlpf, b->fc1_b, (float *)g->mlpa, (size_t)rows * f, f);
        /* x (rows, d) += mlpa (rows, f) @ W2^T (f, d); x += b2 */
        if ((rc = linear(g, g->mlpa, b->fc2, rows, d, f, 1.0f, g->x, e))) goto cleanup;
        add_bias<<<grid_for((size_t)rows * d), 256, 0, g->st>>>(g->x, b->fc2_b, (size_t)rows * d, d);
    }
    CU(cudaGetLastError(), "GPU encoder: kernel launch");
cleanup:
    return rc;
}

/* out_host (n, e) = ln_post(x (n, d)) @ proj^T (d, e), downloaded. */
static int project(cdb_cuda_model *g, const gtower *t, int n, float *out_host, cdb_err *e)
{
    int rc = CLIPDB_OK;
    ln_act(g, g->x, NULL, t->lnp_w, t->lnp_b, g->h, n, t->d);
    if ((rc = linear(g, g->h, t->proj, n, g->e, t->d, 0.0f, g->out, e))) goto cleanup;
    CU(cudaMemcpyAsync(out_host, g->out, (size_t)n * g->e * 4, cudaMemcpyDeviceToHost, g->st),
       "GPU encoder: download");
    CU(cudaStreamSynchronize(g->st), "GPU encoder");
cleanup:
    return rc;
}

int cdb_cuda_encode_images(cdb_cuda_model *g, const float *pixels, int n, float *out, cdb_err *e)
{
    int rc = CLIPDB_OK;
    if (!g || n < 0 || (n > 0 && (!pixels || !out)))
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU encoder: bad arguments");
    if (!g->has_vision) return cdb_err_set(e, CLIPDB_EINVAL, "vision tower is not loaded");
    const int d = g->vt.d, S = g->S, P = g->P, G = g->G, Tn = g->Tv, np = G * G, K = 3 * P * P;
    const size_t es = cdb_cu_size(g->dt);
    for (int i0 = 0; i0 < n; i0 += VISION_BATCH) {
        const int nb = n - i0 < VISION_BATCH ? n - i0 : VISION_BATCH;
        const size_t pix_n = (size_t)nb * 3 * S * S;
        if ((rc = reserve(g, &g->vt, (size_t)nb * Tn, (size_t)nb, e))) goto cleanup;
        if ((rc = cdb_cu_grow((void **)&g->pix, &g->cap_pix, pix_n * 4, e))) goto cleanup;
        /* the patch matrix (nb*np, K) lives in mlpa, its embeddings in qkv */
        if ((rc = cdb_cu_grow(&g->mlpa, &g->cap_mlpa, (size_t)nb * np * K * es, e))) goto cleanup;
        CU(cudaMemcpyAsync(g->pix, pixels + (size_t)i0 * 3 * S * S, pix_n * 4,
                           cudaMemcpyHostToDevice, g->st), "GPU encoder: upload");
        CU(cudaMemsetAsync(g->qpos, 0, (size_t)nb * 4, g->st), "GPU encoder"); /* class token */
        if (g->dt == CDB_CUDA_BF16)
            im2col<<<grid_for((size_t)nb * np * K), 256, 0, g->st>>>(
                g->pix, (__nv_bfloat16 *)g->mlpa, nb, S, P, G);
        else
            im2col<<<grid_for((size_t)nb * np * K), 256, 0, g->st>>>(g->pix, (float *)g->mlpa, nb,
                                                                      S, P, G);
        /* patches (nb*np, K) @ conv1^T (K, d) -> qkv as (nb*np, d) */
        if ((rc = linear(g, g->mlpa, g->patch_w, nb * np, d, K, 0.0f, g->qkv, e))) goto cleanup;
        embed_vision<<<grid_for((size_t)nb * Tn * d), 256, 0, g->st>>>(g->x, g->qkv, g->class_emb,
                                                                       g->pos_v, nb, Tn, d);
        /* x = ln_pre(x), in place */
        launch_ln<float>(g, g->x, NULL, g->ln_pre_w, g->ln_pre_b, g->x, nb * Tn, d);
        if ((rc = run_blocks(g, &g->vt, nb, Tn, 0, e))) goto cleanup;
        if ((rc = project(g, &g->vt, nb, out + (size_t)i0 * g->e, e))) goto cleanup;
    }
cleanup:
    return rc;
}

int cdb_cuda_encode_texts(cdb_cuda_model *g, const int32_t *const *ids, const int *lens, int n,
                          float *out, cdb_err *e)
{
    int rc = CLIPDB_OK;
    cdb_text_item *items = NULL;
    int *hids = NULL, *hq = NULL;
    float *hout = NULL;
    if (!g || n < 0 || (n > 0 && (!ids || !lens || !out)))
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU encoder: bad arguments");
    if (!g->has_text) return cdb_err_set(e, CLIPDB_EINVAL, "text tower is not loaded");
    if (n == 0) return CLIPDB_OK;
    items = (cdb_text_item *)cdb_malloc_array((size_t)n, sizeof *items);
    hids = (int *)cdb_malloc_array((size_t)TEXT_BATCH * g->C, sizeof *hids);
    hq = (int *)cdb_malloc_array(TEXT_BATCH, sizeof *hq);
    hout = (float *)cdb_malloc_array((size_t)TEXT_BATCH * g->e, sizeof *hout);
    if (!items || !hids || !hq || !hout) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    /* the checks of cdb_text_forward; by length, so that a batch runs at
    ** about its texts' own length */
    if ((rc = cdb_text_items(g->text, ids, lens, n, 1, items, e)) != CLIPDB_OK) goto cleanup;
    for (int g0 = 0; g0 < n; g0 += TEXT_BATCH) {
        const int cnt = n - g0 < TEXT_BATCH ? n - g0 : TEXT_BATCH;
        const int L = items[g0 + cnt - 1].len, d = g->tt.d;
        if ((rc = reserve(g, &g->tt, (size_t)cnt * L, (size_t)cnt, e))) goto cleanup;
        if ((rc = cdb_cu_grow((void **)&g->ids, &g->cap_ids, (size_t)cnt * L * 4, e))) goto cleanup;
        for (int k = 0; k < cnt; k++) {
            const int idx = items[g0 + k].index;
            for (int j = 0; j < L; j++) hids[(size_t)k * L + j] = j < lens[idx] ? ids[idx][j] : 0;
            hq[k] = items[g0 + k].len - 1; /* the end token */
        }
        CU(cudaMemcpyAsync(g->ids, hids, (size_t)cnt * L * 4, cudaMemcpyHostToDevice, g->st),
           "GPU encoder: upload");
        CU(cudaMemcpyAsync(g->qpos, hq, (size_t)cnt * 4, cudaMemcpyHostToDevice, g->st),
           "GPU encoder: upload");
        embed_text<<<grid_for((size_t)cnt * L * d), 256, 0, g->st>>>(g->x, g->ids, g->tok_emb,
                                                                     g->pos_t, cnt, L, d);
        /* causal: each end token sees tokens 0..end only, so padding after it
        ** changes nothing; the last block keeps the end token */
        if ((rc = run_blocks(g, &g->tt, cnt, L, 1, e))) goto cleanup;
        if ((rc = project(g, &g->tt, cnt, hout, e))) goto cleanup;
        for (int k = 0; k < cnt; k++)
            memcpy(out + (size_t)items[g0 + k].index * g->e, hout + (size_t)k * g->e,
                   (size_t)g->e * sizeof(float));
    }
cleanup:
    free(items);
    free(hids);
    free(hq);
    free(hout);
    return rc;
}
