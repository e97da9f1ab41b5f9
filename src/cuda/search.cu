/*
** search.cu: exact k-nearest-neighbour search on the GPU, the CUDA
** counterpart of cdb_flat_search (src/index/kernels.c), same scores:
**     dot  = q.b
**     cos  = q.b / (|q| |b|)        (0 when |b| is 0; |q| = 0 gives 0)
**     l2   = -(|q|^2 - 2 q.b + |b|^2), clamped to <= 0, -sqrt() at the end
** and the same results (best first, ties by the smaller row, unused slots
** id -1 / -INFINITY, *n_out = min(k, #allowed)).
**
** The base (n, d) is uploaded once (fp32, fp16 or bf16) with its norms.
** A search takes the queries in blocks of up to QB and the base in chunks of
** CH rows (QB * CH <= SCORE_MAX floats of scores) and per chunk:
**   1. S (qb, ch) = Q (qb, d) @ X_chunk^T (d, ch)    cuBLAS GemmEx, fp32 accumulate
**   2. block-wise selection: one thread block per (query, tile of the row)
**      turns raw dots into scores (metric, filter mask fused) and keeps the
**      tile's best k: for k <= 16 each thread keeps a sorted 16-entry queue in
**      registers while it streams 128 scores of a 32768 tile (the thread
**      queues of Faiss's BlockSelect), then the block's 4096 queued entries
**      are merged by a bitonic network in shared memory; for larger k the
**      tile is 4096 entries sorted by the bitonic network directly.
**   3. the tiles' survivors and the running best k of earlier chunks are
**      reduced again by the same tile selection until one tile remains,
**      whose best k become the new running best k.
** Nothing ever sorts a whole row: a row of n scores costs n / 32768 tiny
** sorts (k <= 16) and the rounds after it shrink the candidates by 2048x.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/common.cuh"

extern "C" {
#include "index/index.h"
}

#define SEL_THREADS 256
#define TILE_SORT 4096                 /* entries per block in the bitonic tile */
#define Q_LEN 16                       /* per-thread queue of the fast path */
#define TILE_FAST (SEL_THREADS * 128)  /* raw entries per block of the fast path */
#define QB_MAX 1024                    /* queries per block */
#define SCORE_MAX ((size_t)1 << 28)    /* floats of scores per chunk (1 GiB) */

struct cdb_cuda_flat {
    int d;
    size_t n;
    cdb_cuda_dtype dt;
    int64_t *ids;          /* host copy (n) or NULL: id = row */
    void *x;               /* device (n, d) dt */
    float *norms;          /* device (n) */
    cublasHandle_t blas;
    cudaStream_t stream;
    /* per-search scratch, grown on demand */
    void *q;      size_t cap_q;      /* (qb, d) dt */
    float *qn;    size_t cap_qn;     /* (qb) */
    float *S;     size_t cap_S;      /* (qb, ch) raw dots */
    float *cs[2]; size_t cap_cs[2];  /* candidate scores, ping-pong */
    int *cr[2];   size_t cap_cr[2];  /* candidate rows */
    float *rs;    size_t cap_rs;     /* (qb, k) running best scores */
    int *rr;      size_t cap_rr;     /* (qb, k) running best rows */
    uint32_t *mask; size_t cap_mask; /* allowed rows, one bit each */
};

/* (s, r) ranks before (t, u): higher score, then smaller row; row -1 (an
** empty slot, score -INFINITY) ranks after everything. */
__device__ __forceinline__ bool better(float s, int r, float t, int u)
{
    return s > t || (s == t && (unsigned)r < (unsigned)u);
}

/* Sorts n (a power of two) entries of shared memory best first: Batcher's
** bitonic sorting network, n/2 compare-exchanges per step. */
__device__ void bitonic_sort(float *ks, int *kr, int n)
{
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
                int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
                bool first_best = (lo & size) == 0; /* this run ends best first */
                float a = ks[lo], b = ks[hi];
                int ra = kr[lo], rb = kr[hi];
                bool sw = first_best ? better(b, rb, a, ra) : better(a, ra, b, rb);
                if (sw) {
                    ks[lo] = b; ks[hi] = a;
                    kr[lo] = rb; kr[hi] = ra;
                }
            }
            __syncthreads();
        }
    }
}

