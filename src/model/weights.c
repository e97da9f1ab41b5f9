/*
** weights.c: binds the tensors of a safetensors file to the fp32 views of
** model.h, for both key conventions, and the model's identity.
**
** Key conventions (detected from the names):
**   openai  OpenAI `clip` / open_clip: visual.conv1.weight,
**           visual.transformer.resblocks.N.attn.in_proj_weight (3d, d), ...,
**           visual.proj (d, e), text_projection (d, e)
**   hf      Hugging Face CLIPModel: vision_model.embeddings.patch_embedding.weight,
**           vision_model.encoder.layers.N.self_attn.{q,k,v}_proj.weight (d, d),
**           ..., visual_projection.weight (e, d), text_projection.weight (e, d)
** Unknown extra tensors (e.g. HF's int64 position_ids) are ignored.
**
** The architecture is inferred from the shapes (widths, layer counts, patch,
** image size, context, vocabulary, embedding size), then every tensor is
** checked against it; the first missing or mis-shaped tensor is named.
**
** F32 tensors are used in place in the mapping when 4-byte aligned (no copy);
** unaligned F32, F16 and BF16 tensors are converted exactly to fp32 once, into
** memory the model owns (m->owned).
**
** Identity: "clip-<arch>-<first 16 hex digits of SHA-256 of the weights file>".
** The digest is computed on first use (under m->identity_lock) over the mapped
** file and kept in memory. It is also cached in the user's cache directory,
** never in the model directory (a search must not write there):
** $XDG_CACHE_HOME/clipdb/identity/<SHA-256 of the weights file's real path>,
** else ~/.cache/clipdb/identity/..., holding "<size> <mtime_ns> <64 hex>\n"
** (written atomically; when no cache directory can be made or written the
** digest is simply not cached). The cache is trusted only when size and
** mtime_ns equal those of the weights file as it was stat()ed right after it
** was mapped, so an edited file is hashed again.
*/
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "weights.c reads little-endian safetensors data in place: little-endian hosts only"
#endif

/* Inferred sizes above this are rejected as implausible (keeps int math safe). */
#define MAX_DIM (1 << 20)
#define MAX_LAYERS 1000

/* ---- key conventions ------------------------------------------------------- */

typedef struct keys {
    const char *style;
    int packed_qkv;         /* openai: one in_proj (3d, d); hf: q/k/v_proj (d, d) each */
    int proj_transposed;    /* projections stored (e, d) */
    const char *vis_layer;  /* prefix of vision block N: "<prefix>N." */
    const char *txt_layer;
    const char *ln1, *ln2, *attn_out, *fc1, *fc2; /* within a block, before .weight/.bias */
    const char *conv, *cls, *vpos, *ln_pre, *ln_post, *vproj;
    const char *tok, *tpos, *ln_final, *tproj, *logit_scale;
} keys;

static const keys openai_keys = {
    "openai", 1, 0, "visual.transformer.resblocks.", "transformer.resblocks.",
    "ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj",
    "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
    "visual.ln_pre", "visual.ln_post", "visual.proj",
    "token_embedding.weight", "positional_embedding", "ln_final", "text_projection",
    "logit_scale",
};

static const keys hf_keys = {
    "hf", 0, 1, "vision_model.encoder.layers.", "text_model.encoder.layers.",
    "layer_norm1", "layer_norm2", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
    "vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm",
    "vision_model.post_layernorm", "visual_projection.weight",
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight", "text_model.final_layer_norm",
    "text_projection.weight", "logit_scale",
};

static int has_prefix(const char *s, const char *p)
{
    return strncmp(s, p, strlen(p)) == 0;
}

/* Picks the convention whose prefixes the tensor names use. */
static int detect_keys(const cdb_safetensors *st, const keys **out, cdb_err *e)
{
    size_t i, n_openai = 0, n_hf = 0;
    for (i = 0; i < st->n; i++) {
        const char *s = st->tensors[i].name;
        if (has_prefix(s, "visual.") || has_prefix(s, "transformer.resblocks.")) n_openai++;
        if (has_prefix(s, "vision_model.") || has_prefix(s, "text_model.")) n_hf++;
    }
    if (n_openai && n_hf)
        return cdb_err_set(e, CLIPDB_EFORMAT,
                           "mixes OpenAI ('visual.*', %zu tensors) and Hugging Face "
                           "('vision_model.*'/'text_model.*', %zu tensors) key names",
                           n_openai, n_hf);
    if (!n_openai && !n_hf)
        return cdb_err_set(e, CLIPDB_EFORMAT,
                           "not a CLIP checkpoint: no OpenAI ('visual.*') or Hugging Face "
                           "('vision_model.*') tensor names among its %zu tensors",
                           st->n);
    *out = n_openai ? &openai_keys : &hf_keys;
    return CLIPDB_OK;
}

/* ---- binding ------------------------------------------------------------------ */

typedef struct binder {
    clipdb_model *m;
    const keys *k;
    unsigned dtypes_seen; /* bit (1 << CDB_DT_*) per bound tensor */
    char name[256];
} binder;

static void fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t at = 0;
    int i;
    at += (size_t)snprintf(buf, n, "[");
    for (i = 0; i < ndim && at < n; i++)
        at += (size_t)snprintf(buf + at, n - at, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (at < n) snprintf(buf + at, n - at, "]");
}

/* Formats the tensor name into b->name and looks it up; names it if missing. */
static int lookup(binder *b, const cdb_tensor **out, const char *fmt, va_list ap)
{
    int len = vsnprintf(b->name, sizeof b->name, fmt, ap);
    if (len < 0 || (size_t)len >= sizeof b->name)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT, "tensor name too long");
    *out = cdb_st_find(b->m->st, b->name);
    if (!*out)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT, "missing tensor '%s'", b->name);
    return CLIPDB_OK;
}

