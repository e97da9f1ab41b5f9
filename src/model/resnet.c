/*
** resnet.c: CLIP's ModifiedResNet image tower (model.h cdb_resnet): the
** inference forward (batch norm on the running statistics, folded into a
** per-channel scale and shift), and for training (src/train) the same
** forward on the batch's statistics with the activations kept, and the
** backward, each beside its forward.
**
** Layout: a chunk of nb images is held channel-major, "CNHW": row c of an
** activation holds channel c of every image, (nb, H, W) after each other.
** Then a 1x1 convolution is one GEMM, W (cout, cin) @ X (cin, nb*H*W), and a
** 3x3 one is the same over the columns (cin*9, nb*Ho*Wo): small images (64
** px: 2x2 at the end) still make large GEMMs. The backward of a convolution
** is two GEMMs on the same columns: dW += dZ @ cols^T, dcols = W^T @ dZ,
** and dcols scattered back (col2im).
**
** Batch norm in training (torch's BatchNorm2d.train()): per channel over the
** N = nb*H*W values of the micro-batch, mean and biased variance, eps 1e-5;
** the running statistics move by momentum 0.1 toward the mean and the
** unbiased variance N/(N-1) var.
*/
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "compute/convert.h"
#include "model/model.h"
#include "model/transformer.h"

/* Images per chunk of the inference forward: bounds the activations (RN50
** at 224 px: about 30 MB an image for the largest buffers together). */
#define RN_CHUNK 8
#define RN_BN_EPS 1e-5
#define RN_BN_MOMENTUM 0.1

/* RN_SIMD: an elementwise loop whose iterations are independent, vectorised
** (gcc's -O2 leaves these scalar: it will not check the pointers for
** overlap); each element gets the same operations as without it. */
#ifdef _OPENMP
#define RN_PAR_FOR _Pragma("omp parallel for schedule(static)")
#define RN_SIMD _Pragma("omp simd")
#else
#define RN_PAR_FOR
#define RN_SIMD
#endif

/* Output side of a k x k convolution with padding k / 2 and the stride. */
static int conv_out(int h, int k, int stride)
{
    return (h + 2 * (k / 2) - k) / stride + 1;
}

/* ---- batch-norm folding (inference) ---------------------------------------- */

int cdb_conv_fold(cdb_conv *cv)
{
    int c;
    for (c = 0; c < cv->cout; c++) {
        /* torch: (x - mean) / sqrt(var + 1e-5) * w + b */
        const double var = cv->bn_var[c], s = cv->bn_w[c] / sqrt(var + RN_BN_EPS);
        if (!(var >= 0.0)) return c;
        cv->scale[c] = (float)s;
        cv->shift[c] = (float)(cv->bn_b[c] - cv->bn_mean[c] * s);
    }
    return -1;
}

int cdb_resnet_fold(cdb_resnet *rn, cdb_err *e)
{
    int i, j;
    for (i = -1; i < rn->n_blocks; i++) {
        cdb_conv *cv[4];
        int n = 0;
        if (i < 0) {
            cv[0] = &rn->stem[0], cv[1] = &rn->stem[1], cv[2] = &rn->stem[2], n = 3;
        } else {
            cdb_bottleneck *bk = &rn->blocks[i];
            cv[0] = &bk->c1, cv[1] = &bk->c2, cv[2] = &bk->c3, n = 3;
            if (bk->down.w) cv[n++] = &bk->down;
        }
        for (j = 0; j < n; j++) {
            const int bad = cdb_conv_fold(cv[j]);
            if (bad >= 0)
                return cdb_err_set(e, CLIPDB_EINVAL,
                                   "a batch norm's running variance is negative or NaN "
                                   "(block %d, channel %d)", i, bad);
        }
    }
    return CLIPDB_OK;
}

/* ---- convolution --------------------------------------------------------- */

/* The output columns [*lo, *hi) of a row whose input column ox * stride -
** pad + kx falls inside the image (0 <= ix < W); the others read padding. */
static void valid_cols(int W, int Wo, int pad, int kx, int stride, int *lo, int *hi)
{
    const int a = pad - kx, b = W - 1 + pad - kx; /* ox * stride in [a, b] */
    *lo = a > 0 ? (a + stride - 1) / stride : 0;
    *hi = b < 0 ? 0 : b / stride + 1;
    if (*hi > Wo) *hi = Wo;
    if (*hi < *lo) *hi = *lo;
}

/* cols (cin*k*k, nb*Ho*Wo) of x (cin, nb, H, W), zero outside the image,
** as fp32 (cols) or, when cols16 != NULL, rounded to bf16 as the bf16 GEMM
** would round it (cols16; cols unused): the GEMM then reads half the bytes
** and no copy is converted. Each output row is zeros, a run of the input
** row (a copy, or a conversion, at stride 1), zeros: no test per element. */
static void im2col_cnhw(const float *x, int cin, int nb, int H, int W, int k, int stride,
                        float *cols, uint16_t *cols16)
{
    const int pad = k / 2, Ho = conv_out(H, k, stride), Wo = conv_out(W, k, stride);
    const size_t plane = (size_t)H * W, row = (size_t)nb * Ho * Wo;
    const size_t esz = cols16 ? sizeof *cols16 : sizeof *cols;
    void (*const to_bf16)(const float *, size_t, uint16_t *) = cdb_convert_best()->to_bf16;
    int r;
    RN_PAR_FOR
    for (r = 0; r < cin * k * k; r++) {
        const int c = r / (k * k), ky = r / k % k, kx = r % k;
        char *dst = cols16 ? (char *)(cols16 + (size_t)r * row) : (char *)(cols + (size_t)r * row);
        int n, oy, ox, lo, hi;
        valid_cols(W, Wo, pad, kx, stride, &lo, &hi);
        for (n = 0; n < nb; n++) {
            const float *src = x + ((size_t)c * nb + n) * plane;
            for (oy = 0; oy < Ho; oy++, dst += (size_t)Wo * esz) {
                const int iy = oy * stride - pad + ky;
                const ptrdiff_t off = (ptrdiff_t)iy * W - pad + kx; /* + ox * stride */
                if (iy < 0 || iy >= H) {
                    memset(dst, 0, (size_t)Wo * esz);
                    continue;
                }
                if (lo > 0) memset(dst, 0, (size_t)lo * esz);
                if (cols16 && stride == 1)
                    to_bf16(src + off + lo, (size_t)(hi - lo), (uint16_t *)dst + lo);
                else if (cols16)
                    for (ox = lo; ox < hi; ox++)
                        ((uint16_t *)dst)[ox] = cdb_f32_to_bf16(src[off + (ptrdiff_t)ox * stride]);
                else if (stride == 1)
                    memcpy((float *)dst + lo, src + off + lo, (size_t)(hi - lo) * esz);
                else
                    for (ox = lo; ox < hi; ox++)
                        ((float *)dst)[ox] = src[off + (ptrdiff_t)ox * stride];
                if (hi < Wo) memset(dst + (size_t)hi * esz, 0, (size_t)(Wo - hi) * esz);
            }
        }
    }
}