/* Where a tile's entries come from. RAW: the dots S (qb, ld) of a chunk of
** rows [r0, r0 + len), turned into scores here; PAIRS: (score, row)
** candidates (qb, ld) of an earlier round. */
struct src_raw {
    const float *S; size_t ld; int len; int r0;
    const float *qn; const float *bn; const uint32_t *mask; int metric;
    __device__ __forceinline__ void get(int q, int j, float *s, int *r) const
    {
        if (j >= len) { *s = -INFINITY; *r = -1; return; }
        float v = S[(size_t)q * ld + j], sc;
        int row = r0 + j;
        if (mask && !((mask[row >> 5] >> (row & 31)) & 1u)) { *s = -INFINITY; *r = -1; return; }
        if (metric == CLIPDB_METRIC_DOT) {
            sc = v;
        } else if (metric == CLIPDB_METRIC_COSINE) {
            float qv = qn[q], bv = bn[row], qinv = qv > 0 ? 1.0f / qv : 0.0f;
            sc = bv > 0 ? v * qinv / bv : 0.0f;
        } else {
            float qv = qn[q], bv = bn[row];
            sc = 2.0f * v - qv * qv - bv * bv; /* -|q-b|^2 */
            if (sc > 0.0f) sc = 0.0f;
        }
        if (sc != sc) { *s = -INFINITY; *r = -1; return; } /* NaN never ranks */
        *s = sc;
        *r = row;
    }
};
struct src_pairs {
    const float *s; const int *r; size_t ld; int len;
    __device__ __forceinline__ void get(int q, int j, float *s_out, int *r_out) const
    {
        if (j >= len) { *s_out = -INFINITY; *r_out = -1; return; }
        *s_out = s[(size_t)q * ld + j];
        *r_out = r[(size_t)q * ld + j];
    }
};

/* Block (tile t, query q) of a sort tile: TILE_SORT entries sorted, the best
** k written to (os, orow)[q * old + t * k ..]. */
template <typename Src>
__global__ void __launch_bounds__(SEL_THREADS) select_sort(Src src, int k, float *os, int *orow,
                                                           size_t old)
{
    __shared__ float ks[TILE_SORT];
    __shared__ int kr[TILE_SORT];
    const int q = blockIdx.y, t = blockIdx.x, base = t * TILE_SORT;
    for (int j = threadIdx.x; j < TILE_SORT; j += blockDim.x) src.get(q, base + j, &ks[j], &kr[j]);
    __syncthreads();
    bitonic_sort(ks, kr, TILE_SORT);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        os[(size_t)q * old + (size_t)t * k + j] = ks[j];
        orow[(size_t)q * old + (size_t)t * k + j] = kr[j];
    }
}

/* Block (tile t, query q) of a fast tile (k <= Q_LEN): every thread streams
** TILE_FAST / SEL_THREADS entries through a sorted register queue of Q_LEN,
** then the queues (SEL_THREADS * Q_LEN = TILE_SORT entries) are sorted and
** the best k written. Exact: any of the tile's best k is within the best
** Q_LEN >= k of the thread that saw it. */
template <typename Src>
__global__ void __launch_bounds__(SEL_THREADS) select_queue(Src src, int k, float *os, int *orow,
                                                            size_t old)
{
    __shared__ float ks[SEL_THREADS * Q_LEN];
    __shared__ int kr[SEL_THREADS * Q_LEN];
    const int q = blockIdx.y, t = blockIdx.x, base = t * TILE_FAST;
    float qs[Q_LEN];
    int qr[Q_LEN];
#pragma unroll
    for (int i = 0; i < Q_LEN; i++) { qs[i] = -INFINITY; qr[i] = -1; }
    for (int j = threadIdx.x; j < TILE_FAST; j += SEL_THREADS) {
        float s;
        int r;
        src.get(q, base + j, &s, &r);
        if (!better(s, r, qs[Q_LEN - 1], qr[Q_LEN - 1])) continue;
        /* insertion from the bottom; constant indexes keep the queue in registers */
#pragma unroll
        for (int i = Q_LEN - 1; i > 0; i--) {
            if (better(s, r, qs[i - 1], qr[i - 1])) {
                qs[i] = qs[i - 1]; qr[i] = qr[i - 1];
            } else if (better(s, r, qs[i], qr[i])) {
                qs[i] = s; qr[i] = r;
            }
        }
        if (better(s, r, qs[0], qr[0])) { qs[0] = s; qr[0] = r; }
    }
#pragma unroll
    for (int i = 0; i < Q_LEN; i++) {
        ks[threadIdx.x * Q_LEN + i] = qs[i];
        kr[threadIdx.x * Q_LEN + i] = qr[i];
    }
    __syncthreads();
    bitonic_sort(ks, kr, SEL_THREADS * Q_LEN);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        os[(size_t)q * old + (size_t)t * k + j] = ks[j];
        orow[(size_t)q * old + (size_t)t * k + j] = kr[j];
    }
}