/* Finds a tensor with `ndim` dimensions (any sizes): used to infer sizes. */
static int probe(binder *b, const cdb_tensor **out, int ndim, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int probe(binder *b, const cdb_tensor **out, int ndim, const char *fmt, ...)
{
    char got[128];
    va_list ap;
    int rc, i;
    va_start(ap, fmt);
    rc = lookup(b, out, fmt, ap);
    va_end(ap);
    if (rc != CLIPDB_OK) return rc;
    fmt_shape(got, sizeof got, (*out)->ndim, (*out)->shape);
    if ((*out)->ndim != ndim)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "tensor '%s' has shape %s, expected %d dimensions", b->name, got,
                           ndim);
    for (i = 0; i < ndim; i++)
        if ((*out)->shape[i] < 1 || (*out)->shape[i] > MAX_DIM)
            return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                               "tensor '%s' has shape %s: dimension %d out of range [1, %d]",
                               b->name, got, i, MAX_DIM);
    return CLIPDB_OK;
}

static int keep_owned(clipdb_model *m, void *p)
{
    if (cdb_grow((void **)&m->owned, &m->cap_owned, m->n_owned + 1, sizeof *m->owned)) return 0;
    m->owned[m->n_owned++] = p;
    return 1;
}

/* IEEE binary16 -> binary32, exact (subnormals, inf, NaN payloads). */
float cdb_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: man * 2^-24, renormalised */
        int shift = 0;
        while (!(man & 0x400u)) {
            man <<= 1;
            shift++;
        }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((man & 0x3ffu) << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* bfloat16 is the top half of a binary32. */

/* An fp32 view of t: in place when aligned F32, else a converted copy owned by m. */
static int as_f32(binder *b, const cdb_tensor *t, const float **out)
{
    clipdb_model *m = b->m;
    size_t i, n = (size_t)t->numel;
    float *dst;

    if (t->dtype != CDB_DT_F32 && t->dtype != CDB_DT_F16 && t->dtype != CDB_DT_BF16)
        return cdb_err_set(&m->err, CLIPDB_EFORMAT,
                           "tensor '%s' has dtype %s; weights must be F32, F16 or BF16",
                           t->name, t->dtype_name);
    b->dtypes_seen |= 1u << t->dtype;
    if (t->dtype == CDB_DT_F32 && ((uintptr_t)t->data & (sizeof(float) - 1)) == 0) {
        *out = (const float *)(const void *)t->data;
        return CLIPDB_OK;
    }
    dst = cdb_malloc_array(n ? n : 1, sizeof *dst);
    if (!dst || !keep_owned(m, dst)) {
        free(dst);
        return cdb_err_set(&m->err, CLIPDB_ENOMEM, "out of memory converting tensor '%s'",
                           t->name);
    }
    if (t->dtype == CDB_DT_F32) {
        memcpy(dst, t->data, n * sizeof *dst);
    } else {
        for (i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(t->data[2 * i] | (t->data[2 * i + 1] << 8));
            dst[i] = t->dtype == CDB_DT_F16 ? cdb_f16_to_f32(h) : cdb_bf16_to_f32(h);
        }
    }
    *out = dst;
    return CLIPDB_OK;
}

/* Binds the tensor named by fmt, which must have exactly the shape (d0[, d1[, d2[, d3]]])
** given by ndim and the dims. */
static int get(binder *b, const float **out, int ndim, int64_t d0, int64_t d1, int64_t d2,
               int64_t d3, const char *fmt, ...) __attribute__((format(printf, 8, 9)));
static int get(binder *b, const float **out, int ndim, int64_t d0, int64_t d1, int64_t d2,
               int64_t d3, const char *fmt, ...)
{
    const int64_t want[4] = {d0, d1, d2, d3};
    const cdb_tensor *t;
    va_list ap;
    int rc, i, ok;

    va_start(ap, fmt);
    rc = lookup(b, &t, fmt, ap);
    va_end(ap);
    if (rc != CLIPDB_OK) return rc;
    ok = t->ndim == ndim;
    for (i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (!ok) {
        char got[128], exp[128];
        fmt_shape(got, sizeof got, t->ndim, t->shape);
        fmt_shape(exp, sizeof exp, ndim, want);
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT, "tensor '%s' has shape %s, expected %s",
                           b->name, got, exp);
    }
    return as_f32(b, t, out);
}

#define GET1(out, a, ...) get(b, out, 1, a, 0, 0, 0, __VA_ARGS__)
#define GET2(out, a, c, ...) get(b, out, 2, a, c, 0, 0, __VA_ARGS__)

/* Counts blocks "<prefix>N.*": one past the largest N. Gaps are found later
** when a block's tensors turn out missing. */
static int count_layers(binder *b, const char *prefix, int *out)
{
    const cdb_safetensors *st = b->m->st;
    size_t i, plen = strlen(prefix);
    long max = -1;
    for (i = 0; i < st->n; i++) {
        const char *s = st->tensors[i].name, *p;
        long v = 0;
        if (strncmp(s, prefix, plen) != 0) continue;
        for (p = s + plen; *p >= '0' && *p <= '9' && v <= MAX_LAYERS; p++) v = v * 10 + (*p - '0');
        if (p == s + plen || *p != '.') continue;
        if (v >= MAX_LAYERS)
            return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                               "tensor '%s': layer index over the limit of %d", s, MAX_LAYERS);
        if (v > max) max = v;
    }
    if (max < 0)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT, "no tensors named '%sN.*' (layers)",
                           prefix);
    *out = (int)max + 1;
    return CLIPDB_OK;
}

static int check_width(binder *b, const char *tower, int d)
{
    if (d % CDB_HEAD_DIM != 0)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "%s width %d is not a multiple of %d (the head size)", tower, d,
                           CDB_HEAD_DIM);
    return CLIPDB_OK;
}

