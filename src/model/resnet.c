/*
** resnet.c: the inference forward of CLIP's ModifiedResNet image tower
** (model.h cdb_resnet): convolutions as GEMMs over im2col columns, batch norm
** folded into a per-channel scale and shift, the anti-aliased strides
** (average pooling), and the attention pool.
**
** Layout: a chunk of nb images is held channel-major, "CNHW": row c of an
** activation holds channel c of every image, (nb, H, W) after each other.
** Then a 1x1 convolution is one GEMM, W (cout, cin) @ X (cin, nb*H*W), and a
** 3x3 one is the same over the columns (cin*9, nb*Ho*Wo): small images (64
** px: 2x2 at the end) still make large GEMMs.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "model/model.h"
#include "model/transformer.h"

/* Images per chunk: bounds the activations (RN50 at 224 px: about 30 MB an
** image for the largest buffers together). */
#define RN_CHUNK 8

/* The buffers of one chunk: x and y (a block's input and output, swapped
** after each), t1, t2 (its scratch), id (its identity path), cols. */
typedef struct rn_bufs {
    float *act[5];
    float *cols;
} rn_bufs;

/* Output side of a k x k convolution with padding k / 2 and the stride. */
static int conv_out(int h, int k, int stride)
{
    return (h + 2 * (k / 2) - k) / stride + 1;
}

/* cols (cin*k*k, nb*Ho*Wo) of x (cin, nb, H, W), zero outside the image. */
static void im2col_cnhw(const float *x, int cin, int nb, int H, int W, int k, int stride,
                        float *cols)
{
    const int pad = k / 2, Ho = conv_out(H, k, stride), Wo = conv_out(W, k, stride);
    const size_t plane = (size_t)H * W, row = (size_t)nb * Ho * Wo;
    int c, ky, kx, n, oy, ox;
    for (c = 0; c < cin; c++)
        for (ky = 0; ky < k; ky++)
            for (kx = 0; kx < k; kx++) {
                float *dst = cols + ((size_t)(c * k + ky) * k + kx) * row;
                for (n = 0; n < nb; n++) {
                    const float *src = x + ((size_t)c * nb + n) * plane;
                    for (oy = 0; oy < Ho; oy++) {
                        const int iy = oy * stride - pad + ky;
                        if (iy < 0 || iy >= H) {
                            memset(dst, 0, (size_t)Wo * sizeof *dst);
                            dst += Wo;
                            continue;
                        }
                        for (ox = 0; ox < Wo; ox++) {
                            const int ix = ox * stride - pad + kx;
                            *dst++ = ix < 0 || ix >= W ? 0.0f : src[(size_t)iy * W + ix];
                        }
                    }
                }
            }
}

/* y (cout, nb*Ho*Wo) = bn(conv(x)), then relu when asked. */
static void conv_bn(const cdb_conv *cv, const float *x, int nb, int H, int W, int stride,
                    int relu, float *cols, float *y)
{
    const int Ho = conv_out(H, cv->k, stride), Wo = conv_out(W, cv->k, stride);
    const size_t cols_n = (size_t)nb * Ho * Wo;
    const float *B = x;
    int c;
    size_t i;
    if (cv->k != 1 || stride != 1) {
        im2col_cnhw(x, cv->cin, nb, H, W, cv->k, stride, cols);
        B = cols;
    }
    /* y (cout, N) = W (cout, cin*k*k) @ B (cin*k*k, N) */
    cdb_sgemm(CDB_NO_TRANS, CDB_NO_TRANS, cv->cout, (int)cols_n, cv->cin * cv->k * cv->k, 1.0f,
              cv->w, cv->cin * cv->k * cv->k, B, (int)cols_n, 0.0f, y, (int)cols_n);
    for (c = 0; c < cv->cout; c++) {
        float *yc = y + (size_t)c * cols_n;
        const float s = cv->scale[c], t = cv->shift[c];
        if (relu)
            for (i = 0; i < cols_n; i++) {
                const float v = yc[i] * s + t;
                yc[i] = v > 0.0f ? v : 0.0f;
            }
        else
            for (i = 0; i < cols_n; i++) yc[i] = yc[i] * s + t;
    }
}