/* dx (cin, nb, H, W) += the columns dcols (cin*k*k, nb*Ho*Wo) scattered back
** to the pixels they were read from (im2col_cnhw's adjoint). The same adds in
** the same order as a test per element would make, over the valid run only. */
static void col2im_cnhw(const float *dcols, int cin, int nb, int H, int W, int k, int stride,
                        float *dx)
{
    const int pad = k / 2, Ho = conv_out(H, k, stride), Wo = conv_out(W, k, stride);
    const size_t plane = (size_t)H * W, row = (size_t)nb * Ho * Wo;
    int c;
    RN_PAR_FOR /* one channel per task: the k*k rows of a channel write only its plane */
    for (c = 0; c < cin; c++) {
        int ky, kx, n, oy, ox, lo, hi;
        for (ky = 0; ky < k; ky++)
            for (kx = 0; kx < k; kx++) {
                const float *src = dcols + ((size_t)(c * k + ky) * k + kx) * row;
                valid_cols(W, Wo, pad, kx, stride, &lo, &hi);
                for (n = 0; n < nb; n++) {
                    float *dst = dx + ((size_t)c * nb + n) * plane;
                    for (oy = 0; oy < Ho; oy++, src += Wo) {
                        const int iy = oy * stride - pad + ky;
                        const ptrdiff_t off = (ptrdiff_t)iy * W - pad + kx; /* + ox * stride */
                        if (iy < 0 || iy >= H) continue;
                        if (stride == 1)
                            for (ox = lo; ox < hi; ox++) dst[off + ox] += src[ox];
                        else
                            for (ox = lo; ox < hi; ox++)
                                dst[off + (ptrdiff_t)ox * stride] += src[ox];
                    }
                }
            }
    }
}

/* The GEMMs of the tower: fp32, or bf16 inputs with fp32 accumulation when a
** training asks for it (cdb_sgemm_bf16). */
static int gemm(cdb_prec prec, cdb_trans ta, cdb_trans tb, int m, int n, int k, const float *A,
                int lda, const float *B, int ldb, float beta, float *C, int ldc, cdb_err *e)
{
    if (prec == CDB_PREC_BF16)
        return cdb_sgemm_bf16(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc, e);
    cdb_sgemm(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc);
    return CLIPDB_OK;
}

/* gemm with A and B each given as fp32 (A, B), or as bf16 already (A16,
** B16 != NULL, bf16 only: cdb_gemm_bf16_ops), with row strides lda, ldb. */
static int gemm_b(cdb_prec prec, cdb_trans ta, cdb_trans tb, int m, int n, int k, const float *A,
                  const uint16_t *A16, int lda, const float *B, const uint16_t *B16, int ldb,
                  float beta, float *C, int ldc, cdb_err *e)
{
    if (A16 || B16)
        return cdb_gemm_bf16_ops(ta, tb, m, n, k, 1.0f, A16 ? NULL : A, A16, lda, B16 ? NULL : B,
                                 B16, ldb, beta, C, ldc, e);
    return gemm(prec, ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc, e);
}

/* Whether the im2col of this training is written as bf16 (rn_mode's prec
** bf16 on bf16 instructions; emulated bf16 keeps fp32 columns). */
static int cols_bf16(cdb_prec prec)
{
    return prec == CDB_PREC_BF16 && cdb_gemm_bf16_native();
}

/* Chunks of the long dimension (N = images x pixels) that the skinny GEMMs
** of the tower are split into, each a single-threaded GEMM on its own core:
** the library's own split of C (m, N) = A (m, k) @ B (k, N) with m and k in
** the tens or hundreds and N over 100,000 leaves a core idle (measured,
** 2-core Zen 4: 17-60 GFLOP/s). A fixed count, so the sums (and the
** weights a training ends with) do not depend on the number of cores. */
#define RN_SPLIT 4
#define RN_SPLIT_MIN 4096 /* columns per chunk at least, else one GEMM */

/* C (m, N) = op(A) (m, k) @ B (k, N) + beta C, N split into column chunks;
** B as fp32, or as bf16 when B16 != NULL (bf16 only). */
static int gemm_cols(cdb_prec prec, cdb_trans ta, int m, int N, int k, const float *A, int lda,
                     const float *B, const uint16_t *B16, int ldb, float beta, float *C, int ldc,
                     cdb_err *e)
{
    const int per = (N + RN_SPLIT - 1) / RN_SPLIT;
    int j, rc = CLIPDB_OK;
    if (N < RN_SPLIT * RN_SPLIT_MIN)
        return gemm_b(prec, ta, CDB_NO_TRANS, m, N, k, A, NULL, lda, B, B16, ldb, beta, C, ldc,
                      e);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(| : rc)
#endif
    for (j = 0; j < RN_SPLIT; j++) {
        const int n0 = j * per, n = N - n0 < per ? N - n0 : per;
        const int saved = cdb_compute_serial_enter();
        cdb_err ej = {0};
        if (n > 0 && gemm_b(prec, ta, CDB_NO_TRANS, m, n, k, A, NULL, lda, B ? B + n0 : NULL,
                            B16 ? B16 + n0 : NULL, ldb, beta, C + n0, ldc, &ej))
            rc |= 1;
        cdb_compute_serial_leave(saved);
    }
    return rc ? cdb_err_set(e, CLIPDB_ERROR, "a bf16 GEMM of the ResNet tower failed "
                                             "(out of memory or a oneDNN error)")
              : CLIPDB_OK;
}

/* G (m, k) += A (m, N) @ B (k, N)^T (a weight's gradient: the sum runs over
** N), the sum split into RN_SPLIT chunks (each into its own (m, k) of
** scratch), added up in order. scratch: RN_SPLIT * m * k floats. A and B
** each as fp32, or as bf16 when A16 (B16) != NULL (bf16 only). */
static int gemm_wgrad(cdb_prec prec, int m, int k, int N, const float *A, const uint16_t *A16,
                      const float *B, const uint16_t *B16, float *G, float *scratch, cdb_err *e)
{
    const int per = (N + RN_SPLIT - 1) / RN_SPLIT;
    const size_t mk = (size_t)m * k;
    int j, rc = CLIPDB_OK;
    size_t i;
    if (N < RN_SPLIT * RN_SPLIT_MIN || !scratch)
        return gemm_b(prec, CDB_NO_TRANS, CDB_TRANS, m, k, N, A, A16, N, B, B16, N, 1.0f, G, k,
                      e);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(| : rc)
#endif
    for (j = 0; j < RN_SPLIT; j++) {
        const int n0 = j * per, n = N - n0 < per ? N - n0 : per;
        const int saved = cdb_compute_serial_enter();
        cdb_err ej = {0};
        if (n <= 0)
            memset(scratch + j * mk, 0, mk * sizeof *scratch);
        else if (gemm_b(prec, CDB_NO_TRANS, CDB_TRANS, m, k, n, A16 ? NULL : A + n0,
                        A16 ? A16 + n0 : NULL, N, B ? B + n0 : NULL, B16 ? B16 + n0 : NULL, N,
                        0.0f, scratch + j * mk, k, &ej))
            rc |= 1;
        cdb_compute_serial_leave(saved);
    }
    if (rc)
        return cdb_err_set(e, CLIPDB_ERROR,
                           "a bf16 GEMM of the ResNet tower failed (out of memory or a oneDNN error)");
    for (j = 0; j < RN_SPLIT; j++)
        for (i = 0; i < mk; i++) G[i] += scratch[j * mk + i];
    return CLIPDB_OK;
}

/* A batch norm's record in training: xhat (cout, N) the normalised
** convolution output, rstd (cout) = 1 / sqrt(var + eps) of the batch. */
typedef struct rn_bn {
    float *xhat;
    float *rstd;
} rn_bn;