/* (qb) fill of the running best with empty slots. */
__global__ void fill_empty(float *s, int *r, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { s[i] = -INFINITY; r[i] = -1; }
}

/* Tiles of `len` entries for the selection of k. */
static int tile_of(int k) { return k <= Q_LEN ? TILE_FAST : TILE_SORT; }

template <typename Src>
static void launch_select(Src src, int len, int qb, int k, float *os, int *orow, size_t old,
                          cudaStream_t st)
{
    dim3 grid((unsigned)((len + tile_of(k) - 1) / tile_of(k)), (unsigned)qb);
    if (k <= Q_LEN) select_queue<Src><<<grid, SEL_THREADS, 0, st>>>(src, k, os, orow, old);
    else select_sort<Src><<<grid, SEL_THREADS, 0, st>>>(src, k, os, orow, old);
}

void cdb_cuda_flat_free(cdb_cuda_flat *f)
{
    if (!f) return;
    cudaFree(f->x);
    cudaFree(f->norms);
    cudaFree(f->q);
    cudaFree(f->qn);
    cudaFree(f->S);
    for (int i = 0; i < 2; i++) {
        cudaFree(f->cs[i]);
        cudaFree(f->cr[i]);
    }
    cudaFree(f->rs);
    cudaFree(f->rr);
    cudaFree(f->mask);
    if (f->blas) cublasDestroy(f->blas);
    if (f->stream) cudaStreamDestroy(f->stream);
    free(f->ids);
    free(f);
}

size_t cdb_cuda_flat_bytes(const cdb_cuda_flat *f)
{
    return f ? f->n * (size_t)f->d * cdb_cu_size(f->dt) + f->n * sizeof(float) : 0;
}