/* The blocks, final LayerNorm and projection (d -> e) of one tower; t->width set. */
static int bind_tower(binder *b, cdb_tower *t, const char *pre, const char *ln_post,
                      const char *proj, int e)
{
    const keys *k = b->k;
    const cdb_tensor *fc1;
    int rc, i;
    int64_t d = t->width, f;

    rc = count_layers(b, pre, &t->layers);
    if (rc != CLIPDB_OK) return rc;
    t->heads = t->width / CDB_HEAD_DIM;
    rc = probe(b, &fc1, 2, "%s0.%s.weight", pre, k->fc1);
    if (rc != CLIPDB_OK) return rc;
    t->mlp = (int)fc1->shape[0];
    f = t->mlp;
    t->blocks = cdb_calloc_array((size_t)t->layers, sizeof *t->blocks);
    if (!t->blocks) return cdb_err_set(&b->m->err, CLIPDB_ENOMEM, "out of memory");
    for (i = 0; i < t->layers; i++) {
        cdb_block *blk = &t->blocks[i];
        if ((rc = GET1(&blk->ln1_w, d, "%s%d.%s.weight", pre, i, k->ln1)) ||
            (rc = GET1(&blk->ln1_b, d, "%s%d.%s.bias", pre, i, k->ln1)))
            return rc;
        if (k->packed_qkv) {
            const float *w, *bias;
            // in_proj_weight (3d, d) = [Wq; Wk; Wv], in_proj_bias (3d) = [bq; bk; bv]
            if ((rc = GET2(&w, 3 * d, d, "%s%d.attn.in_proj_weight", pre, i)) ||
                (rc = GET1(&bias, 3 * d, "%s%d.attn.in_proj_bias", pre, i)))
                return rc;
            blk->wq = w;
            blk->wk = w + d * d;
            blk->wv = w + 2 * d * d;
            blk->bq = bias;
            blk->bk = bias + d;
            blk->bv = bias + 2 * d;
        } else {
            if ((rc = GET2(&blk->wq, d, d, "%s%d.self_attn.q_proj.weight", pre, i)) ||
                (rc = GET1(&blk->bq, d, "%s%d.self_attn.q_proj.bias", pre, i)) ||
                (rc = GET2(&blk->wk, d, d, "%s%d.self_attn.k_proj.weight", pre, i)) ||
                (rc = GET1(&blk->bk, d, "%s%d.self_attn.k_proj.bias", pre, i)) ||
                (rc = GET2(&blk->wv, d, d, "%s%d.self_attn.v_proj.weight", pre, i)) ||
                (rc = GET1(&blk->bv, d, "%s%d.self_attn.v_proj.bias", pre, i)))
                return rc;
        }
        if ((rc = GET2(&blk->wo, d, d, "%s%d.%s.weight", pre, i, k->attn_out)) ||
            (rc = GET1(&blk->bo, d, "%s%d.%s.bias", pre, i, k->attn_out)) ||
            (rc = GET1(&blk->ln2_w, d, "%s%d.%s.weight", pre, i, k->ln2)) ||
            (rc = GET1(&blk->ln2_b, d, "%s%d.%s.bias", pre, i, k->ln2)) ||
            (rc = GET2(&blk->fc1_w, f, d, "%s%d.%s.weight", pre, i, k->fc1)) ||
            (rc = GET1(&blk->fc1_b, f, "%s%d.%s.bias", pre, i, k->fc1)) ||
            (rc = GET2(&blk->fc2_w, d, f, "%s%d.%s.weight", pre, i, k->fc2)) ||
            (rc = GET1(&blk->fc2_b, d, "%s%d.%s.bias", pre, i, k->fc2)))
            return rc;
    }
    if ((rc = GET1(&t->ln_post_w, d, "%s.weight", ln_post)) ||
        (rc = GET1(&t->ln_post_b, d, "%s.bias", ln_post)))
        return rc;
    t->proj_transposed = k->proj_transposed;
    // projection: openai (d, e), y = x @ proj; hf (e, d), y = x @ proj^T
    return k->proj_transposed ? GET2(&t->proj, e, d, "%s", proj) : GET2(&t->proj, d, e, "%s", proj);
}

static int bind_vision(binder *b, int e)
{
    const keys *k = b->k;
    cdb_vision *v = &b->m->vision;
    const cdb_tensor *conv, *pos;
    int rc, d, P;

    if ((rc = probe(b, &conv, 4, "%s", k->conv)) || (rc = probe(b, &pos, 2, "%s", k->vpos)))
        return rc;
    d = v->t.width = (int)conv->shape[0];
    P = v->patch = (int)conv->shape[2];
    if ((rc = check_width(b, "vision", d))) return rc;
    // conv1 (d, 3, P, P), no bias
    if ((rc = get(b, &v->patch_w, 4, d, 3, P, P, "%s", k->conv))) return rc;
    /* positions: grid * grid patches + the class token */
    v->n_pos = (int)pos->shape[0];
    for (v->grid = 1; (int64_t)v->grid * v->grid < v->n_pos - 1; v->grid++) continue;
    if ((int64_t)v->grid * v->grid != v->n_pos - 1)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "tensor '%s' has %d positions, not grid*grid + 1 for a square image",
                           k->vpos, v->n_pos);
    v->image_size = v->grid * P;
    if ((rc = GET2(&v->pos_emb, v->n_pos, d, "%s", k->vpos)) ||
        (rc = GET1(&v->class_emb, d, "%s", k->cls)) ||
        (rc = GET1(&v->ln_pre_w, d, "%s.weight", k->ln_pre)) ||
        (rc = GET1(&v->ln_pre_b, d, "%s.bias", k->ln_pre)))
        return rc;
    return bind_tower(b, &v->t, k->vis_layer, k->ln_post, k->vproj, e);
}

/* ---- the ResNet image tower (OpenAI names only) ------------------------------ */

#define RN_PROBE "visual.layer1.0.conv1.weight"