/* How a forward runs: inference (bn NULL in the calls: folded running
** statistics) or training (batch statistics kept; running ones updated when
** update). */
typedef struct rn_mode {
    cdb_prec prec;
    int update;
    float *wscratch;  /* RN_SPLIT x the largest weight, for gemm_wgrad (NULL: unsplit) */
    uint16_t *dz16;   /* the largest activation as bf16: a backward's dz, written once for
                      ** both of its GEMMs (bf16 columns only; NULL: each GEMM rounds dz) */
} rn_mode;

/* Batch-norm sums over a channel's N values: blocks of RN_BLOCK values
** summed in RN_LANES float lanes (vectorised; 16 values a lane), the blocks'
** sums added in double. As accurate as a double sum for the batch
** statistics (torch's is within 4e-8; a float sum over 100,000 values is
** not: its 6e-6 puts ReLU inputs on the other side of 0). */
#define RN_LANES 16
#define RN_BLOCK 256

/* sum of x, and of (x - m)^2 when sq (m: the mean) */
static double lane_sum(const float *x, size_t n, int sq, float m)
{
    double s = 0.0;
    size_t i0, i, j;
    for (i0 = 0; i0 + RN_BLOCK <= n; i0 += RN_BLOCK) {
        float acc[RN_LANES] = {0}, b = 0.0f;
        if (sq)
            for (i = i0; i < i0 + RN_BLOCK; i += RN_LANES)
                for (j = 0; j < RN_LANES; j++) acc[j] += (x[i + j] - m) * (x[i + j] - m);
        else
            for (i = i0; i < i0 + RN_BLOCK; i += RN_LANES)
                for (j = 0; j < RN_LANES; j++) acc[j] += x[i + j];
        for (j = 0; j < RN_LANES; j++) b += acc[j];
        s += b;
    }
    for (i = i0; i < n; i++) s += sq ? ((double)x[i] - m) * ((double)x[i] - m) : x[i];
    return s;
}

/* y (cout, nb*Ho*Wo) = bn(conv(x)) (x (cin, nb, H, W)), then relu when asked.
** bn NULL: the folded running statistics; else the batch's (kept in *bn). */
static int conv_bn(const rn_mode *md, const cdb_conv *cv, const float *x, int nb, int H, int W,
                   int stride, int relu, float *cols, float *y, const rn_bn *bn, cdb_err *e)
{
    const int Ho = conv_out(H, cv->k, stride), Wo = conv_out(W, cv->k, stride);
    const int K = cv->cin * cv->k * cv->k;
    const size_t N = (size_t)nb * Ho * Wo;
    float *z = bn ? bn->xhat : y;
    const cdb_prec prec = md ? md->prec : CDB_PREC_FP32;
    const float *B = x;
    const uint16_t *B16 = NULL;
    int c, rc;
    if (cv->k != 1 || stride != 1) { /* the columns in cols' memory, as bf16 or fp32 */
        uint16_t *c16 = cols_bf16(prec) ? (uint16_t *)cols : NULL;
        im2col_cnhw(x, cv->cin, nb, H, W, cv->k, stride, cols, c16);
        B = c16 ? NULL : cols;
        B16 = c16;
    }
    /* z (cout, N) = W (cout, K) @ B (K, N) */
    if ((rc = gemm_cols(prec, CDB_NO_TRANS, cv->cout, (int)N, K, cv->w, K, B, B16, (int)N, 0.0f,
                        z, (int)N, e)))
        return rc;
    RN_PAR_FOR
    for (c = 0; c < cv->cout; c++) {
        float *zc = z + (size_t)c * N, *yc = y + (size_t)c * N;
        float s, t;
        size_t i;
        if (bn) { /* batch statistics: zc becomes xhat, y = w xhat + b */
            const double mean = lane_sum(zc, N, 0, 0.0f) / (double)N;
            const double var = lane_sum(zc, N, 1, (float)mean) / (double)N;
            const float m = (float)mean, r = (float)(1.0 / sqrt(var + RN_BN_EPS));
            bn->rstd[c] = r;
            if (md->update) { /* the trainer's own buffers (train.h) */
                float *rm = (float *)cv->bn_mean, *rv = (float *)cv->bn_var;
                const double unb = N > 1 ? var * (double)N / (double)(N - 1) : var;
                rm[c] = (float)((1.0 - RN_BN_MOMENTUM) * rm[c] + RN_BN_MOMENTUM * mean);
                rv[c] = (float)((1.0 - RN_BN_MOMENTUM) * rv[c] + RN_BN_MOMENTUM * unb);
            }
            s = cv->bn_w[c], t = cv->bn_b[c];
            if (relu)
                RN_SIMD
                for (i = 0; i < N; i++) {
                    const float xh = (zc[i] - m) * r, v = xh * s + t;
                    zc[i] = xh;
                    yc[i] = v > 0.0f ? v : 0.0f;
                }
            else
                RN_SIMD
                for (i = 0; i < N; i++) {
                    const float xh = (zc[i] - m) * r;
                    zc[i] = xh;
                    yc[i] = xh * s + t;
                }
            continue;
        }
        s = cv->scale[c], t = cv->shift[c];
        if (relu)
            RN_SIMD
            for (i = 0; i < N; i++) {
                const float v = zc[i] * s + t;
                yc[i] = v > 0.0f ? v : 0.0f;
            }
        else
            RN_SIMD
            for (i = 0; i < N; i++) yc[i] = zc[i] * s + t;
    }
    return CLIPDB_OK;
}