/* y (C, nb, H/s, W/s) = s x s average pooling of x (C, nb, H, W), floor mode
** as torch's AvgPool2d(s). y may not alias x. */
static void avgpool(const float *x, int C, int nb, int H, int W, int s, float *y)
{
    const int Ho = H / s, Wo = W / s;
    const float inv = 1.0f / (float)(s * s);
    size_t p;
    int oy, ox, dy, dx;
    for (p = 0; p < (size_t)C * nb; p++) {
        const float *xp = x + p * H * W;
        float *yp = y + p * Ho * Wo;
        for (oy = 0; oy < Ho; oy++)
            for (ox = 0; ox < Wo; ox++) {
                float sum = 0.0f;
                for (dy = 0; dy < s; dy++)
                    for (dx = 0; dx < s; dx++) sum += xp[(size_t)(oy * s + dy) * W + ox * s + dx];
                yp[oy * Wo + ox] = sum * inv;
            }
    }
}

/* One bottleneck: x (cin, nb, H, W) -> out (4 planes, nb, H/s, W/s).
** t1, t2: scratch; id: the identity path. out may alias none of them. */
static void bottleneck(const cdb_bottleneck *bk, const float *x, int nb, int H, int W,
                       float *t1, float *t2, float *id, float *cols, float *out)
{
    const int s = bk->stride, Ho = H / s, Wo = W / s, cout = bk->c3.cout;
    const size_t n = (size_t)cout * nb * Ho * Wo;
    const float *skip = x;
    size_t i;
    conv_bn(&bk->c1, x, nb, H, W, 1, 1, cols, t1);  /* (planes, nb, H, W) */
    conv_bn(&bk->c2, t1, nb, H, W, 1, 1, cols, t2); /* (planes, nb, H, W) */
    if (s > 1) {
        avgpool(t2, bk->c2.cout, nb, H, W, s, t1);
        conv_bn(&bk->c3, t1, nb, Ho, Wo, 1, 0, cols, out);
    } else {
        conv_bn(&bk->c3, t2, nb, H, W, 1, 0, cols, out);
    }
    if (bk->down.w) {
        const float *d_in = x;
        if (s > 1) {
            avgpool(x, bk->c1.cin, nb, H, W, s, t1);
            d_in = t1;
        }
        conv_bn(&bk->down, d_in, nb, Ho, Wo, 1, 0, cols, id);
        skip = id;
    }
    for (i = 0; i < n; i++) {
        const float v = out[i] + skip[i];
        out[i] = v > 0.0f ? v : 0.0f;
    }
}

/* The attention pool of x (dim, nb, G*G) -> out (nb, e). tok: (nb*T, dim)
** scratch, T = G*G + 1; kv: (2, nb*T, dim) scratch. */
static int attnpool(const cdb_resnet *rn, int e_dim, const float *x, int nb, float *tok,
                    float *kv, float *out, cdb_err *e)
{
    const int D = rn->dim, HW = rn->grid * rn->grid, T = HW + 1, hd = CDB_HEAD_DIM;
    const size_t rows = (size_t)nb * T;
    float *k = kv, *v = kv + rows * D, *q = NULL, *att = NULL, *sc = NULL;
    int n, j, c, h, rc = CLIPDB_OK;
    /* tok (nb, T, dim): [mean over the grid; the grid] + pos */
    for (n = 0; n < nb; n++) {
        float *t0 = tok + (size_t)n * T * D;
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
    q = cdb_malloc_array((size_t)nb * D, sizeof *q);
    att = cdb_malloc_array((size_t)nb * D, sizeof *att);
    sc = cdb_malloc_array((size_t)T, sizeof *sc);
    if (!q || !att || !sc) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (attention pool)");
        goto cleanup;
    }
    /* k, v (nb*T, dim) = tok @ W^T + b; q (nb, dim) from the mean tokens only */
    if ((rc = cdb_linear(NULL, rn->wk, (int)rows, D, D, tok, D, 0.0f, k, D, e)) ||
        (rc = cdb_linear(NULL, rn->wv, (int)rows, D, D, tok, D, 0.0f, v, D, e)) ||
        (rc = cdb_linear(NULL, rn->wq, nb, D, D, tok, T * D, 0.0f, q, D, e)))
        goto cleanup;
    cdb_add_bias(k, rn->bk, rows, (size_t)D);
    cdb_add_bias(v, rn->bv, rows, (size_t)D);
    cdb_add_bias(q, rn->bq, (size_t)nb, (size_t)D);
    for (n = 0; n < nb; n++)
        for (h = 0; h < rn->heads; h++) {
            const float *qh = q + (size_t)n * D + h * hd;
            float *oh = att + (size_t)n * D + h * hd;
            for (j = 0; j < T; j++)
                sc[j] = cdb_sdot(hd, qh, k + ((size_t)n * T + j) * D + h * hd);
            cdb_softmax(sc, (size_t)T, 1.0f / sqrtf((float)hd));
            for (c = 0; c < hd; c++) oh[c] = 0.0f;
            for (j = 0; j < T; j++) {
                const float *vj = v + ((size_t)n * T + j) * D + h * hd;
                for (c = 0; c < hd; c++) oh[c] += sc[j] * vj[c];
            }
        }
    /* out (nb, e) = att @ c_proj^T + b */
    if ((rc = cdb_linear(NULL, rn->wc, nb, e_dim, D, att, D, 0.0f, out, e_dim, e))) goto cleanup;
    cdb_add_bias(out, rn->bc, (size_t)nb, (size_t)e_dim);
cleanup:
    free(q);
    free(att);
    free(sc);
    return rc;
}