/* conv (cout, cin, k, k) "visual.<conv>.weight" and its batch norm
** "visual.<bn>.{weight,bias,running_mean,running_var}", folded. */
static int bind_conv(binder *b, cdb_conv *cv, int cout, int cin, int k, const char *conv,
                     const char *bn)
{
    float *fold;
    int rc, c;
    cv->cout = cout, cv->cin = cin, cv->k = k;
    if ((rc = get(b, &cv->w, 4, cout, cin, k, k, "visual.%s.weight", conv)) ||
        (rc = GET1(&cv->bn_w, cout, "visual.%s.weight", bn)) ||
        (rc = GET1(&cv->bn_b, cout, "visual.%s.bias", bn)) ||
        (rc = GET1(&cv->bn_mean, cout, "visual.%s.running_mean", bn)) ||
        (rc = GET1(&cv->bn_var, cout, "visual.%s.running_var", bn)))
        return rc;
    fold = cdb_malloc_array((size_t)2 * cout, sizeof *fold);
    if (!fold || !keep_owned(b->m, fold)) {
        free(fold);
        return cdb_err_set(&b->m->err, CLIPDB_ENOMEM, "out of memory");
    }
    cv->scale = fold, cv->shift = fold + cout;
    if ((c = cdb_conv_fold(cv)) >= 0)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "tensor 'visual.%s.running_var' has a negative or NaN entry (%d)", bn,
                           c);
    return CLIPDB_OK;
}

static int bind_resnet(binder *b, int e)
{
    cdb_vision *v = &b->m->vision;
    cdb_resnet *rn;
    const cdb_tensor *c1, *pos;
    char conv[64], bn[64];
    int rc, l, i, k, w, inplanes, G, T;

    if (!(rn = v->rn = calloc(1, sizeof *rn)))
        return cdb_err_set(&b->m->err, CLIPDB_ENOMEM, "out of memory");
    if ((rc = probe(b, &c1, 4, "%s", RN_PROBE))) return rc;
    w = rn->width = (int)c1->shape[0];
    if (w % 2 || w > 4096)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "tensor '%s' gives a ResNet width of %d (must be even, <= 4096)",
                           RN_PROBE, w);
    for (l = 0; l < 4; l++) {
        snprintf(conv, sizeof conv, "visual.layer%d.", l + 1);
        if ((rc = count_layers(b, conv, &rn->layers[l]))) return rc;
        rn->n_blocks += rn->layers[l];
    }
    if (!(rn->blocks = cdb_calloc_array((size_t)rn->n_blocks, sizeof *rn->blocks)))
        return cdb_err_set(&b->m->err, CLIPDB_ENOMEM, "out of memory");
    /* the stem: 3 -> w/2 -> w/2 -> w */
    if ((rc = bind_conv(b, &rn->stem[0], w / 2, 3, 3, "conv1", "bn1")) ||
        (rc = bind_conv(b, &rn->stem[1], w / 2, w / 2, 3, "conv2", "bn2")) ||
        (rc = bind_conv(b, &rn->stem[2], w, w / 2, 3, "conv3", "bn3")))
        return rc;
    inplanes = w;
    for (l = 0, k = 0; l < 4; l++)
        for (i = 0; i < rn->layers[l]; i++, k++) {
            cdb_bottleneck *bk = &rn->blocks[k];
            const int planes = w << l;
            int down;
            bk->stride = l > 0 && i == 0 ? 2 : 1;
            down = bk->stride > 1 || inplanes != 4 * planes;
#define NAMES(cn, bnn) (snprintf(conv, sizeof conv, "layer%d.%d.%s", l + 1, i, cn), \
                        snprintf(bn, sizeof bn, "layer%d.%d.%s", l + 1, i, bnn))
            if ((NAMES("conv1", "bn1"), rc = bind_conv(b, &bk->c1, planes, inplanes, 1, conv, bn)) ||
                (NAMES("conv2", "bn2"), rc = bind_conv(b, &bk->c2, planes, planes, 3, conv, bn)) ||
                (NAMES("conv3", "bn3"),
                 rc = bind_conv(b, &bk->c3, 4 * planes, planes, 1, conv, bn)))
                return rc;
            NAMES("downsample.0", "downsample.1");
#undef NAMES
            if (down) {
                if ((rc = bind_conv(b, &bk->down, 4 * planes, inplanes, 1, conv, bn))) return rc;
            } else {
                /* torch would refuse it too (strict loading): a file of another design */
                char full[80];
                snprintf(full, sizeof full, "visual.%s.weight", conv);
                if (cdb_st_find(b->m->st, full))
                    return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                                       "unexpected tensor '%s': block %d of stage %d keeps its "
                                       "shape, CLIP's ResNet has no downsample there", full, i,
                                       l + 1);
            }
            inplanes = 4 * planes;
        }
    /* the attention pool: (G*G + 1, 32 w) positions, heads of 64 */
    if ((rc = probe(b, &pos, 2, "visual.attnpool.positional_embedding"))) return rc;
    rn->dim = 32 * w;
    T = (int)pos->shape[0];
    for (G = 1; (int64_t)G * G < T - 1; G++) continue;
    if ((int64_t)G * G != T - 1 || G > 1024)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "tensor 'visual.attnpool.positional_embedding' has %d positions, "
                           "not grid*grid + 1 for a square image", T);
    rn->grid = G;
    rn->heads = rn->dim / CDB_HEAD_DIM;
    if (rn->dim % CDB_HEAD_DIM)
        return cdb_err_set(&b->m->err, CLIPDB_EFORMAT,
                           "ResNet width %d: the attention pool's %d is not a multiple of %d",
                           w, rn->dim, CDB_HEAD_DIM);
    if ((rc = GET2(&rn->pos, T, rn->dim, "visual.attnpool.positional_embedding")) ||
        (rc = GET2(&rn->wq, rn->dim, rn->dim, "visual.attnpool.q_proj.weight")) ||
        (rc = GET1(&rn->bq, rn->dim, "visual.attnpool.q_proj.bias")) ||
        (rc = GET2(&rn->wk, rn->dim, rn->dim, "visual.attnpool.k_proj.weight")) ||
        (rc = GET1(&rn->bk, rn->dim, "visual.attnpool.k_proj.bias")) ||
        (rc = GET2(&rn->wv, rn->dim, rn->dim, "visual.attnpool.v_proj.weight")) ||
        (rc = GET1(&rn->bv, rn->dim, "visual.attnpool.v_proj.bias")) ||
        (rc = GET2(&rn->wc, e, rn->dim, "visual.attnpool.c_proj.weight")) ||
        (rc = GET1(&rn->bc, e, "visual.attnpool.c_proj.bias")))
        return rc;
    v->image_size = 32 * G;
    return CLIPDB_OK;
}