/* The backward of conv_bn (training): dy (cout, N) = dL/dy in (destroyed);
** g's conv and batch-norm gradients += (NULL: frozen, skipped); dx (cin, nb,
** H, W) = dL/dx (beta 0) or += (beta 1), NULL: not needed. y: the forward's
** output, for the relu's mask (relu only). */
static int conv_bn_backward(const rn_mode *md, const cdb_conv *cv, const cdb_conv *g,
                            const float *x, int nb, int H, int W, int stride, const float *y,
                            const rn_bn *bn, float *dy, float *dx, float beta, float *cols,
                            cdb_err *e)
{
    const int Ho = conv_out(H, cv->k, stride), Wo = conv_out(W, cv->k, stride);
    const int K = cv->cin * cv->k * cv->k, direct = cv->k == 1 && stride == 1;
    const size_t N = (size_t)nb * Ho * Wo;
    float *gw = (float *)g->w, *gbw = (float *)g->bn_w, *gbb = (float *)g->bn_b;
    /* dz as bf16 (cout, N), rounded once here for both GEMMs below, as each
    ** would round it */
    uint16_t *z16 = md->dz16 && cols_bf16(md->prec) && (gw || dx) ? md->dz16 : NULL;
    const float *A = z16 ? NULL : dy;
    int c, rc;
    RN_PAR_FOR
    for (c = 0; c < cv->cout; c++) {
        /* dz = w rstd (dy - mean(dy) - xhat mean(dy xhat)) */
        float *d = dy + (size_t)c * N;
        const float *xh = bn->xhat + (size_t)c * N, *yc = y ? y + (size_t)c * N : NULL;
        float a, b, k;
        double sd = 0.0, sdx = 0.0;
        size_t i, j, i0;
        if (yc)
            RN_SIMD
            for (i = 0; i < N; i++) d[i] = yc[i] > 0.0f ? d[i] : 0.0f;
        for (i0 = 0; i0 + RN_BLOCK <= N; i0 += RN_BLOCK) { /* sums as lane_sum's */
            float acc[RN_LANES] = {0}, accx[RN_LANES] = {0}, p = 0.0f, px = 0.0f;
            for (i = i0; i < i0 + RN_BLOCK; i += RN_LANES)
                for (j = 0; j < RN_LANES; j++) acc[j] += d[i + j], accx[j] += d[i + j] * xh[i + j];
            for (j = 0; j < RN_LANES; j++) p += acc[j], px += accx[j];
            sd += p, sdx += px;
        }
        for (i = i0; i < N; i++) sd += d[i], sdx += (double)d[i] * xh[i];
        if (gbw) gbw[c] += (float)sdx;
        if (gbb) gbb[c] += (float)sd;
        k = cv->bn_w[c] * bn->rstd[c];
        a = (float)(sd / (double)N), b = (float)(sdx / (double)N);
        RN_SIMD
        for (i = 0; i < N; i++) d[i] = k * (d[i] - a - xh[i] * b);
        if (z16) cdb_convert_best()->to_bf16(d, N, z16 + (size_t)c * N);
    }
    if (!gw && !dx) return CLIPDB_OK;
    if (gw) { /* dW (cout, K) += dz (cout, N) @ cols (K, N)^T */
        const float *B = x;
        const uint16_t *B16 = NULL;
        if (!direct) { /* as conv_bn's; cols is then free again for dcols below */
            uint16_t *c16 = cols_bf16(md->prec) ? (uint16_t *)cols : NULL;
            im2col_cnhw(x, cv->cin, nb, H, W, cv->k, stride, cols, c16);
            B = c16 ? NULL : cols;
            B16 = c16;
        }
        if ((rc = gemm_wgrad(md->prec, cv->cout, K, (int)N, A, z16, B, B16, gw, md->wscratch, e)))
            return rc;
    }
    if (!dx) return CLIPDB_OK;
    if (direct) /* dx (cin, N) (+)= W^T (cin, cout) @ dz (cout, N) */
        return gemm_cols(md->prec, CDB_TRANS, K, (int)N, cv->cout, cv->w, K, A, z16, (int)N, beta,
                         dx, (int)N, e);
    /* dcols (K, N) = W^T @ dz, then scattered back */
    if ((rc = gemm_cols(md->prec, CDB_TRANS, K, (int)N, cv->cout, cv->w, K, A, z16, (int)N, 0.0f,
                        cols, (int)N, e)))
        return rc;
    if (beta == 0.0f) memset(dx, 0, (size_t)cv->cin * nb * H * W * sizeof *dx);
    col2im_cnhw(cols, cv->cin, nb, H, W, cv->k, stride, dx);
    return CLIPDB_OK;
}

/* ---- average pooling ------------------------------------------------------ */

/* y (C, nb, H/s, W/s) = s x s average pooling of x (C, nb, H, W), floor mode
** as torch's AvgPool2d(s). y may not alias x. */
static void avgpool(const float *x, int C, int nb, int H, int W, int s, float *y)
{
    const int Ho = H / s, Wo = W / s;
    const float inv = 1.0f / (float)(s * s);
    long p;
    RN_PAR_FOR
    for (p = 0; p < (long)C * nb; p++) {
        const float *xp = x + (size_t)p * H * W;
        float *yp = y + (size_t)p * Ho * Wo;
        int oy, ox, dy, dx;
        for (oy = 0; oy < Ho; oy++)
            for (ox = 0; ox < Wo; ox++) {
                float sum = 0.0f;
                for (dy = 0; dy < s; dy++)
                    for (dx = 0; dx < s; dx++) sum += xp[(size_t)(oy * s + dy) * W + ox * s + dx];
                yp[oy * Wo + ox] = sum * inv;
            }
    }
}

/* dx (C, nb, H, W) = avgpool's backward of dy (C, nb, H/s, W/s): each
** pixel of a window gets dy / s^2; the rows and columns floor mode left
** out get 0. */
static void avgpool_backward(const float *dy, int C, int nb, int H, int W, int s, float *dx)
{
    const int Ho = H / s, Wo = W / s;
    const float inv = 1.0f / (float)(s * s);
    long p;
    RN_PAR_FOR
    for (p = 0; p < (long)C * nb; p++) {
        const float *yp = dy + (size_t)p * Ho * Wo;
        float *xp = dx + (size_t)p * H * W;
        int iy, ox, d;
        for (iy = 0; iy < H; iy++) {
            const float *yr;
            float *xr = xp + (size_t)iy * W;
            if (iy / s >= Ho) {
                memset(xr, 0, (size_t)W * sizeof *xr);
                continue;
            }
            yr = yp + (size_t)(iy / s) * Wo;
            for (ox = 0; ox < Wo; ox++) {
                const float g = yr[ox] * inv;
                for (d = 0; d < s; d++) xr[ox * s + d] = g;
            }
            if (Wo * s < W) memset(xr + Wo * s, 0, (size_t)(W - Wo * s) * sizeof *xr);
        }
    }
}

/* ---- the bottleneck ------------------------------------------------------- */

/* Where a bottleneck's intermediate values go. Inference: a1 = p2 = pin =
** one scratch, a2 and id scratch, bn NULL. Training: each its own record,
** bn[4] the batch norms of c1, c2, c3, down. */
typedef struct rn_brec {
    float *a1;      /* (planes, nb, H, W) relu(bn1(c1(x))) */
    float *a2;      /* (planes, nb, H, W) relu(bn2(c2(a1))) */
    float *p2;      /* (planes, nb, Ho, Wo) avgpool(a2) (stride 2), else unused */
    float *pin;     /* (cin, nb, Ho, Wo) avgpool(x) (stride 2 with down), else unused */
    float *id;      /* (4 planes, nb, Ho, Wo) the down path's output */
    rn_bn *bn;
} rn_brec;

/* x (cin, nb, H, W) -> out (4 planes, nb, H/s, W/s) = relu(bn3(c3(pool(a2)))
** + skip); out may alias none of the record. */
static int bottleneck(const rn_mode *md, const cdb_bottleneck *bk, const float *x, int nb, int H,
                      int W, const rn_brec *r, float *cols, float *out, cdb_err *e)
{
    const int s = bk->stride, Ho = H / s, Wo = W / s, cout = bk->c3.cout;
    const size_t n = (size_t)cout * nb * Ho * Wo;
    const float *skip = x, *c3_in = r->a2;
    rn_bn *bn = r->bn;
    size_t i;
    int rc;
    if ((rc = conv_bn(md, &bk->c1, x, nb, H, W, 1, 1, cols, r->a1, bn ? &bn[0] : NULL, e)) ||
        (rc = conv_bn(md, &bk->c2, r->a1, nb, H, W, 1, 1, cols, r->a2, bn ? &bn[1] : NULL, e)))
        return rc;
    if (s > 1) {
        avgpool(r->a2, bk->c2.cout, nb, H, W, s, r->p2);
        c3_in = r->p2;
    }
    if ((rc = conv_bn(md, &bk->c3, c3_in, nb, Ho, Wo, 1, 0, cols, out, bn ? &bn[2] : NULL, e)))
        return rc;
    if (bk->down.w) {
        const float *d_in = x;
        if (s > 1) {
            avgpool(x, bk->c1.cin, nb, H, W, s, r->pin);
            d_in = r->pin;
        }
        if ((rc = conv_bn(md, &bk->down, d_in, nb, Ho, Wo, 1, 0, cols, r->id, bn ? &bn[3] : NULL,
                          e)))
            return rc;
        skip = r->id;
    }
    for (i = 0; i < n; i++) {
        const float v = out[i] + skip[i];
        out[i] = v > 0.0f ? v : 0.0f;
    }
    return CLIPDB_OK;
}