/* Makes *p hold n floats. */
static int need(float **p, size_t *cap, size_t n, cdb_err *e)
{
    if (cdb_reserve((void **)p, cap, n, sizeof **p))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (ResNet activations)");
    return CLIPDB_OK;
}

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

int cdb_resnet_forward(const cdb_resnet *rn, int S, int e_dim, const float *pixels, int n,
                       float *out, cdb_err *e)
{
    rn_bufs B;
    size_t act, cols, cap;
    int rc = CLIPDB_OK, i0, j;
    memset(&B, 0, sizeof B);
    if (n < 0) return cdb_err_set(e, CLIPDB_EINVAL, "negative image count");
    if (n == 0) return CLIPDB_OK;
    if (S != rn->grid * 32 || S < 32)
        return cdb_err_set(e, CLIPDB_EINVAL, "ResNet tower: image side %d is not 32 x %d", S,
                           rn->grid);
    rn_sizes(rn, S, &act, &cols);
    {
        const size_t nb = n < RN_CHUNK ? (size_t)n : RN_CHUNK;
        for (j = 0; j < 5; j++) {
            cap = 0;
            if ((rc = need(&B.act[j], &cap, nb * act, e))) goto cleanup;
        }
        cap = 0;
        if ((rc = need(&B.cols, &cap, nb * cols, e))) goto cleanup;
    }
    for (i0 = 0; i0 < n; i0 += RN_CHUNK) {
        const int nb = n - i0 < RN_CHUNK ? n - i0 : RN_CHUNK;
        const float *px = pixels + (size_t)i0 * 3 * S * S;
        float *x = B.act[0], *y = B.act[1], *tmp;
        int H = S, l, b, i = 0, c, k;
        /* the input (nb, 3, S, S) as (3, nb, S, S) */
        for (c = 0; c < 3; c++)
            for (k = 0; k < nb; k++)
                memcpy(x + ((size_t)c * nb + k) * S * S, px + ((size_t)k * 3 + c) * S * S,
                       (size_t)S * S * sizeof *x);
        /* stem */
        conv_bn(&rn->stem[0], x, nb, H, H, 2, 1, B.cols, y);
        H = conv_out(H, 3, 2);
        conv_bn(&rn->stem[1], y, nb, H, H, 1, 1, B.cols, x);
        conv_bn(&rn->stem[2], x, nb, H, H, 1, 1, B.cols, y);
        avgpool(y, rn->stem[2].cout, nb, H, H, 2, x);
        H /= 2;
        /* stages */
        for (l = 0; l < 4; l++)
            for (b = 0; b < rn->layers[l]; b++, i++) {
                const cdb_bottleneck *bk = &rn->blocks[i];
                bottleneck(bk, x, nb, H, H, B.act[2], B.act[3], B.act[4], B.cols, y);
                H /= bk->stride;
                tmp = x, x = y, y = tmp;
            }
        if (H != rn->grid) {
            rc = cdb_err_set(e, CLIPDB_EINVAL, "ResNet tower ends at %dx%d, not %dx%d", H, H,
                             rn->grid, rn->grid);
            goto cleanup;
        }
        if ((rc = attnpool(rn, e_dim, x, nb, B.act[2], B.act[3], out + (size_t)i0 * e_dim, e)))
            goto cleanup;
    }
cleanup:
    for (j = 0; j < 5; j++) free(B.act[j]);
    free(B.cols);
    return rc;
}