static int bind_text(binder *b, int e)
{
    const keys *k = b->k;
    cdb_text *x = &b->m->text;
    const cdb_tensor *tok, *pos;
    int rc, d;

    if ((rc = probe(b, &tok, 2, "%s", k->tok)) || (rc = probe(b, &pos, 2, "%s", k->tpos)))
        return rc;
    x->vocab = (int)tok->shape[0];
    d = x->t.width = (int)tok->shape[1];
    x->context = (int)pos->shape[0];
    if ((rc = check_width(b, "text", d))) return rc;
    if ((rc = GET2(&x->tok_emb, x->vocab, d, "%s", k->tok)) ||
        (rc = GET2(&x->pos_emb, x->context, d, "%s", k->tpos)))
        return rc;
    return bind_tower(b, &x->t, k->txt_layer, k->ln_final, k->tproj, e);
}

static const char *dtype_label(unsigned seen)
{
    if (seen == 1u << CDB_DT_F32) return "F32";
    if (seen == 1u << CDB_DT_F16) return "F16";
    if (seen == 1u << CDB_DT_BF16) return "BF16";
    return "mixed";
}

int cdb_weights_bind(clipdb_model *m)
{
    binder bb, *b = &bb;
    const cdb_tensor *vproj, *ls;
    const float *lsv;
    struct stat sb;
    int rc, e;

    memset(b, 0, sizeof *b);
    b->m = m;
    if (!m->st) return cdb_err_set(&m->err, CLIPDB_EINVAL, "no weights file mapped");
    rc = detect_keys(m->st, &b->k, &m->err);
    if (rc != CLIPDB_OK) goto cleanup;
    m->key_style = b->k->style;

    if (b->k == &openai_keys && cdb_st_find(m->st, RN_PROBE)) {
        /* a ResNet image tower: e from the attention pool's output projection */
        if ((rc = probe(b, &vproj, 2, "visual.attnpool.c_proj.weight"))) goto cleanup;
        e = m->embed_dim = (int)vproj->shape[0];
        rc = bind_resnet(b, e);
    } else {
        /* The joint embedding size e, from the vision projection. */
        rc = probe(b, &vproj, 2, "%s", b->k->vproj);
        if (rc != CLIPDB_OK) goto cleanup;
        e = (int)vproj->shape[b->k->proj_transposed ? 0 : 1];
        m->embed_dim = e;
        rc = bind_vision(b, e);
    }
    if (rc || (rc = bind_text(b, e))) goto cleanup;

    /* logit_scale: shape [] (as written) or [1] */
    ls = cdb_st_find(m->st, b->k->logit_scale);
    if (!ls) {
        rc = cdb_err_set(&m->err, CLIPDB_EFORMAT, "missing tensor '%s'", b->k->logit_scale);
        goto cleanup;
    }
    if (ls->numel != 1 || ls->ndim > 1) {
        char got[128];
        fmt_shape(got, sizeof got, ls->ndim, ls->shape);
        rc = cdb_err_set(&m->err, CLIPDB_EFORMAT, "tensor '%s' has shape %s, expected []",
                         ls->name, got);
        goto cleanup;
    }
    if ((rc = as_f32(b, ls, &lsv))) goto cleanup;
    m->logit_scale = lsv[0];
    m->dtype = dtype_label(b->dtypes_seen);

    /* Remember the file's size and mtime for the identity cache. */
    if (m->weights_path && stat(m->weights_path, &sb) == 0) {
        m->weights_size = (uint64_t)sb.st_size;
        m->weights_mtime_ns = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;
    }
cleanup:
    if (rc != CLIPDB_OK) cdb_weights_release(m);
    return rc;
}