/* The backward of a bottleneck: dout (4 planes, nb, Ho, Wo) = dL/dout in
** (destroyed); dx (cin, nb, H, W) = dL/dx (NULL: not needed); s1, s2:
** scratch of the block's largest activation; g: gradient views. */
static int bottleneck_backward(const rn_mode *md, const cdb_bottleneck *bk,
                               const cdb_bottleneck *g, const float *x, int nb, int H, int W,
                               const rn_brec *r, const float *out, float *dout, float *dx,
                               float *s1, float *s2, float *cols, cdb_err *e)
{
    const int s = bk->stride, Ho = H / s, Wo = W / s, planes = bk->c2.cout;
    const size_t n = (size_t)bk->c3.cout * nb * Ho * Wo;
    float *da2;
    size_t i;
    int rc;
    for (i = 0; i < n; i++) dout[i] = out[i] > 0.0f ? dout[i] : 0.0f; /* the final relu */
    if (bk->down.w) { /* the skip path: pool - down conv - bn */
        const float *d_in = s > 1 ? r->pin : x;
        float *d_pin = dx ? (s > 1 ? s2 : dx) : NULL;
        memcpy(s1, dout, n * sizeof *s1);
        if ((rc = conv_bn_backward(md, &bk->down, &g->down, d_in, nb, Ho, Wo, 1, NULL, &r->bn[3],
                                   s1, d_pin, 0.0f, cols, e)))
            return rc;
        if (dx && s > 1) avgpool_backward(s2, bk->c1.cin, nb, H, W, s, dx);
    } else if (dx) {
        memcpy(dx, dout, n * sizeof *dx);
    }
    /* the main path, top down: c3 (its input p2 or a2) */
    if ((rc = conv_bn_backward(md, &bk->c3, &g->c3, s > 1 ? r->p2 : r->a2, nb, Ho, Wo, 1, NULL,
                               &r->bn[2], dout, s1, 0.0f, cols, e)))
        return rc;
    da2 = s1;
    if (s > 1) {
        avgpool_backward(s1, planes, nb, H, W, s, s2);
        da2 = s2;
    }
    /* c2 (3x3, input a1, relu mask a2) -> da1; c1 (1x1, input x, relu mask a1) */
    {
        float *da1 = da2 == s1 ? s2 : s1;
        if ((rc = conv_bn_backward(md, &bk->c2, &g->c2, r->a1, nb, H, W, 1, r->a2, &r->bn[1], da2,
                                   da1, 0.0f, cols, e)) ||
            (rc = conv_bn_backward(md, &bk->c1, &g->c1, x, nb, H, W, 1, r->a1, &r->bn[0], da1,
                                   dx, 1.0f, cols, e)))
            return rc;
    }
    return CLIPDB_OK;
}

/* ---- the attention pool ------------------------------------------------------ */

/* Its buffers: inference scratch, or the training record. */
typedef struct rn_pool {
    float *tok;     /* (nb*T, dim) [mean over the grid; the grid] + pos */
    float *k, *v;   /* (nb*T, dim) */
    float *q;       /* (nb, dim) from the mean tokens only */
    float *att;     /* (nb, dim) heads concatenated */
    float *p;       /* (nb, heads, T) attention weights */
} rn_pool;

/* The attention pool of x (dim, nb, G*G) -> out (nb, e). */
static int attnpool(const rn_mode *md, const cdb_resnet *rn, int e_dim, const float *x, int nb,
                    const rn_pool *b, float *out, cdb_err *e)
{
    const int D = rn->dim, HW = rn->grid * rn->grid, T = HW + 1, hd = CDB_HEAD_DIM;
    const size_t rows = (size_t)nb * T;
    const cdb_prec prec = md ? md->prec : CDB_PREC_FP32;
    int n, rc;
    /* tok (nb, T, dim): [mean over the grid; the grid] + pos */
    RN_PAR_FOR
    for (n = 0; n < nb; n++) {
        float *t0 = b->tok + (size_t)n * T * D;
        int c, j;
        for (c = 0; c < D; c++) {
            const float *xc = x + ((size_t)c * nb + n) * HW;
            float sum = 0.0f;
            for (j = 0; j < HW; j++) {
                t0[(size_t)(j + 1) * D + c] = xc[j] + rn->pos[(size_t)(j + 1) * D + c];
                sum += xc[j];
            }
            t0[c] = sum / (float)HW + rn->pos[c];
        }
    }
    /* k, v (nb*T, dim) = tok @ W^T + b; q (nb, dim) from the mean tokens only */
    if ((rc = gemm(prec, CDB_NO_TRANS, CDB_TRANS, (int)rows, D, D, b->tok, D, rn->wk, D, 0.0f,
                   b->k, D, e)) ||
        (rc = gemm(prec, CDB_NO_TRANS, CDB_TRANS, (int)rows, D, D, b->tok, D, rn->wv, D, 0.0f,
                   b->v, D, e)) ||
        (rc = gemm(prec, CDB_NO_TRANS, CDB_TRANS, nb, D, D, b->tok, T * D, rn->wq, D, 0.0f, b->q,
                   D, e)))
        return rc;
    cdb_add_bias(b->k, rn->bk, rows, (size_t)D);
    cdb_add_bias(b->v, rn->bv, rows, (size_t)D);
    cdb_add_bias(b->q, rn->bq, (size_t)nb, (size_t)D);
    RN_PAR_FOR
    for (n = 0; n < nb; n++) {
        int h, j, c;
        for (h = 0; h < rn->heads; h++) {
            const float *qh = b->q + (size_t)n * D + h * hd;
            float *oh = b->att + (size_t)n * D + h * hd;
            float *sc = b->p + ((size_t)n * rn->heads + h) * T;
            for (j = 0; j < T; j++)
                sc[j] = cdb_sdot(hd, qh, b->k + ((size_t)n * T + j) * D + h * hd);
            cdb_softmax(sc, (size_t)T, 1.0f / sqrtf((float)hd));
            for (c = 0; c < hd; c++) oh[c] = 0.0f;
            for (j = 0; j < T; j++) {
                const float *vj = b->v + ((size_t)n * T + j) * D + h * hd;
                for (c = 0; c < hd; c++) oh[c] += sc[j] * vj[c];
            }
        }
    }
    /* out (nb, e) = att @ c_proj^T + b */
    if ((rc = gemm(prec, CDB_NO_TRANS, CDB_TRANS, nb, e_dim, D, b->att, D, rn->wc, D, 0.0f, out,
                   e_dim, e)))
        return rc;
    cdb_add_bias(out, rn->bc, (size_t)nb, (size_t)e_dim);
    return CLIPDB_OK;
}