int cdb_cuda_flat_new(cdb_cuda_flat **out, const clipdb_vecs *base, cdb_cuda_dtype dt,
                      cdb_err *e)
{
    int rc = CLIPDB_OK;
    cdb_cuda_flat *f = NULL;
    float *norms_own = NULL;
    size_t nd, bytes;
    *out = NULL;
    if (!base || base->d < 1 || base->d > CLIPDB_MAX_DIM || (base->n && !base->data))
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU search: bad base vectors");
    if (base->n > (size_t)INT32_MAX)
        return cdb_err_set(e, CLIPDB_ELIMIT, "GPU search: %zu vectors (at most %d)", base->n,
                           INT32_MAX);
    if (!cdb_mul_ok(base->n, (size_t)base->d, &nd) || !cdb_mul_ok(nd, cdb_cu_size(dt), &bytes))
        return cdb_err_set(e, CLIPDB_ELIMIT, "GPU search: base too large");
    if ((rc = cdb_cuda_probe(e)) != CLIPDB_OK) return rc;
    if (!(f = (cdb_cuda_flat *)calloc(1, sizeof *f)))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    f->d = base->d;
    f->n = base->n;
    f->dt = dt;
    CU(cudaStreamCreateWithFlags(&f->stream, cudaStreamNonBlocking), "GPU stream");
    CUBLAS(cublasCreate(&f->blas), "cuBLAS");
    CUBLAS(cublasSetStream(f->blas, f->stream), "cuBLAS");
    if (base->ids) {
        if (!(f->ids = (int64_t *)cdb_malloc_array(base->n ? base->n : 1, sizeof *f->ids))) {
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        memcpy(f->ids, base->ids, base->n * sizeof *f->ids);
    }
    if (base->n == 0) goto cleanup;
    CU(cudaMalloc(&f->x, bytes), "GPU search: vectors");
    CU(cudaMalloc((void **)&f->norms, base->n * sizeof(float)), "GPU search: norms");
    if ((rc = cdb_cu_upload(f->x, dt, base->data, nd, f->stream, e)) != CLIPDB_OK) goto cleanup;
    if (!base->norms) { /* the CPU path's norms, bit for bit */
        if (!(norms_own = (float *)cdb_malloc_array(base->n, sizeof(float)))) {
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        clipdb_vec_norms(base->data, base->n, base->d, norms_own);
    }
    if ((rc = cdb_cu_upload(f->norms, CDB_CUDA_F32, base->norms ? base->norms : norms_own,
                            base->n, f->stream, e)) != CLIPDB_OK)
        goto cleanup;
cleanup:
    free(norms_own);
    if (rc) cdb_cuda_flat_free(f);
    else *out = f;
    return rc;
}

/* The allowed rows as bits (n); *allowed their count. */
static int build_mask(cdb_cuda_flat *f, const clipdb_filter *flt, size_t *allowed, cdb_err *e)
{
    int rc = CLIPDB_OK;
    size_t words = (f->n + 31) / 32, i, cnt = 0;
    uint32_t *m = (uint32_t *)calloc(words ? words : 1, sizeof *m);
    if (!m) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    for (i = 0; i < f->n; i++)
        if (cdb_filter_allows(flt, (int64_t)i)) {
            m[i / 32] |= 1u << (i % 32);
            cnt++;
        }
    *allowed = cnt;
    if ((rc = cdb_cu_grow((void **)&f->mask, &f->cap_mask, words * 4, e)) != CLIPDB_OK) goto cleanup;
    CU(cudaMemcpyAsync(f->mask, m, words * 4, cudaMemcpyHostToDevice, f->stream), "GPU mask");
    CU(cudaStreamSynchronize(f->stream), "GPU mask");
cleanup:
    free(m);
    return rc;
}

/* Reduces len candidates per query in cs[cur] (stride ld) to one tile's best
** k written to the running best (rs, rr); the buffers ping-pong. */
static void reduce_rounds(cdb_cuda_flat *f, int qb, int k, int cur, size_t ld, size_t len)
{
    while (len > (size_t)tile_of(k)) {
        size_t tiles = (len + tile_of(k) - 1) / tile_of(k), nld = tiles * (size_t)k;
        src_pairs sp = {f->cs[cur], f->cr[cur], ld, (int)len};
        launch_select(sp, (int)len, qb, k, f->cs[!cur], f->cr[!cur], nld, f->stream);
        cur = !cur;
        ld = nld;
        len = nld;
    }
    src_pairs sp = {f->cs[cur], f->cr[cur], ld, (int)len};
    launch_select(sp, (int)len, qb, k, f->rs, f->rr, (size_t)k, f->stream);
}

int cdb_cuda_flat_search(cdb_cuda_flat *f, const float *queries, size_t nq, int k,
                         clipdb_metric metric, const clipdb_filter *filter, clipdb_hit *out,
                         int *n_out, cdb_err *e)
{
    int rc = CLIPDB_OK;
    const int d = f ? f->d : 0;
    size_t allowed, q0, i, ch, qbm, tmp;
    float *qnorm = NULL, *hs = NULL;
    int *hr = NULL;
    const size_t esz = f ? cdb_cu_size(f->dt) : 4;
    const float one = 1.0f, zero = 0.0f;

    if (!f || !n_out || (!queries && nq) || (!out && nq))
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU search: NULL argument");
    if (k < 1 || k > CLIPDB_MAX_K)
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU search: k = %d out of range [1, %d]", k,
                           CLIPDB_MAX_K);
    if (k > CDB_CUDA_MAX_K)
        return cdb_err_set(e, CLIPDB_ELIMIT, "GPU search: k = %d above the GPU limit %d", k,
                           CDB_CUDA_MAX_K);
    if (!cdb_metric_ok(metric))
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU search: unknown metric %d", (int)metric);
    if (!cdb_mul_ok(nq, (size_t)k, &tmp) || !cdb_mul_ok(nq, (size_t)d, &tmp))
        return cdb_err_set(e, CLIPDB_EINVAL, "GPU search: sizes overflow");
    if ((rc = cdb_filter_check(filter, e)) != CLIPDB_OK) return rc;

    allowed = f->n;
    if (filter && f->n && (rc = build_mask(f, filter, &allowed, e)) != CLIPDB_OK) return rc;
    *n_out = (size_t)k < allowed ? k : (int)allowed;
    for (i = 0; i < nq * (size_t)k; i++) {
        out[i].id = -1;
        out[i].score = -INFINITY;
    }
    if (allowed == 0 || nq == 0) return CLIPDB_OK;

    qbm = nq < QB_MAX ? nq : QB_MAX;
    /* chunk rows: as many as fit SCORE_MAX for this query block, whole tiles */
    ch = SCORE_MAX / qbm;
    ch -= ch % TILE_FAST;
    if (ch < TILE_FAST) ch = TILE_FAST;
    if (ch > f->n) ch = f->n;
    {
        size_t tiles = (ch + TILE_SORT - 1) / TILE_SORT; /* the most tiles per chunk */
        size_t cand = (tiles + 1) * (size_t)k;           /* + the running best */
        if ((rc = cdb_cu_grow(&f->q, &f->cap_q, qbm * d * esz, e))) goto cleanup;
        if ((rc = cdb_cu_grow((void **)&f->qn, &f->cap_qn, qbm * sizeof(float), e))) goto cleanup;
        if ((rc = cdb_cu_grow((void **)&f->S, &f->cap_S, qbm * ch * sizeof(float), e))) goto cleanup;
        for (i = 0; i < 2; i++) {
            if ((rc = cdb_cu_grow((void **)&f->cs[i], &f->cap_cs[i], qbm * cand * 4, e))) goto cleanup;
            if ((rc = cdb_cu_grow((void **)&f->cr[i], &f->cap_cr[i], qbm * cand * 4, e))) goto cleanup;
        }
        if ((rc = cdb_cu_grow((void **)&f->rs, &f->cap_rs, qbm * k * 4, e))) goto cleanup;
        if ((rc = cdb_cu_grow((void **)&f->rr, &f->cap_rr, qbm * k * 4, e))) goto cleanup;
    }
    qnorm = (float *)cdb_malloc_array(nq, sizeof *qnorm);
    hs = (float *)cdb_malloc_array(qbm * k, sizeof *hs);
    hr = (int *)cdb_malloc_array(qbm * k, sizeof *hr);
    if (!qnorm || !hs || !hr) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    clipdb_vec_norms(queries, nq, d, qnorm); /* as the CPU path computes them */

    for (q0 = 0; q0 < nq; q0 += QB_MAX) {
        const int qb = (int)(nq - q0 < QB_MAX ? nq - q0 : QB_MAX);
        size_t r0;
        if ((rc = cdb_cu_upload(f->q, f->dt, queries + q0 * d, (size_t)qb * d, f->stream, e)))
            goto cleanup;
        CU(cudaMemcpyAsync(f->qn, qnorm + q0, qb * sizeof(float), cudaMemcpyHostToDevice,
                           f->stream), "GPU search: upload");
        fill_empty<<<(unsigned)(((size_t)qb * k + 255) / 256), 256, 0, f->stream>>>(
            f->rs, f->rr, (size_t)qb * k);
        for (r0 = 0; r0 < f->n; r0 += ch) {
            const int len = (int)(f->n - r0 < ch ? f->n - r0 : ch);
            const size_t tiles = (len + tile_of(k) - 1) / tile_of(k);
            const size_t ld = (tiles + 1) * (size_t)k;
            /* S (qb, len) = Q (qb, d) @ X[r0 : r0+len]^T (d, len); column-major
            ** view: S^T (len, qb) = X_chunk (len, d) . Q^T (d, qb) */
            CUBLAS(cublasGemmEx(f->blas, CUBLAS_OP_T, CUBLAS_OP_N, len, qb, d, &one,
                                (const char *)f->x + r0 * d * esz, cdb_cu_type(f->dt), d,
                                f->q, cdb_cu_type(f->dt), d, &zero, f->S, CUDA_R_32F, len,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "GPU search: GEMM");
            src_raw sr = {f->S, (size_t)len, len, (int)r0, f->qn, f->norms,
                          filter ? f->mask : NULL, (int)metric};
            /* tiles' best k at cs[0][q][0 .. tiles*k), the running best after them */
            launch_select(sr, len, qb, k, f->cs[0], f->cr[0], ld, f->stream);
            CU(cudaMemcpy2DAsync(f->cs[0] + tiles * k, ld * 4, f->rs, (size_t)k * 4,
                                 (size_t)k * 4, qb, cudaMemcpyDeviceToDevice, f->stream),
               "GPU search: copy");
            CU(cudaMemcpy2DAsync(f->cr[0] + tiles * k, ld * 4, f->rr, (size_t)k * 4,
                                 (size_t)k * 4, qb, cudaMemcpyDeviceToDevice, f->stream),
               "GPU search: copy");
            reduce_rounds(f, qb, k, 0, ld, ld);
        }
        CU(cudaGetLastError(), "GPU search: selection kernel");
        CU(cudaMemcpyAsync(hs, f->rs, (size_t)qb * k * 4, cudaMemcpyDeviceToHost, f->stream),
           "GPU search: download");
        CU(cudaMemcpyAsync(hr, f->rr, (size_t)qb * k * 4, cudaMemcpyDeviceToHost, f->stream),
           "GPU search: download");
        CU(cudaStreamSynchronize(f->stream), "GPU search");
        for (i = 0; i < (size_t)qb * k; i++) {
            clipdb_hit *h = &out[q0 * k + i];
            if (hr[i] < 0 || (int)(i % k) >= *n_out) continue; /* stays (-1, -inf) */
            h->id = f->ids ? f->ids[hr[i]] : hr[i];
            h->score = metric == CLIPDB_METRIC_L2 ? -sqrtf(-hs[i]) : hs[i];
        }
    }
cleanup:
    free(qnorm);
    free(hs);
    free(hr);
    return rc;
}