void cdb_weights_release(clipdb_model *m)
{
    size_t i;
    if (!m) return;
    for (i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    m->owned = NULL;
    m->n_owned = m->cap_owned = 0;
    free(m->vision.t.blocks);
    if (m->vision.rn) free(m->vision.rn->blocks);
    free(m->vision.rn);
    free(m->text.t.blocks);
    memset(&m->vision, 0, sizeof m->vision);
    memset(&m->text, 0, sizeof m->text);
}

/* ---- the tensor list (training) ---------------------------------------------- */

typedef struct lister {
    cdb_wref *r;
    size_t n, cap;
    int failed;
} lister;

static cdb_wref *add_ref(lister *L, int tower, int layer, cdb_wkind kind, int ndim, int64_t d0,
                         int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
    __attribute__((format(printf, 10, 11)));
static cdb_wref *add_ref(lister *L, int tower, int layer, cdb_wkind kind, int ndim, int64_t d0,
                         int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
{
    cdb_wref *w;
    va_list ap;
    int i;
    if (L->failed || cdb_grow((void **)&L->r, &L->cap, L->n + 1, sizeof *L->r)) {
        L->failed = 1;
        return NULL;
    }
    w = &L->r[L->n++];
    memset(w, 0, sizeof *w);
    va_start(ap, fmt);
    vsnprintf(w->name, sizeof w->name, fmt, ap);
    va_end(ap);
    w->ndim = ndim;
    w->shape[0] = d0, w->shape[1] = d1, w->shape[2] = d2, w->shape[3] = d3;
    w->numel = 1;
    for (i = 0; i < ndim; i++) w->numel *= (size_t)w->shape[i];
    w->tower = tower;
    w->layer = layer;
    w->kind = kind;
    return w;
}

/* Sets slot k of w (if w was added). */
static void set_slot(cdb_wref *w, int k, const float **slot, size_t off)
{
    if (!w) return;
    w->slot[k] = slot;
    w->off[k] = off;
}

#define REF1(slot, tw, ly, kd, a, ...) set_slot(add_ref(L, tw, ly, kd, 1, a, 0, 0, 0, __VA_ARGS__), 0, slot, 0)
#define REF2(slot, tw, ly, kd, a, c, ...) \
    set_slot(add_ref(L, tw, ly, kd, 2, a, c, 0, 0, __VA_ARGS__), 0, slot, 0)

static void list_tower(lister *L, const keys *k, cdb_tower *t, int tw, const char *pre,
                       const char *ln_post, const char *proj, int e)
{
    const int64_t d = t->width, f = t->mlp;
    int i;
    for (i = 0; i < t->layers; i++) {
        cdb_block *b = &t->blocks[i];
        cdb_wref *w;
        REF1(&b->ln1_w, tw, i, CDB_W_BLOCK, d, "%s%d.%s.weight", pre, i, k->ln1);
        REF1(&b->ln1_b, tw, i, CDB_W_BLOCK, d, "%s%d.%s.bias", pre, i, k->ln1);
        if (k->packed_qkv) {
            w = add_ref(L, tw, i, CDB_W_BLOCK, 2, 3 * d, d, 0, 0, "%s%d.attn.in_proj_weight", pre, i);
            set_slot(w, 0, &b->wq, 0), set_slot(w, 1, &b->wk, (size_t)(d * d));
            set_slot(w, 2, &b->wv, (size_t)(2 * d * d));
            w = add_ref(L, tw, i, CDB_W_BLOCK, 1, 3 * d, 0, 0, 0, "%s%d.attn.in_proj_bias", pre, i);
            set_slot(w, 0, &b->bq, 0), set_slot(w, 1, &b->bk, (size_t)d);
            set_slot(w, 2, &b->bv, (size_t)(2 * d));
        } else { /* weights q, k, v adjacent, then the biases */
            REF2(&b->wq, tw, i, CDB_W_BLOCK, d, d, "%s%d.self_attn.q_proj.weight", pre, i);
            REF2(&b->wk, tw, i, CDB_W_BLOCK, d, d, "%s%d.self_attn.k_proj.weight", pre, i);
            REF2(&b->wv, tw, i, CDB_W_BLOCK, d, d, "%s%d.self_attn.v_proj.weight", pre, i);
            REF1(&b->bq, tw, i, CDB_W_BLOCK, d, "%s%d.self_attn.q_proj.bias", pre, i);
            REF1(&b->bk, tw, i, CDB_W_BLOCK, d, "%s%d.self_attn.k_proj.bias", pre, i);
            REF1(&b->bv, tw, i, CDB_W_BLOCK, d, "%s%d.self_attn.v_proj.bias", pre, i);
        }
        REF2(&b->wo, tw, i, CDB_W_BLOCK, d, d, "%s%d.%s.weight", pre, i, k->attn_out);
        REF1(&b->bo, tw, i, CDB_W_BLOCK, d, "%s%d.%s.bias", pre, i, k->attn_out);
        REF1(&b->ln2_w, tw, i, CDB_W_BLOCK, d, "%s%d.%s.weight", pre, i, k->ln2);
        REF1(&b->ln2_b, tw, i, CDB_W_BLOCK, d, "%s%d.%s.bias", pre, i, k->ln2);
        REF2(&b->fc1_w, tw, i, CDB_W_BLOCK, f, d, "%s%d.%s.weight", pre, i, k->fc1);
        REF1(&b->fc1_b, tw, i, CDB_W_BLOCK, f, "%s%d.%s.bias", pre, i, k->fc1);
        REF2(&b->fc2_w, tw, i, CDB_W_BLOCK, d, f, "%s%d.%s.weight", pre, i, k->fc2);
        REF1(&b->fc2_b, tw, i, CDB_W_BLOCK, d, "%s%d.%s.bias", pre, i, k->fc2);
    }
    REF1(&t->ln_post_w, tw, -1, CDB_W_FINAL_LN, d, "%s.weight", ln_post);
    REF1(&t->ln_post_b, tw, -1, CDB_W_FINAL_LN, d, "%s.bias", ln_post);
    if (k->proj_transposed)
        REF2(&t->proj, tw, -1, CDB_W_PROJ, e, d, "%s", proj);
    else
        REF2(&t->proj, tw, -1, CDB_W_PROJ, d, e, "%s", proj);
}

/* A convolution "visual.<conv>.weight" and its batch norm "visual.<bn>.*". */
static void list_conv(lister *L, cdb_conv *cv, int layer, cdb_wkind kind, const char *conv,
                      const char *bn)
{
    set_slot(add_ref(L, 0, layer, kind, 4, cv->cout, cv->cin, cv->k, cv->k, "visual.%s.weight",
                     conv),
             0, &cv->w, 0);
    REF1(&cv->bn_w, 0, layer, kind, cv->cout, "visual.%s.weight", bn);
    REF1(&cv->bn_b, 0, layer, kind, cv->cout, "visual.%s.bias", bn);
    REF1(&cv->bn_mean, 0, layer, CDB_W_BUFFER, cv->cout, "visual.%s.running_mean", bn);
    REF1(&cv->bn_var, 0, layer, CDB_W_BUFFER, cv->cout, "visual.%s.running_var", bn);
}

/* The ResNet image tower, in torch's state_dict order. */
static void list_resnet(lister *L, cdb_resnet *rn, int e)
{
    const int64_t D = rn->dim, T = (int64_t)rn->grid * rn->grid + 1;
    char conv[64], bn[64];
    int l, i, k;
    list_conv(L, &rn->stem[0], -1, CDB_W_EMBED, "conv1", "bn1");
    list_conv(L, &rn->stem[1], -1, CDB_W_EMBED, "conv2", "bn2");
    list_conv(L, &rn->stem[2], -1, CDB_W_EMBED, "conv3", "bn3");
    for (l = 0, k = 0; l < 4; l++)
        for (i = 0; i < rn->layers[l]; i++, k++) {
            cdb_bottleneck *bk = &rn->blocks[k];
            static const char *const cn[3] = {"conv1", "conv2", "conv3"}, *const bnn[3] = {
                                                                              "bn1", "bn2", "bn3"};
            cdb_conv *cv[3] = {&bk->c1, &bk->c2, &bk->c3};
            int j;
            for (j = 0; j < 3; j++) {
                snprintf(conv, sizeof conv, "layer%d.%d.%s", l + 1, i, cn[j]);
                snprintf(bn, sizeof bn, "layer%d.%d.%s", l + 1, i, bnn[j]);
                list_conv(L, cv[j], k, CDB_W_BLOCK, conv, bn);
            }
            if (bk->down.cout) {
                snprintf(conv, sizeof conv, "layer%d.%d.downsample.0", l + 1, i);
                snprintf(bn, sizeof bn, "layer%d.%d.downsample.1", l + 1, i);
                list_conv(L, &bk->down, k, CDB_W_BLOCK, conv, bn);
            }
        }
    REF2(&rn->pos, 0, -1, CDB_W_FINAL_LN, T, D, "visual.attnpool.positional_embedding");
    REF2(&rn->wk, 0, -1, CDB_W_FINAL_LN, D, D, "visual.attnpool.k_proj.weight");
    REF1(&rn->bk, 0, -1, CDB_W_FINAL_LN, D, "visual.attnpool.k_proj.bias");
    REF2(&rn->wq, 0, -1, CDB_W_FINAL_LN, D, D, "visual.attnpool.q_proj.weight");
    REF1(&rn->bq, 0, -1, CDB_W_FINAL_LN, D, "visual.attnpool.q_proj.bias");
    REF2(&rn->wv, 0, -1, CDB_W_FINAL_LN, D, D, "visual.attnpool.v_proj.weight");
    REF1(&rn->bv, 0, -1, CDB_W_FINAL_LN, D, "visual.attnpool.v_proj.bias");
    REF2(&rn->wc, 0, -1, CDB_W_PROJ, e, D, "visual.attnpool.c_proj.weight");
    REF1(&rn->bc, 0, -1, CDB_W_PROJ, e, "visual.attnpool.c_proj.bias");
}

int cdb_weights_list(const char *key_style, cdb_vision *v, cdb_text *t, int embed_dim,
                     cdb_wref **out, size_t *n, cdb_err *e)
{
    const keys *k = NULL;
    lister LL = {0}, *L = &LL;
    const int64_t dv = v->t.width, dt = t->t.width, P = v->patch;
    *out = NULL;
    *n = 0;
    if (key_style && !strcmp(key_style, "openai")) k = &openai_keys;
    if (key_style && !strcmp(key_style, "hf")) k = &hf_keys;
    if (!k) return cdb_err_set(e, CLIPDB_EINVAL, "unknown key convention");
    if (v->rn && k != &openai_keys)
        return cdb_err_set(e, CLIPDB_EINVAL, "a ResNet image tower has OpenAI key names only");
    if (v->rn) {
        list_resnet(L, v->rn, embed_dim);
    } else {
        set_slot(add_ref(L, 0, -1, CDB_W_EMBED, 4, dv, 3, P, P, "%s", k->conv), 0, &v->patch_w, 0);
        REF1(&v->class_emb, 0, -1, CDB_W_EMBED, dv, "%s", k->cls);
        REF2(&v->pos_emb, 0, -1, CDB_W_EMBED, v->n_pos, dv, "%s", k->vpos);
        REF1(&v->ln_pre_w, 0, -1, CDB_W_EMBED, dv, "%s.weight", k->ln_pre);
        REF1(&v->ln_pre_b, 0, -1, CDB_W_EMBED, dv, "%s.bias", k->ln_pre);
        list_tower(L, k, &v->t, 0, k->vis_layer, k->ln_post, k->vproj, embed_dim);
    }
    REF2(&t->tok_emb, 1, -1, CDB_W_EMBED, t->vocab, dt, "%s", k->tok);
    REF2(&t->pos_emb, 1, -1, CDB_W_EMBED, t->context, dt, "%s", k->tpos);
    list_tower(L, k, &t->t, 1, k->txt_layer, k->ln_final, k->tproj, embed_dim);
    add_ref(L, -1, -1, CDB_W_SCALE, 0, 0, 0, 0, 0, "%s", k->logit_scale);
    if (L->failed) {
        free(L->r);
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (tensor list)");
    }
    *out = L->r;
    *n = L->n;
    return CLIPDB_OK;
}

/* ---- identity ---------------------------------------------------------------- */

static void arch_name(const clipdb_model *m, char *buf, size_t n)
{
    const cdb_vision *v = &m->vision;
    if (v->rn) {
        const cdb_resnet *r = v->rn;
        const int *L = r->layers;
        if (r->width == 64 && L[0] == 3 && L[1] == 4 && L[3] == 3 && v->image_size == 224)
            snprintf(buf, n, L[2] == 6 ? "rn50" : L[2] == 23 ? "rn101" : "rn-w64-%d", L[2]);
        else
            snprintf(buf, n, "rn-w%d-%d.%d.%d.%d-s%d", r->width, L[0], L[1], L[2], L[3],
                     v->image_size);
        return;
    }
    if (v->image_size == 224 && v->patch == 32 && v->t.width == 768)
        snprintf(buf, n, "vit-b32");
    else if (v->image_size == 224 && v->patch == 16 && v->t.width == 768)
        snprintf(buf, n, "vit-b16");
    else if (v->image_size == 224 && v->patch == 14 && v->t.width == 1024)
        snprintf(buf, n, "vit-l14");
    else if (v->image_size == 336 && v->patch == 14 && v->t.width == 1024)
        snprintf(buf, n, "vit-l14-336");
    else
        snprintf(buf, n, "w%d-p%d", v->t.width, v->patch);
}

/* The user's cache directory for identities: $XDG_CACHE_HOME/clipdb/identity,
** else $HOME/.cache/clipdb/identity (only absolute values count, as the XDG
** spec says). NULL when neither is set, or on OOM. Caller frees. */
static char *cache_dir(void)
{
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && xdg[0] == '/') return cdb_sprintf("%s/clipdb/identity", xdg);
    if (home && home[0] == '/') return cdb_sprintf("%s/.cache/clipdb/identity", home);
    return NULL;
}

/* The cache file of m's weights: named by the SHA-256 of their real path. */
static char *cache_path(const clipdb_model *m)
{
    char *dir = cache_dir(), *real = realpath(m->weights_path, NULL), *path = NULL;
    char key[65];
    if (dir && real && cdb_sha256_hex(real, strlen(real), key, NULL) == CLIPDB_OK)
        path = cdb_sprintf("%s/%s", dir, key);
    free(dir);
    free(real);
    return path;
}

/* The cached digest if the cache file names this file's size and mtime. */
static int read_cache(const clipdb_model *m, char hex[65])
{
    char *path = cache_path(m), *text = NULL;
    unsigned long long size, mtime;
    size_t len;
    int ok = 0, used = 0;
    cdb_err ignored;

    if (path && cdb_read_file(path, 256, &text, &len, &ignored) == CLIPDB_OK &&
        sscanf(text, "%llu %llu %64[0-9a-f]%n", &size, &mtime, hex, &used) == 3 && used > 0 &&
        strlen(hex) == 64 && size == m->weights_size &&
        mtime == (unsigned long long)m->weights_mtime_ns)
        ok = 1;
    free(text);
    free(path);
    return ok;
}

/* Writes the cache atomically, only if the file still has the size and mtime
** it had when it was mapped (else the digest may not describe it). */
static void write_cache(const clipdb_model *m, const char *hex)
{
    char *path = cache_path(m), *tmp = NULL;
    struct stat sb;
    FILE *f = NULL;
    int ok;

    char *dir = cache_dir();
    cdb_err ignored;

    if (!path || !dir || stat(m->weights_path, &sb) != 0 ||
        (uint64_t)sb.st_size != m->weights_size ||
        (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec != m->weights_mtime_ns ||
        cdb_make_dirs(dir, &ignored) != CLIPDB_OK)
        goto cleanup;
    tmp = cdb_sprintf("%s.tmp%ld", path, (long)getpid());
    if (!tmp || !(f = fopen(tmp, "w"))) goto cleanup;
    ok = fprintf(f, "%llu %lld %s\n", (unsigned long long)m->weights_size,
                 (long long)m->weights_mtime_ns, hex) > 0;
    ok = (fclose(f) == 0) && ok;
    f = NULL;
    if (!ok || rename(tmp, path) != 0) unlink(tmp);
cleanup:
    free(dir);
    free(tmp);
    free(path);
}

const char *clipdb_model_identity(const clipdb_model *cm)
{
    /* The identity is a lazily filled cache inside an otherwise immutable model. */
    clipdb_model *m = (clipdb_model *)cm;
    const char *out = NULL;
    char hex[65], arch[32];

    if (!m || !m->st || !m->identity_lock) return NULL;
    pthread_mutex_lock((pthread_mutex_t *)m->identity_lock);
    if (!m->identity_ready) {
        int cached = m->weights_path && read_cache(m, hex);
        if (!cached && cdb_sha256_hex(m->st->buf, m->st->len, hex, NULL) != CLIPDB_OK) goto cleanup;
        if (!cached && m->weights_path) write_cache(m, hex);
        arch_name(m, arch, sizeof arch);
        snprintf(m->identity, sizeof m->identity, "clip-%s-%.16s", arch, hex);
        m->identity_ready = 1;
    }
    out = m->identity;
cleanup:
    pthread_mutex_unlock((pthread_mutex_t *)m->identity_lock);
    return out;
}

/* ---- layout for writing (writer.h) -------------------------------------------- */

#include "model/writer.h"

/* The tensors of cdb_weights_list, with the data each one gathers from m's
** views: the slots' views one after another (OpenAI's packed in_proj), and
** a projection transposed when m stores it the other way round. */
int cdb_weights_layout(const clipdb_model *m, const char *style, cdb_wtensor **out, size_t *n,
                       cdb_err *e)
{
    /* cdb_weights_list wants writable views for its slots; nothing is written here. */
    clipdb_model *mm = (clipdb_model *)m;
    cdb_wref *refs = NULL;
    cdb_wtensor *t;
    size_t nr = 0, i;
    int rc, k;

    *out = NULL;
    *n = 0;
    if ((!m->vision.t.blocks && !m->vision.rn) || !m->text.t.blocks)
        return cdb_err_set(e, CLIPDB_EINVAL, "model has no weights bound");
    if ((rc = cdb_weights_list(style, &mm->vision, &mm->text, m->embed_dim, &refs, &nr, e)))
        return rc;
    if (!(t = cdb_calloc_array(nr ? nr : 1, sizeof *t))) {
        free(refs);
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory laying out the model's tensors");
    }
    for (i = 0; i < nr; i++) {
        const cdb_wref *r = &refs[i];
        int n_slots = 0;
        snprintf(t[i].name, sizeof t[i].name, "%s", r->name);
        t[i].ndim = r->ndim;
        memcpy(t[i].shape, r->shape, sizeof t[i].shape);
        if (r->tower < 0) { /* logit_scale: shape [] */
            t[i].part[0] = &m->logit_scale;
            t[i].part_n[0] = 1;
            t[i].n_parts = 1;
            continue;
        }
        for (k = 0; k < 3; k++) n_slots += r->slot[k] != NULL;
        for (k = 0; k < n_slots; k++) {
            t[i].part[k] = *r->slot[k];
            t[i].part_n[k] = r->numel / (size_t)n_slots;
        }
        t[i].n_parts = n_slots;
        if (r->kind == CDB_W_PROJ && !(r->tower == 0 && m->vision.rn)) {
            // projection: openai (d, e), hf (e, d); the source is stored either way
            const cdb_tower *tw = r->tower == 0 ? &m->vision.t : &m->text.t;
            t[i].transpose = tw->proj_transposed != !strcmp(style, "hf");
        }
    }
    free(refs);
    *out = t;
    *n = nr;
    return CLIPDB_OK;
}