/* The backward of attnpool: from dout (nb, e), g's pool tensors +=; dx (dim,
** nb, G*G) = dL/dx unless NULL. dk, dv: scratch (nb*T, dim) each; dq (nb, dim).
** The record's tokens are overwritten (by their gradient). */
static int attnpool_backward(const rn_mode *md, const cdb_resnet *rn, const cdb_resnet *g,
                             int e_dim, int nb, const rn_pool *b, const float *dout, float *dx,
                             float *dk, float *dv, float *dq, cdb_err *e)
{
    const int D = rn->dim, HW = rn->grid * rn->grid, T = HW + 1, hd = CDB_HEAD_DIM;
    const size_t rows = (size_t)nb * T;
    const float scale = 1.0f / sqrtf((float)hd);
    float *datt = dq; /* (nb, D): datt first, then dq over it per sequence below */
    float *dtok = b->tok; /* the tokens' gradient, over the tokens once they are read */
    int n, rc = CLIPDB_OK;
    /* c_proj: g->wc (e, D) += dout^T @ att; datt (nb, D) = dout @ wc */
    if (g->wc &&
        (rc = gemm(md->prec, CDB_TRANS, CDB_NO_TRANS, e_dim, D, nb, dout, e_dim, b->att, D, 1.0f,
                   (float *)g->wc, D, e)))
        return rc;
    cdb_bias_backward((float *)g->bc, dout, (size_t)e_dim, (size_t)nb, (size_t)e_dim);
    if (!g->wq && !g->wk && !g->wv && !g->bq && !g->bk && !g->bv && !g->pos && !dx)
        return CLIPDB_OK;
    if ((rc = gemm(md->prec, CDB_NO_TRANS, CDB_NO_TRANS, nb, D, e_dim, dout, e_dim, rn->wc, D,
                   0.0f, datt, D, e)))
        return rc;
    /* per sequence and head: o = sum_j p_j v_j, p = softmax(scale q . k_j) */
    RN_PAR_FOR
    for (n = 0; n < nb; n++) {
        int h, j, c;
        for (h = 0; h < rn->heads; h++) {
            const float *p = b->p + ((size_t)n * rn->heads + h) * T;
            const float *qh = b->q + (size_t)n * D + h * hd;
            float *dah = datt + (size_t)n * D + h * hd, dqh[CDB_HEAD_DIM];
            double dot = 0.0;
            for (c = 0; c < hd; c++) dqh[c] = 0.0f;
            /* dv_j = p_j do; dp_j = do . v_j; dsc_j = p_j (dp_j - sum p dp) */
            for (j = 0; j < T; j++) {
                const float *vj = b->v + ((size_t)n * T + j) * D + h * hd;
                float *dvj = dv + ((size_t)n * T + j) * D + h * hd;
                for (c = 0; c < hd; c++) dvj[c] = p[j] * dah[c];
                dot += (double)p[j] * cdb_sdot(hd, dah, vj);
            }
            for (j = 0; j < T; j++) {
                const float *vj = b->v + ((size_t)n * T + j) * D + h * hd;
                const float *kj = b->k + ((size_t)n * T + j) * D + h * hd;
                float *dkj = dk + ((size_t)n * T + j) * D + h * hd;
                const float dsc = p[j] * (cdb_sdot(hd, dah, vj) - (float)dot) * scale;
                for (c = 0; c < hd; c++) {
                    dqh[c] += dsc * kj[c];
                    dkj[c] = dsc * qh[c];
                }
            }
            memcpy(dah, dqh, sizeof dqh); /* datt's head is read; now it holds dq's */
        }
    }
    /* dq = datt now. Weights: g->w (D, D) += d^T @ input; biases */
    if ((g->wq && (rc = gemm(md->prec, CDB_TRANS, CDB_NO_TRANS, D, D, nb, dq, D, b->tok, T * D,
                             1.0f, (float *)g->wq, D, e))) ||
        (g->wk && (rc = gemm(md->prec, CDB_TRANS, CDB_NO_TRANS, D, D, (int)rows, dk, D, b->tok, D,
                             1.0f, (float *)g->wk, D, e))) ||
        (g->wv && (rc = gemm(md->prec, CDB_TRANS, CDB_NO_TRANS, D, D, (int)rows, dv, D, b->tok, D,
                             1.0f, (float *)g->wv, D, e))))
        return rc;
    cdb_bias_backward((float *)g->bq, dq, (size_t)D, (size_t)nb, (size_t)D);
    cdb_bias_backward((float *)g->bk, dk, (size_t)D, rows, (size_t)D);
    cdb_bias_backward((float *)g->bv, dv, (size_t)D, rows, (size_t)D);
    if (!g->pos && !dx) return CLIPDB_OK;
    /* dtok (nb*T, D) = dk @ wk + dv @ wv (+ dq @ wq on the mean rows), written
    ** over tok (its last readers were the weight gradients above) */
    if ((rc = gemm(md->prec, CDB_NO_TRANS, CDB_NO_TRANS, (int)rows, D, D, dk, D, rn->wk, D, 0.0f,
                   dtok, D, e)) ||
        (rc = gemm(md->prec, CDB_NO_TRANS, CDB_NO_TRANS, (int)rows, D, D, dv, D, rn->wv, D, 1.0f,
                   dtok, D, e)) ||
        (rc = gemm(md->prec, CDB_NO_TRANS, CDB_NO_TRANS, nb, D, D, dq, D, rn->wq, D, 1.0f, dtok,
                   T * D, e)))
        return rc;
    if (g->pos) { /* pos (T, D) += sum over the sequences */
        float *gp = (float *)g->pos;
        for (n = 0; n < nb; n++) {
            size_t i;
            for (i = 0; i < (size_t)T * D; i++) gp[i] += dtok[(size_t)n * T * D + i];
        }
    }
    if (dx) { /* dx (D, nb, HW) = the grid rows + the mean row / HW */
        RN_PAR_FOR
        for (n = 0; n < nb; n++) {
            const float *t0 = dtok + (size_t)n * T * D;
            int c, j;
            for (c = 0; c < D; c++) {
                float *xc = dx + ((size_t)c * nb + n) * HW;
                const float m = t0[c] / (float)HW;
                for (j = 0; j < HW; j++) xc[j] = t0[(size_t)(j + 1) * D + c] + m;
            }
        }
    }
    return CLIPDB_OK;
}

/* ---- the tower -------------------------------------------------------------- */

/* The largest activation (floats per image) and column matrix of the tower at
** image side S, for sizing the buffers once. */
static void rn_sizes(const cdb_resnet *rn, int S, size_t *act, size_t *cols)
{
    int H = conv_out(S, 3, 2), l, b, i = 0;
    size_t a = 0, c = 0, v;
#define MAXTO(x, y) ((x) = (y) > (x) ? (y) : (x))
    MAXTO(a, (size_t)3 * S * S);                                 /* the input */
    MAXTO(c, (size_t)27 * H * H);                                /* stem conv1 */
    MAXTO(a, (size_t)rn->stem[2].cout * H * H);
    MAXTO(c, (size_t)9 * rn->stem[1].cin * H * H);
    MAXTO(c, (size_t)9 * rn->stem[2].cin * H * H);
    H /= 2;
    for (l = 0; l < 4; l++)
        for (b = 0; b < rn->layers[l]; b++, i++) {
            const cdb_bottleneck *bk = &rn->blocks[i];
            v = (size_t)bk->c3.cout * H * H;
            MAXTO(a, v);
            MAXTO(a, (size_t)bk->c1.cin * H * H);
            MAXTO(c, (size_t)9 * bk->c2.cin * H * H);
            H /= bk->stride;
        }
    MAXTO(a, (size_t)2 * (H * H + 1) * rn->dim); /* the pool's k and v */
#undef MAXTO
    *act = a;
    *cols = c;
}

static int check_side(const cdb_resnet *rn, int S, cdb_err *e)
{
    if (S != rn->grid * 32 || S < 32)
        return cdb_err_set(e, CLIPDB_EINVAL, "ResNet tower: image side %d is not 32 x %d", S,
                           rn->grid);
    return CLIPDB_OK;
}

/* x (3, nb, S, S) of pixels (nb, 3, S, S) */
static void to_cnhw(const float *px, int nb, int S, float *x)
{
    int c, k;
    for (c = 0; c < 3; c++)
        for (k = 0; k < nb; k++)
            memcpy(x + ((size_t)c * nb + k) * S * S, px + ((size_t)k * 3 + c) * S * S,
                   (size_t)S * S * sizeof *x);
}

int cdb_resnet_forward(const cdb_resnet *rn, int S, int e_dim, const float *pixels, int n,
                       float *out, cdb_err *e)
{
    float *act[5] = {NULL, NULL, NULL, NULL, NULL}, *cols = NULL, *small = NULL;
    size_t asz, csz;
    int rc = CLIPDB_OK, i0, j;
    if (n < 0) return cdb_err_set(e, CLIPDB_EINVAL, "negative image count");
    if (n == 0) return CLIPDB_OK;
    if ((rc = check_side(rn, S, e))) return rc;
    rn_sizes(rn, S, &asz, &csz);
    {
        const size_t nb = n < RN_CHUNK ? (size_t)n : RN_CHUNK, T = (size_t)rn->grid * rn->grid + 1;
        for (j = 0; j < 5; j++)
            if (!(act[j] = cdb_malloc_array(nb * asz, sizeof(float)))) goto oom;
        if (!(cols = cdb_malloc_array(nb * csz, sizeof *cols))) goto oom;
        /* the pool's q, att (nb, dim) and weights (nb, heads, T) */
        if (!(small = cdb_malloc_array(nb * (2 * (size_t)rn->dim + (size_t)rn->heads * T),
                                       sizeof *small)))
            goto oom;
    }
    for (i0 = 0; i0 < n; i0 += RN_CHUNK) {
        const int nb = n - i0 < RN_CHUNK ? n - i0 : RN_CHUNK;
        float *x = act[0], *y = act[1], *tmp;
        const rn_brec br = {act[2], act[3], act[2], act[2], act[4], NULL};
        rn_pool pl;
        int H = S, l, b, i = 0;
        to_cnhw(pixels + (size_t)i0 * 3 * S * S, nb, S, x);
        /* stem */
        if ((rc = conv_bn(NULL, &rn->stem[0], x, nb, H, H, 2, 1, cols, y, NULL, e))) goto cleanup;
        H = conv_out(H, 3, 2);
        if ((rc = conv_bn(NULL, &rn->stem[1], y, nb, H, H, 1, 1, cols, x, NULL, e)) ||
            (rc = conv_bn(NULL, &rn->stem[2], x, nb, H, H, 1, 1, cols, y, NULL, e)))
            goto cleanup;
        avgpool(y, rn->stem[2].cout, nb, H, H, 2, x);
        H /= 2;
        /* stages */
        for (l = 0; l < 4; l++)
            for (b = 0; b < rn->layers[l]; b++, i++) {
                const cdb_bottleneck *bk = &rn->blocks[i];
                if ((rc = bottleneck(NULL, bk, x, nb, H, H, &br, cols, y, e))) goto cleanup;
                H /= bk->stride;
                tmp = x, x = y, y = tmp;
            }
        if (H != rn->grid) {
            rc = cdb_err_set(e, CLIPDB_EINVAL, "ResNet tower ends at %dx%d, not %dx%d", H, H,
                             rn->grid, rn->grid);
            goto cleanup;
        }
        {
            const size_t T = (size_t)rn->grid * rn->grid + 1, rows = (size_t)nb * T;
            pl.tok = act[2], pl.k = act[3], pl.v = act[3] + rows * rn->dim;
            pl.q = small, pl.att = small + (size_t)nb * rn->dim;
            pl.p = small + (size_t)2 * nb * rn->dim;
        }
        if ((rc = attnpool(NULL, rn, e_dim, x, nb, &pl, out + (size_t)i0 * e_dim, e)))
            goto cleanup;
    }
    goto cleanup;
oom:
    rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (ResNet activations)");
cleanup:
    for (j = 0; j < 5; j++) free(act[j]);
    free(cols);
    free(small);
    return rc;
}

/* ---- training: the forward with activations kept, and the backward ------------ */

/* The activations of one micro-batch (one allocation, laid out by layout()). */
struct cdb_rn_train {
    cdb_prec prec;
    int nb, S;                /* what the record is laid out for */
    const cdb_resnet *rn;
    float *buf;
    size_t cap;
    float *px;                /* (3, nb, S, S) the input */
    float *s[3];              /* (c, nb, S/2, S/2) the stem's relu outputs */
    rn_bn sbn[3];
    float *x0;                /* (w, nb, S/4, S/4) the stem's pooled output: block 0's input */
    rn_brec *br;              /* [n_blocks] */
    rn_bn *bns;               /* [4 n_blocks] */
    float **outs;             /* [n_blocks] each block's output (the next one's input) */
    rn_pool pool;
    float *d[4];              /* backward scratch: the block's largest activation each */
    float *cols;
    float *dk, *dv, *dq;      /* the pool's backward scratch */
    float *wscratch;          /* RN_SPLIT x the largest convolution weight */
    uint16_t *dz16;           /* the largest activation as bf16 (rn_mode's dz16) */
};

struct cdb_rn_train *cdb_rn_train_new(cdb_prec prec)
{
    struct cdb_rn_train *t = calloc(1, sizeof *t);
    if (t) t->prec = prec;
    return t;
}

void cdb_rn_train_free(struct cdb_rn_train *t)
{
    if (!t) return;
    free(t->buf);
    free(t->br);
    free(t->bns);
    free(t->outs);
    free(t);
}

/* n floats at *off of base (base NULL: only counted). */
static float *take(float *base, size_t *off, size_t n)
{
    float *p = base ? base + *off : NULL;
    *off += n;
    return p;
}

/* Lays the record for nb images out over base (NULL: counts); the floats. */
static size_t layout(struct cdb_rn_train *t, const cdb_resnet *rn, int S, int nb, float *base)
{
    const size_t B = (size_t)nb, T = (size_t)rn->grid * rn->grid + 1, D = (size_t)rn->dim;
    size_t off = 0, asz, csz;
    int H = conv_out(S, 3, 2), i, l, b, k = 0;
    rn_sizes(rn, S, &asz, &csz);
    t->px = take(base, &off, 3 * B * S * S);
    for (i = 0; i < 3; i++) {
        const size_t n = (size_t)rn->stem[i].cout * B * H * H;
        t->s[i] = take(base, &off, n);
        t->sbn[i].xhat = take(base, &off, n);
        t->sbn[i].rstd = take(base, &off, (size_t)rn->stem[i].cout);
    }
    H /= 2;
    t->x0 = take(base, &off, (size_t)rn->stem[2].cout * B * H * H);
    for (l = 0; l < 4; l++)
        for (b = 0; b < rn->layers[l]; b++, k++) {
            const cdb_bottleneck *bk = &rn->blocks[k];
            const size_t p = (size_t)bk->c2.cout, o = (size_t)bk->c3.cout, hw = (size_t)H * H;
            const size_t hwo = hw / ((size_t)bk->stride * bk->stride);
            rn_brec *r = &t->br[k];
            rn_bn *bn = &t->bns[4 * k];
            r->bn = bn;
            r->a1 = take(base, &off, p * B * hw);
            bn[0].xhat = take(base, &off, p * B * hw);
            r->a2 = take(base, &off, p * B * hw);
            bn[1].xhat = take(base, &off, p * B * hw);
            r->p2 = bk->stride > 1 ? take(base, &off, p * B * hwo) : NULL;
            bn[2].xhat = take(base, &off, o * B * hwo);
            r->pin = bk->down.w && bk->stride > 1 ? take(base, &off, (size_t)bk->c1.cin * B * hwo)
                                                  : NULL;
            bn[3].xhat = bk->down.w ? take(base, &off, o * B * hwo) : NULL;
            r->id = bk->down.w ? take(base, &off, o * B * hwo) : NULL;
            t->outs[k] = take(base, &off, o * B * hwo);
            bn[0].rstd = take(base, &off, p);
            bn[1].rstd = take(base, &off, p);
            bn[2].rstd = take(base, &off, o);
            bn[3].rstd = bk->down.w ? take(base, &off, o) : NULL;
            H /= bk->stride;
        }
    t->pool.tok = take(base, &off, B * T * D);
    t->pool.k = take(base, &off, B * T * D);
    t->pool.v = take(base, &off, B * T * D);
    t->pool.q = take(base, &off, B * D);
    t->pool.att = take(base, &off, B * D);
    t->pool.p = take(base, &off, B * (size_t)rn->heads * T);
    for (i = 0; i < 4; i++) t->d[i] = take(base, &off, B * asz);
    t->cols = take(base, &off, B * csz);
    t->dz16 = (uint16_t *)take(base, &off, (B * asz + 1) / 2);
    t->dk = take(base, &off, B * T * D);
    t->dv = take(base, &off, B * T * D);
    t->dq = take(base, &off, B * D);
    {
        size_t wmax = 0;
        for (i = 0; i < 3; i++)
            if ((size_t)rn->stem[i].cout * rn->stem[i].cin * 9 > wmax)
                wmax = (size_t)rn->stem[i].cout * rn->stem[i].cin * 9;
        for (k = 0; k < rn->n_blocks; k++) {
            const cdb_bottleneck *bk = &rn->blocks[k];
            const size_t w2 = (size_t)bk->c2.cout * bk->c2.cin * 9;
            const size_t w3 = (size_t)bk->c3.cout * bk->c3.cin, wd = (size_t)bk->c3.cout * bk->c1.cin;
            if (w2 > wmax) wmax = w2;
            if (w3 > wmax) wmax = w3;
            if (wd > wmax) wmax = wd;
        }
        t->wscratch = take(base, &off, RN_SPLIT * wmax);
    }
    return off;
}

static int reserve(struct cdb_rn_train *t, const cdb_resnet *rn, int S, int nb, cdb_err *e)
{
    size_t need;
    if (t->rn == rn && t->S == S && t->nb == nb) return CLIPDB_OK;
    free(t->br), free(t->bns), free(t->outs);
    t->br = cdb_calloc_array((size_t)rn->n_blocks, sizeof *t->br);
    t->bns = cdb_calloc_array((size_t)4 * rn->n_blocks, sizeof *t->bns);
    t->outs = cdb_calloc_array((size_t)rn->n_blocks, sizeof *t->outs);
    t->rn = NULL;
    if (!t->br || !t->bns || !t->outs) goto oom;
    need = layout(t, rn, S, nb, NULL);
    if (cdb_reserve((void **)&t->buf, &t->cap, need, sizeof *t->buf)) goto oom;
    layout(t, rn, S, nb, t->buf);
    t->rn = rn, t->S = S, t->nb = nb;
    return CLIPDB_OK;
oom:
    return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (ResNet training activations, %d images)",
                       nb);
}

int cdb_resnet_train_forward(struct cdb_rn_train *t, const cdb_resnet *rn, int S, int e_dim,
                             const float *pixels, int nb, int update, float *out, cdb_err *e)
{
    const rn_mode md = {t->prec, update, NULL, NULL};
    const float *x;
    int rc, H = S, l, b, k = 0;
    if ((rc = check_side(rn, S, e))) return rc;
    if (nb < 1 || (size_t)nb * rn->grid * rn->grid < 2)
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "batch norm in training needs more than one value per channel "
                           "(%d images of a %dx%d grid)", nb, rn->grid, rn->grid);
    if ((rc = reserve(t, rn, S, nb, e))) return rc;
    to_cnhw(pixels, nb, S, t->px);
    if ((rc = conv_bn(&md, &rn->stem[0], t->px, nb, H, H, 2, 1, t->cols, t->s[0], &t->sbn[0], e)))
        return rc;
    H = conv_out(H, 3, 2);
    if ((rc = conv_bn(&md, &rn->stem[1], t->s[0], nb, H, H, 1, 1, t->cols, t->s[1], &t->sbn[1],
                      e)) ||
        (rc = conv_bn(&md, &rn->stem[2], t->s[1], nb, H, H, 1, 1, t->cols, t->s[2], &t->sbn[2], e)))
        return rc;
    avgpool(t->s[2], rn->stem[2].cout, nb, H, H, 2, t->x0);
    H /= 2;
    x = t->x0;
    for (l = 0; l < 4; l++)
        for (b = 0; b < rn->layers[l]; b++, k++) {
            if ((rc = bottleneck(&md, &rn->blocks[k], x, nb, H, H, &t->br[k], t->cols, t->outs[k],
                                 e)))
                return rc;
            x = t->outs[k];
            H /= rn->blocks[k].stride;
        }
    return attnpool(&md, rn, e_dim, x, nb, &t->pool, out, e);
}

int cdb_resnet_train_backward(struct cdb_rn_train *t, const cdb_resnet *rn, const cdb_resnet *g,
                              int e_dim, int lo, const float *dout, cdb_err *e)
{
    const rn_mode md = {t->prec, 0, t->wscratch, t->dz16};
    const int nb = t->nb, S = t->S;
    float *dy = t->d[0], *dx = t->d[1], *tmp;
    int rc, k, H;
    if (t->rn != rn) return cdb_err_set(e, CLIPDB_ERROR, "internal: backward without forward");
    /* the pool: dy (dim, nb, G*G) unless nothing below it trains */
    if ((rc = attnpool_backward(&md, rn, g, e_dim, nb, &t->pool, dout, lo < rn->n_blocks ? dy : NULL,
                                t->dk, t->dv, t->dq, e)))
        return rc;
    H = rn->grid;
    for (k = rn->n_blocks - 1; k >= 0 && k >= lo; k--) {
        const cdb_bottleneck *bk = &rn->blocks[k];
        const float *xin = k ? t->outs[k - 1] : t->x0;
        const int Hin = H * bk->stride;
        if ((rc = bottleneck_backward(&md, bk, &g->blocks[k], xin, nb, Hin, Hin, &t->br[k],
                                      t->outs[k], dy, k > lo || lo < 0 ? dx : NULL, t->d[2],
                                      t->d[3], t->cols, e)))
            return rc;
        tmp = dy, dy = dx, dx = tmp;
        H = Hin;
    }
    if (lo >= 0) return CLIPDB_OK;
    /* the stem: dy (w, nb, S/4, S/4) -> pool -> conv3, conv2, conv1 (no dx: pixels) */
    H = conv_out(S, 3, 2);
    avgpool_backward(dy, rn->stem[2].cout, nb, H, H, 2, dx);
    if ((rc = conv_bn_backward(&md, &rn->stem[2], &g->stem[2], t->s[1], nb, H, H, 1, t->s[2],
                               &t->sbn[2], dx, dy, 0.0f, t->cols, e)) ||
        (rc = conv_bn_backward(&md, &rn->stem[1], &g->stem[1], t->s[0], nb, H, H, 1, t->s[1],
                               &t->sbn[1], dy, dx, 0.0f, t->cols, e)) ||
        (rc = conv_bn_backward(&md, &rn->stem[0], &g->stem[0], t->px, nb, S, S, 2, t->s[0],
                               &t->sbn[0], dx, NULL, 0.0f, t->cols, e)))
        return rc;
    return CLIPDB_OK;
}
