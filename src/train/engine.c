/*
** engine.c: the CLIP training engine (train.h): the parameter layout (one
** allocation each for params, grads, AdamW m and v, with named views), the
** training forward (the inference forward of src/model/transformer.c with
** activations kept), the backward through both towers, the symmetric
** contrastive loss, and AdamW with open_clip's decay rule and schedules.
**
** Shapes: n = pairs in the batch, nb = pairs in a micro-batch, e = embedding
** size, d = tower width, f = MLP width, Tv = image tokens (grid^2 + 1), L =
** text tokens (the longest end token + 1 in the micro-batch).
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "model/transformer.h"
#include "train/train.h"

/* Activations and gradients of one tower for one micro-batch. */
typedef struct tower_run {
    cdb_block_acts *acts; /* [layers] */
    float *abuf;          /* the records, one allocation */
    size_t acap;          /* floats in abuf */
    float *x0;            /* (nb*T, d) vision: ln_pre input; text: unused */
    float *x;             /* (nb*T, d) residual stream, then dL/dx in the backward */
    float *xe, *he;       /* (nb, d) the pooled token (ln_post input), its ln output */
    float *dxe;           /* (nb, d) */
    size_t cap_rows;      /* rows (nb*T) x0 / x hold */
    size_t cap_n;         /* rows xe / he / dxe hold */
    int lo;               /* lowest block that needs a backward (layers: none) */
    int embed;            /* the embedding tensors are trained */
    int top;              /* the final ln / projection are trained (or anything below) */
} tower_run;

struct cdb_trainer {
    cdb_err err;
    cdb_train_opts o;
    char key_style[8];
    int embed_dim;
    size_t numel;
    float *params, *grads, *m, *v;  /* numel each */
    cdb_ptensor *tensors;
    int n_tensors;
    long step;
    cdb_vision vis, gvis;           /* views into params / grads (NULL: frozen) */
    cdb_resnet rn, grn;             /* a ResNet image tower's views (vis.rn, gvis.rn) */
    struct cdb_rn_train *rnt;       /* its activations; NULL for a ViT */
    int rn_lo;                      /* its lowest block with a backward (-1: the stem too) */
    cdb_text txt, gtxt;
    float *ls, *gls;                /* logit_scale and its gradient (NULL: frozen) */
    struct cdb_run *run;            /* scratch of the forward and backward */
    tower_run tv, tt;
    int K;                          /* texts per image (opts.texts_per_image) */
    float *emb;                     /* (1 + K, n, e): image then text embeddings */
    float *demb;                    /* (1 + K, n, e): their gradients */
    size_t cap_emb;                 /* n images the two hold */
    int *ends;                      /* (K*n) end token per text */
    size_t cap_ends;
    int32_t *keep;                  /* (cap_keep) patch dropout: the patches each image of
                                    ** the next batch keeps, nkeep a row; NULL: all */
    int nkeep;
    size_t cap_keep;
    const clipdb_model *synced;     /* the model the last sync pointed at ... */
    float *synced_copy;             /* ... this copy (owned by that model) */
    struct adam_chunk *chunks;      /* the trainable floats in pieces (cdb_train_apply) */
    double *chunk_norm2;            /* (n_chunks) each piece's sum of squared gradients */
    size_t n_chunks;
};

/* AdamW runs on the pool over pieces of at most ADAM_CHUNK floats of the
** trainable tensors, cut once at trainer creation. Each piece sums its
** squared gradients in double and the sums are added in piece order, so
** the norm does not depend on how many threads there are; the update is
** elementwise, the same floats whatever the split. */
#define ADAM_CHUNK ((size_t)1 << 16)
typedef struct adam_chunk {
    size_t off, n;                  /* floats of params / grads / m / v */
    int decay;                      /* the tensor's AdamW weight decay applies */
} adam_chunk;

/* ---- options ---------------------------------------------------------------- */

void cdb_train_opts_init(cdb_train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->lr = 5e-5f;
    o->beta1 = 0.9f;
    o->beta2 = 0.999f;
    o->eps = 1e-8f;
    o->wd = 0.2f;
    o->schedule = CDB_SCHED_CONSTANT;
    o->what = CDB_TRAIN_ALL;
}

int cdb_train_parse_what(const char *spec, cdb_train_opts *o, cdb_err *e)
{
    if (spec && !strcmp(spec, "all")) {
        o->what = CDB_TRAIN_ALL;
        return CLIPDB_OK;
    }
    if (spec && !strcmp(spec, "proj")) {
        o->what = CDB_TRAIN_PROJ;
        return CLIPDB_OK;
    }
    if (spec && !strncmp(spec, "last:", 5)) {
        const char *p = spec + 5;
        long v = 0;
        if (*p < '0' || *p > '9') goto bad;
        for (; *p >= '0' && *p <= '9' && v <= 1000; p++) v = v * 10 + (*p - '0');
        if (*p || v < 1 || v > 1000) goto bad;
        o->what = CDB_TRAIN_LAST;
        o->last_n = (int)v;
        return CLIPDB_OK;
    }
bad:
    return cdb_err_set(e, CLIPDB_EINVAL,
                       "--train '%s': expected all, proj or last:N (N from 1 to 1000)",
                       spec ? spec : "");
}

static int check_opts(const cdb_train_opts *o, cdb_err *e)
{
    if (!(o->lr >= 0.0f) || !isfinite(o->lr))
        return cdb_err_set(e, CLIPDB_EINVAL, "learning rate %g must be finite and >= 0", o->lr);
    if (!(o->beta1 >= 0.0f && o->beta1 < 1.0f) || !(o->beta2 >= 0.0f && o->beta2 < 1.0f))
        return cdb_err_set(e, CLIPDB_EINVAL, "betas %g, %g must be in [0, 1)", o->beta1, o->beta2);
    if (!(o->eps > 0.0f) || !isfinite(o->eps))
        return cdb_err_set(e, CLIPDB_EINVAL, "eps %g must be > 0", o->eps);
    if (!(o->wd >= 0.0f) || !isfinite(o->wd))
        return cdb_err_set(e, CLIPDB_EINVAL, "weight decay %g must be >= 0", o->wd);
    if (!(o->label_smoothing >= 0.0f && o->label_smoothing < 1.0f))
        return cdb_err_set(e, CLIPDB_EINVAL, "label smoothing %g must be in [0, 1)",
                           o->label_smoothing);
    if (o->texts_per_image < 0 || o->texts_per_image > CDB_MAX_TEXTS_PER_IMAGE)
        return cdb_err_set(e, CLIPDB_EINVAL, "texts per image %d must be in 1..%d",
                           o->texts_per_image, CDB_MAX_TEXTS_PER_IMAGE);
    if (o->warmup < 0 || o->micro_batch < 0 || o->threads < 0 || !isfinite(o->clip_grad))
        return cdb_err_set(e, CLIPDB_EINVAL, "warm-up, micro-batch and threads must be >= 0");
    if (o->schedule != CDB_SCHED_CONSTANT && o->schedule != CDB_SCHED_COSINE)
        return cdb_err_set(e, CLIPDB_EINVAL, "unknown learning-rate schedule");
    if (o->schedule == CDB_SCHED_COSINE && o->total_steps <= o->warmup)
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "cosine schedule: total steps (%ld) must exceed the warm-up (%d)",
                           o->total_steps, o->warmup);
    if (o->gemm != CDB_PREC_FP32 && o->gemm != CDB_PREC_BF16)
        return cdb_err_set(e, CLIPDB_EINVAL, "training precision must be fp32 or bf16");
    if (o->what == CDB_TRAIN_LAST && (o->last_n < 1 || o->last_n > 1000))
        return cdb_err_set(e, CLIPDB_EINVAL, "last:N needs N from 1 to 1000");
    if (o->what != CDB_TRAIN_ALL && o->what != CDB_TRAIN_PROJ && o->what != CDB_TRAIN_LAST)
        return cdb_err_set(e, CLIPDB_EINVAL, "unknown --train choice");
    return CLIPDB_OK;
}

/* ---- construction --------------------------------------------------------------- */

/* Copies a tower's struct with its own blocks array (the pointers still
** point where the source's do, until the layout re-points them). */
/* The trainer's towers run on its own, changing weights: a copy keeps none of
** the model's packed weights (compute.h), which were made from the model's
** values and are freed when it is repacked (cdb_trainer_sync). */
static int copy_tower(cdb_tower *dst, const cdb_tower *src)
{
    int l;
    *dst = *src;
    dst->pk_proj = NULL;
    dst->blocks = cdb_malloc_array((size_t)src->layers, sizeof *dst->blocks);
    if (!dst->blocks) return 0;
    memcpy(dst->blocks, src->blocks, (size_t)src->layers * sizeof *dst->blocks);
    for (l = 0; l < src->layers; l++) {
        cdb_block *b = &dst->blocks[l];
        b->pk_qkv = b->pk_o = b->pk_fc1 = b->pk_fc2 = NULL;
    }
    return 1;
}

/* Copies a ResNet tower's struct twice (params and grads), each with its own
** blocks, and makes its activation record. */
static int copy_resnet(cdb_trainer *t, const cdb_resnet *src, cdb_prec prec)
{
    const size_t nb = (size_t)src->n_blocks;
    t->rn = t->grn = *src;
    t->rn.blocks = cdb_malloc_array(nb, sizeof *t->rn.blocks);
    t->grn.blocks = cdb_malloc_array(nb, sizeof *t->grn.blocks);
    t->rnt = cdb_rn_train_new(prec);
    if (!t->rn.blocks || !t->grn.blocks || !t->rnt) return 0;
    memcpy(t->rn.blocks, src->blocks, nb * sizeof *t->rn.blocks);
    memcpy(t->grn.blocks, src->blocks, nb * sizeof *t->grn.blocks);
    t->vis.rn = &t->rn;
    t->gvis.rn = &t->grn;
    return 1;
}

static int is_trainable(const cdb_train_opts *o, const cdb_wref *w, int layers)
{
    if (w->kind == CDB_W_BUFFER) return 0;
    switch (o->what) {
    case CDB_TRAIN_ALL: return 1;
    case CDB_TRAIN_PROJ: return w->kind == CDB_W_PROJ || w->kind == CDB_W_SCALE;
    case CDB_TRAIN_LAST:
        if (w->kind == CDB_W_BLOCK) return w->layer >= layers - o->last_n;
        return w->kind != CDB_W_EMBED;
    }
    return 0;
}

void cdb_trainer_free(cdb_trainer *t)
{
    if (!t) return;
    free(t->params);
    free(t->grads);
    free(t->m);
    free(t->v);
    free(t->tensors);
    free(t->chunks);
    free(t->chunk_norm2);
    free(t->vis.t.blocks);
    free(t->gvis.t.blocks);
    free(t->rn.blocks);
    free(t->grn.blocks);
    cdb_rn_train_free(t->rnt);
    free(t->txt.t.blocks);
    free(t->gtxt.t.blocks);
    cdb_run_free(t->run);
    for (int k = 0; k < 2; k++) {
        tower_run *tr = k ? &t->tt : &t->tv;
        free(tr->acts);
        free(tr->abuf);
        free(tr->x0);
        free(tr->x);
        free(tr->xe);
        free(tr->he);
        free(tr->dxe);
    }
    free(t->emb);
    free(t->demb);
    free(t->keep);
    free(t->ends);
    free(t);
}

const char *cdb_trainer_errmsg(const cdb_trainer *t)
{
    return t ? t->err.msg : "no trainer";
}

int cdb_trainer_new(cdb_trainer **out, const clipdb_model *m, const cdb_train_opts *o,
                    cdb_err *e)
{
    cdb_trainer *t = NULL;
    cdb_wref *pw = NULL, *gw = NULL;
    size_t np = 0, ng = 0, i, off = 0;
    int rc = CLIPDB_OK, k;

    *out = NULL;
    if (!m || !m->st || (!m->vision.t.blocks && !m->vision.rn) || !m->text.t.blocks)
        return cdb_err_set(e, CLIPDB_EINVAL, "the model has no weights loaded");
    if ((rc = check_opts(o, e))) return rc;
    t = calloc(1, sizeof *t);
    if (!t) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    t->o = *o;
    t->K = o->texts_per_image > 0 ? o->texts_per_image : 1;
    snprintf(t->key_style, sizeof t->key_style, "%s", m->key_style);
    t->embed_dim = m->embed_dim;
    t->vis = m->vision, t->gvis = m->vision;
    t->txt = m->text, t->gtxt = m->text;
    t->vis.t.blocks = t->gvis.t.blocks = t->txt.t.blocks = t->gtxt.t.blocks = NULL;
    t->vis.pk_patch = t->gvis.pk_patch = NULL;
    if (!(m->vision.rn ? copy_resnet(t, m->vision.rn, o->gemm)
                       : copy_tower(&t->vis.t, &m->vision.t) &&
                             copy_tower(&t->gvis.t, &m->vision.t)) ||
        !copy_tower(&t->txt.t, &m->text.t) || !copy_tower(&t->gtxt.t, &m->text.t) ||
        !(t->run = cdb_run_new())) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    cdb_run_set_gemm(t->run, o->gemm);
    /* the same list twice: slots into the param views and into the grad views */
    if ((rc = cdb_weights_list(t->key_style, &t->vis, &t->txt, t->embed_dim, &pw, &np, e)) ||
        (rc = cdb_weights_list(t->key_style, &t->gvis, &t->gtxt, t->embed_dim, &gw, &ng, e)))
        goto cleanup;
    for (i = 0; i < np; i++)
        if (!cdb_add_ok(off, pw[i].numel, &off)) {
            rc = cdb_err_set(e, CLIPDB_ELIMIT, "model too large");
            goto cleanup;
        }
    t->numel = off;
    t->n_tensors = (int)np;
    t->tensors = cdb_calloc_array(np, sizeof *t->tensors);
    t->params = cdb_malloc_array(t->numel, sizeof(float));
    t->grads = cdb_calloc_array(t->numel, sizeof(float));
    t->m = cdb_calloc_array(t->numel, sizeof(float));
    t->v = cdb_calloc_array(t->numel, sizeof(float));
    if (!t->tensors || !t->params || !t->grads || !t->m || !t->v) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (training state: 4 x %zu floats)",
                         t->numel);
        goto cleanup;
    }
    for (i = 0, off = 0; i < np; i++) {
        cdb_ptensor *pt = &t->tensors[i];
        const int layers = pw[i].tower != 0 ? t->txt.t.layers
                           : t->vis.rn      ? t->rn.n_blocks
                                            : t->vis.t.layers;
        snprintf(pt->name, sizeof pt->name, "%s", pw[i].name);
        pt->ndim = pw[i].ndim;
        memcpy(pt->shape, pw[i].shape, sizeof pt->shape);
        pt->offset = off;
        pt->numel = pw[i].numel;
        pt->decay = pw[i].ndim >= 2 && pw[i].kind != CDB_W_SCALE;
        /* buffers (a batch norm's running statistics) are never trainable:
        ** the forward updates them, AdamW does not */
        pt->trainable = is_trainable(o, &pw[i], layers);
        if (pw[i].kind == CDB_W_SCALE) {
            t->params[off] = m->logit_scale;
            t->ls = t->params + off;
            t->gls = pt->trainable ? t->grads + off : NULL;
        } else {
            /* the model's current data (slot 0 still holds the model's pointer) */
            memcpy(t->params + off, *pw[i].slot[0], pw[i].numel * sizeof(float));
            for (k = 0; k < 3 && pw[i].slot[k]; k++) {
                *pw[i].slot[k] = t->params + off + pw[i].off[k];
                *gw[i].slot[k] = pt->trainable ? t->grads + off + gw[i].off[k] : NULL;
            }
        }
        if (pt->trainable && pw[i].tower >= 0) { /* which parts need a backward */
            tower_run *tr = pw[i].tower == 0 ? &t->tv : &t->tt;
            tr->top = 1;
            if (pw[i].kind == CDB_W_EMBED) tr->embed = 1;
        }
        off += pt->numel;
    }
    for (i = 0; i < np; i++) /* AdamW's pieces: count, then cut */
        if (t->tensors[i].trainable)
            t->n_chunks += (t->tensors[i].numel + ADAM_CHUNK - 1) / ADAM_CHUNK;
    t->chunks = cdb_malloc_array(t->n_chunks ? t->n_chunks : 1, sizeof *t->chunks);
    t->chunk_norm2 = cdb_malloc_array(t->n_chunks ? t->n_chunks : 1, sizeof *t->chunk_norm2);
    if (!t->chunks || !t->chunk_norm2) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0, off = 0; i < np; i++) {
        const cdb_ptensor *pt = &t->tensors[i];
        size_t at;
        if (!pt->trainable) continue;
        for (at = 0; at < pt->numel; at += ADAM_CHUNK, off++) {
            t->chunks[off].off = pt->offset + at;
            t->chunks[off].n = pt->numel - at < ADAM_CHUNK ? pt->numel - at : ADAM_CHUNK;
            t->chunks[off].decay = pt->decay;
        }
    }
    if (t->vis.rn) { /* the lowest block with a trained tensor; the stem: -1 */
        t->rn_lo = t->tv.embed ? -1 : t->rn.n_blocks;
        for (k = t->rn.n_blocks - 1; k >= 0 && !t->tv.embed; k--) {
            const cdb_bottleneck *g = &t->grn.blocks[k];
            if (g->c1.w || g->c1.bn_w || g->c3.w || g->c3.bn_w) t->rn_lo = k;
        }
    }
    for (k = 0; k < 2; k++) {
        tower_run *tr = k ? &t->tt : &t->tv;
        const cdb_tower *tw = k ? &t->txt.t : &t->vis.t, *gt = k ? &t->gtxt.t : &t->gvis.t;
        int l;
        tr->lo = tw->layers;
        for (l = 0; l < tw->layers; l++)
            if (gt->blocks[l].fc2_w || gt->blocks[l].ln1_w) {
                tr->lo = l;
                break;
            }
        if (tr->embed) tr->lo = 0;
        /* the backward relies on q, k, v being one (3d, d) matrix (list order) */
        for (l = 0; l < tw->layers; l++) {
            const cdb_block *b = &tw->blocks[l];
            const size_t dd = (size_t)tw->width * tw->width;
            if (b->wk != b->wq + dd || b->wv != b->wk + dd) {
                rc = cdb_err_set(e, CLIPDB_ERROR, "internal: q/k/v weights not adjacent");
                goto cleanup;
            }
        }
    }
    *out = t;
    t = NULL;
cleanup:
    free(pw);
    free(gw);
    cdb_trainer_free(t);
    return rc;
}

/* ---- buffers ---------------------------------------------------------------------- */

/* Makes *p hold n floats (contents not kept). */
static int grow_f(float **p, size_t *cap, size_t n, cdb_err *e)
{
    if (cdb_reserve((void **)p, cap, n, sizeof **p))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (training activations)");
    return CLIPDB_OK;
}

/* Buffers of one tower for nb sequences of T tokens, with activation records. */
static int tower_reserve(tower_run *tr, const cdb_tower *tw, int nb, int T, cdb_err *e)
{
    const size_t rows = (size_t)nb * T, per = cdb_block_acts_floats(tw->width, tw->mlp, nb, T);
    size_t c, need;
    int rc, l;
    if (!cdb_mul_ok(per, (size_t)tw->layers, &need))
        return cdb_err_set(e, CLIPDB_ELIMIT, "activations too large");
    if ((rc = grow_f(&tr->abuf, &tr->acap, need, e))) return rc;
    if (!tr->acts && !(tr->acts = cdb_calloc_array((size_t)tw->layers, sizeof *tr->acts)))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    for (l = 0; l < tw->layers; l++)
        cdb_block_acts_carve(&tr->acts[l], tr->abuf + (size_t)l * per, tw->width, tw->mlp, nb, T);
    if (rows * tw->width > tr->cap_rows) {
        c = 0;
        if ((rc = grow_f(&tr->x0, &c, rows * tw->width, e))) return rc;
        c = 0;
        if ((rc = grow_f(&tr->x, &c, rows * tw->width, e))) return rc;
        tr->cap_rows = rows * tw->width;
    }
    if ((size_t)nb * tw->width > tr->cap_n) {
        c = 0;
        if ((rc = grow_f(&tr->xe, &c, (size_t)nb * tw->width, e))) return rc;
        c = 0;
        if ((rc = grow_f(&tr->he, &c, (size_t)nb * tw->width, e))) return rc;
        c = 0;
        if ((rc = grow_f(&tr->dxe, &c, (size_t)nb * tw->width, e))) return rc;
        tr->cap_n = (size_t)nb * tw->width;
    }
    return CLIPDB_OK;
}

/* ---- the towers, forward with activations kept, and backward --------------------- */

/* Vision: pixels (nb, 3, S, S) -> out (nb, e), activations in t->tv; keep
** (nb, t->nkeep): the patches each image keeps (NULL: all). A ResNet tower:
** its own record; update: its batch norms' running statistics move (once a
** step: in the pass that back-propagates). */
static int vision_fwd(cdb_trainer *t, const float *pixels, const int32_t *keep, int nb,
                      int update, float *out)
{
    const cdb_vision *v = &t->vis;
    tower_run *tr = &t->tv;
    const int d = v->t.width, T = t->keep ? t->nkeep + 1 : v->n_pos;
    int rc, l, i;
    if (v->rn)
        return cdb_resnet_train_forward(t->rnt, v->rn, v->image_size, t->embed_dim, pixels, nb,
                                        update, out, &t->err);
    if ((rc = tower_reserve(tr, &v->t, nb, T, &t->err))) return rc;
    /* x (nb*T, d) = ln_pre(embeddings); x0 keeps the ln_pre input */
    if ((rc = cdb_vision_embed(t->run, v, pixels, nb, keep, t->nkeep, tr->x0, tr->x, &t->err)))
        return rc;
    for (l = 0; l < v->t.layers; l++)
        if ((rc = cdb_block_forward_keep(t->run, &v->t.blocks[l], d, v->t.mlp, tr->x, nb, T, 0,
                                         NULL, &tr->acts[l], &t->err)))
            return rc;
    for (i = 0; i < nb; i++) /* xe (nb, d): the class tokens */
        memcpy(tr->xe + (size_t)i * d, tr->x + (size_t)i * T * d, (size_t)d * sizeof(float));
    /* out (nb, e) = ln_post(xe) @ proj; he keeps the ln output */
    if ((rc = cdb_final_ln_project(t->run, &v->t, t->embed_dim, tr->xe, tr->he, nb, out, &t->err)))
        return rc;
    return CLIPDB_OK;
}

static int vision_bwd(cdb_trainer *t, const float *pixels, const int32_t *keep, int nb,
                      const float *dout)
{
    const cdb_vision *v = &t->vis;
    tower_run *tr = &t->tv;
    const int d = v->t.width, T = t->keep ? t->nkeep + 1 : v->n_pos;
    const int below = tr->lo < v->t.layers;
    int rc, l, i;
    if (!tr->top) return CLIPDB_OK;
    if (v->rn)
        return cdb_resnet_train_backward(t->rnt, v->rn, &t->grn, t->embed_dim, t->rn_lo, dout,
                                         &t->err);
    /* dxe (nb, d) from dout (nb, e); the residual buffer x is free now: dh scratch */
    if ((rc = cdb_final_ln_project_backward(t->run, &v->t, &t->gvis.t, t->embed_dim, tr->xe,
                                            tr->he, dout, nb, tr->x, below ? tr->dxe : NULL,
                                            &t->err)))
        return rc;
    if (!below) return CLIPDB_OK;
    /* dx (nb*T, d): the class-token rows get dxe, the others 0 */
    memset(tr->x, 0, (size_t)nb * T * d * sizeof(float));
    for (i = 0; i < nb; i++)
        memcpy(tr->x + (size_t)i * T * d, tr->dxe + (size_t)i * d, (size_t)d * sizeof(float));
    for (l = v->t.layers - 1; l >= tr->lo; l--)
        if ((rc = cdb_block_backward(t->run, &v->t.blocks[l], &t->gvis.t.blocks[l], &tr->acts[l],
                                     d, v->t.mlp, nb, T, tr->x, l > tr->lo || tr->embed,
                                     &t->err)))
            return rc;
    if (tr->embed)
        return cdb_vision_embed_backward(t->run, v, &t->gvis, pixels, nb, keep, t->nkeep, tr->x0,
                                         tr->x, &t->err);
    return CLIPDB_OK;
}

/* Text: the longest end token of the micro-batch + 1 tokens. */
static int text_len(const int *ends, int nb)
{
    int i, L = 1;
    for (i = 0; i < nb; i++)
        if (ends[i] + 1 > L) L = ends[i] + 1;
    return L;
}

static int text_fwd(cdb_trainer *t, const int32_t *const *ids, const int *lens, const int *ends,
                    int nb, float *out)
{
    const cdb_text *x = &t->txt;
    tower_run *tr = &t->tt;
    const int d = x->t.width, L = text_len(ends, nb);
    int rc, l, i;
    if ((rc = tower_reserve(tr, &x->t, nb, L, &t->err))) return rc;
    /* x (nb*L, d) = tok_emb[ids] + pos_emb; causal blocks over all L tokens */
    cdb_text_embed(x, ids, lens, NULL, nb, L, tr->x);
    for (l = 0; l < x->t.layers; l++)
        if ((rc = cdb_block_forward_keep(t->run, &x->t.blocks[l], d, x->t.mlp, tr->x, nb, L, 1,
                                         NULL, &tr->acts[l], &t->err)))
            return rc;
    for (i = 0; i < nb; i++) /* xe (nb, d): the end tokens */
        memcpy(tr->xe + (size_t)i * d, tr->x + ((size_t)i * L + ends[i]) * d,
               (size_t)d * sizeof(float));
    if ((rc = cdb_final_ln_project(t->run, &x->t, t->embed_dim, tr->xe, tr->he, nb, out, &t->err)))
        return rc;
    return CLIPDB_OK;
}

static int text_bwd(cdb_trainer *t, const int32_t *const *ids, const int *lens, const int *ends,
                    int nb, const float *dout)
{
    const cdb_text *x = &t->txt;
    tower_run *tr = &t->tt;
    const int d = x->t.width, L = text_len(ends, nb), below = tr->lo < x->t.layers;
    int rc, l, i;
    if (!tr->top) return CLIPDB_OK;
    if ((rc = cdb_final_ln_project_backward(t->run, &x->t, &t->gtxt.t, t->embed_dim, tr->xe,
                                            tr->he, dout, nb, tr->x, below ? tr->dxe : NULL,
                                            &t->err)))
        return rc;
    if (!below) return CLIPDB_OK;
    memset(tr->x, 0, (size_t)nb * L * d * sizeof(float));
    for (i = 0; i < nb; i++)
        memcpy(tr->x + ((size_t)i * L + ends[i]) * d, tr->dxe + (size_t)i * d,
               (size_t)d * sizeof(float));
    for (l = x->t.layers - 1; l >= tr->lo; l--)
        if ((rc = cdb_block_backward(t->run, &x->t.blocks[l], &t->gtxt.t.blocks[l], &tr->acts[l],
                                     d, x->t.mlp, nb, L, tr->x, l > tr->lo || tr->embed,
                                     &t->err)))
            return rc;
    if (tr->embed) cdb_text_embed_backward(&t->gtxt, ids, lens, NULL, nb, L, tr->x);
    return CLIPDB_OK;
}

/* ---- the loss ------------------------------------------------------------------- */

/* CLIP's symmetric cross-entropy (open_clip ClipLoss) of img, txt (n, e),
** unnormalised, with temperature exp(ls). *out gets the loss; dimg, dtxt (n, e)
** get its gradients, *dls that of ls. In double: n*n*e is small beside the towers.
**   u = img/|img|, w = txt/|txt|, logits (n, n) = s u w^T, s = exp(ls)
**   loss = (CE_rows(logits) + CE_cols(logits)) / 2, each a mean over n,
**          CE against the targets Q = (1 - smooth) I + smooth / n (smooth 0:
**          the identity; torch's cross_entropy(label_smoothing=smooth))
**   dlogits = (softmax_rows - Q + softmax_cols - Q) / (2n)
**   du = s dlogits w, dw = s dlogits^T u, dls = sum(dlogits * logits)
**   d img = (du - u (u . du)) / |img|  (same for txt) */
static int clip_loss(const float *img, const float *txt, int n, int e, float ls, double smooth,
                     float *dimg, float *dtxt, double *dls, double *out)
{
    double *u = NULL, *w = NULL, *lg = NULL, *dl = NULL, *nu = NULL, *nw = NULL, loss = 0.0;
    int rc = CLIPDB_OK;
    const double s = exp((double)ls);
    int i, j, k;
    u = malloc(sizeof(double) * (size_t)n * e);
    w = malloc(sizeof(double) * (size_t)n * e);
    lg = malloc(sizeof(double) * (size_t)n * n);
    dl = calloc((size_t)n * n, sizeof(double));
    nu = malloc(sizeof(double) * (size_t)n);
    nw = malloc(sizeof(double) * (size_t)n);
    if (!u || !w || !lg || !dl || !nu || !nw) {
        rc = CLIPDB_ENOMEM;
        goto cleanup;
    }
    for (i = 0; i < n; i++) {
        double a = 0.0, b = 0.0;
        for (k = 0; k < e; k++) {
            a += (double)img[(size_t)i * e + k] * img[(size_t)i * e + k];
            b += (double)txt[(size_t)i * e + k] * txt[(size_t)i * e + k];
        }
        nu[i] = sqrt(a), nw[i] = sqrt(b);
        for (k = 0; k < e; k++) {
            u[(size_t)i * e + k] = img[(size_t)i * e + k] / nu[i];
            w[(size_t)i * e + k] = txt[(size_t)i * e + k] / nw[i];
        }
    }
    for (i = 0; i < n; i++)
        for (j = 0; j < n; j++) {
            double dot = 0.0;
            for (k = 0; k < e; k++) dot += u[(size_t)i * e + k] * w[(size_t)j * e + k];
            lg[(size_t)i * n + j] = s * dot;
        }
    for (int pass = 0; pass < 2; pass++) /* rows (image -> text), then columns */
        for (i = 0; i < n; i++) {
            double mx = -INFINITY, z = 0.0;
#define LG(a, b) (pass ? lg[(size_t)(b) * n + (a)] : lg[(size_t)(a) * n + (b)])
#define DL(a, b) (*(pass ? &dl[(size_t)(b) * n + (a)] : &dl[(size_t)(a) * n + (b)]))
            double sum = 0.0; /* of the row's logits: the smoothed target's share */
            for (j = 0; j < n; j++) mx = LG(i, j) > mx ? LG(i, j) : mx;
            for (j = 0; j < n; j++) z += exp(LG(i, j) - mx), sum += LG(i, j);
            /* target q: 1 - smooth on the pair, smooth / n on every column */
            loss += (log(z) + mx - (1.0 - smooth) * LG(i, i) - smooth / n * sum) / (2.0 * n);
            for (j = 0; j < n; j++)
                DL(i, j) += (exp(LG(i, j) - mx) / z - (1.0 - smooth) * (i == j) - smooth / n) /
                            (2.0 * n);
#undef LG
#undef DL
        }
    *dls = 0.0;
    for (i = 0; i < n * n; i++) *dls += dl[i] * lg[i];
    for (i = 0; i < n; i++) {
        double du[4096], dw[4096], pu = 0.0, pw = 0.0;
        for (k = 0; k < e; k++) {
            double a = 0.0, b = 0.0;
            for (j = 0; j < n; j++) {
                a += dl[(size_t)i * n + j] * w[(size_t)j * e + k];
                b += dl[(size_t)j * n + i] * u[(size_t)j * e + k];
            }
            du[k] = s * a, dw[k] = s * b;
            pu += du[k] * u[(size_t)i * e + k];
            pw += dw[k] * w[(size_t)i * e + k];
        }
        for (k = 0; k < e; k++) {
            dimg[(size_t)i * e + k] = (float)((du[k] - u[(size_t)i * e + k] * pu) / nu[i]);
            dtxt[(size_t)i * e + k] = (float)((dw[k] - w[(size_t)i * e + k] * pw) / nw[i]);
        }
    }
    *out = loss;
cleanup:
    free(u), free(w), free(lg), free(dl), free(nu), free(nw);
    return rc;
}

/* The loss of a batch of n images img (n, e) and K*n texts txt (K*n, e):
** the mean over k of clip_loss(img, texts k*n .. k*n + n - 1), with its
** gradients in dimg (n, e), dtxt (K*n, e) and *dls. K = 1 is clip_loss. */
static int batch_loss(const float *img, const float *txt, int n, int K, int e, float ls,
                      double smooth, float *dimg, float *dtxt, double *dls, double *out)
{
    const size_t ne = (size_t)n * e;
    double *acc = NULL, dk, lk;
    float *dik = NULL;
    size_t j;
    int k, rc = CLIPDB_OK;
    if (K == 1) return clip_loss(img, txt, n, e, ls, smooth, dimg, dtxt, dls, out);
    acc = calloc(ne, sizeof *acc);
    dik = malloc(ne * sizeof *dik);
    if (!acc || !dik) {
        rc = CLIPDB_ENOMEM;
        goto cleanup;
    }
    *dls = *out = 0.0;
    for (k = 0; k < K; k++) {
        float *dt = dtxt + (size_t)k * ne;
        if ((rc = clip_loss(img, txt + (size_t)k * ne, n, e, ls, smooth, dik, dt, &dk, &lk)))
            goto cleanup;
        for (j = 0; j < ne; j++) acc[j] += dik[j], dt[j] /= (float)K;
        *dls += dk / K, *out += lk / K;
    }
    for (j = 0; j < ne; j++) dimg[j] = (float)(acc[j] / K);
cleanup:
    free(acc), free(dik);
    return rc;
}

/* ---- the step ---------------------------------------------------------------------- */

static int check_batch(cdb_trainer *t, const float *pixels, const int32_t *const *ids,
                       const int *lens, int n)
{
    const int nt = t->K * n; /* texts */
    int i, j, rc;
    if (n < 2 || n > (1 << 20) || !pixels || !ids || !lens)
        return cdb_err_set(&t->err, CLIPDB_EINVAL,
                           "a training batch needs 2..%d pairs (got %d)", 1 << 20, n);
    if (t->embed_dim > 4096)
        return cdb_err_set(&t->err, CLIPDB_ELIMIT, "embedding size %d over 4096", t->embed_dim);
    if ((size_t)nt > t->cap_ends) {
        int *q = cdb_malloc_array((size_t)nt, sizeof *q);
        if (!q) return cdb_err_set(&t->err, CLIPDB_ENOMEM, "out of memory");
        free(t->ends);
        t->ends = q;
        t->cap_ends = (size_t)nt;
    }
    for (i = 0; i < nt; i++) {
        int best = 0;
        if (!ids[i] || lens[i] < 1 || lens[i] > t->txt.context)
            return cdb_err_set(&t->err, CLIPDB_EINVAL, "text %d: %d tokens (must be 1..%d)", i,
                               lens[i], t->txt.context);
        for (j = 0; j < lens[i]; j++) {
            if (ids[i][j] < 0 || ids[i][j] >= t->txt.vocab)
                return cdb_err_set(&t->err, CLIPDB_EINVAL,
                                   "text %d: token id %d outside the vocabulary (%d)", i,
                                   (int)ids[i][j], t->txt.vocab);
            if (ids[i][j] > ids[i][best]) best = j; /* the end token, as inference */
        }
        t->ends[i] = best;
    }
    if ((size_t)n > t->cap_emb) {
        const size_t rows = (size_t)(1 + t->K) * n;
        size_t c = 0;
        if ((rc = grow_f(&t->emb, &c, rows * t->embed_dim, &t->err))) return rc;
        c = 0;
        if ((rc = grow_f(&t->demb, &c, rows * t->embed_dim, &t->err))) return rc;
        t->cap_emb = (size_t)n;
    }
    return CLIPDB_OK;
}

int cdb_trainer_set_patches(cdb_trainer *t, const int32_t *keep, int nkeep, int n)
{
    const int G = t->vis.grid, np = G * G;
    int i, j;
    cdb_err_clear(&t->err);
    if (keep && nkeep > 0 && t->vis.rn)
        return cdb_err_set(&t->err, CLIPDB_EINVAL,
                           "patch dropout needs a ViT image tower (this one is a ResNet)");
    if (!keep || nkeep <= 0) {
        t->nkeep = 0;
        free(t->keep);
        t->keep = NULL, t->cap_keep = 0;
        return CLIPDB_OK;
    }
    if (nkeep > np || n < 1 || n > (1 << 20))
        return cdb_err_set(&t->err, CLIPDB_EINVAL,
                           "patch dropout: %d of %d patches for %d images", nkeep, np, n);
    for (i = 0; i < n; i++)
        for (j = 0; j < nkeep; j++) {
            const int32_t p = keep[(size_t)i * nkeep + j];
            if (p < 0 || p >= np || (j > 0 && p <= keep[(size_t)i * nkeep + j - 1]))
                return cdb_err_set(&t->err, CLIPDB_EINVAL,
                                   "patch dropout: image %d keeps patch %d (the kept patches "
                                   "must be increasing grid indices below %d)", i, (int)p, np);
        }
    if ((size_t)n * nkeep > t->cap_keep) {
        int32_t *q = cdb_malloc_array((size_t)n * nkeep, sizeof *q);
        if (!q) return cdb_err_set(&t->err, CLIPDB_ENOMEM, "out of memory");
        free(t->keep);
        t->keep = q;
    }
    t->cap_keep = (size_t)n * nkeep; /* the images it covers: cap_keep / nkeep */
    memcpy(t->keep, keep, (size_t)n * nkeep * sizeof *keep);
    t->nkeep = nkeep;
    return CLIPDB_OK;
}

int cdb_train_grad(cdb_trainer *t, const float *pixels, const int32_t *const *ids,
                   const int *lens, int n, cdb_train_stats *st)
{
    const double t0 = cdb_now();
    const int e = t->embed_dim, S = t->vis.image_size;
    const size_t img_floats = (size_t)3 * S * S;
    int rc, mb, i0, pass, nt;
    double loss = 0.0, dls = 0.0;
    float *img, *txt;
    cdb_err_clear(&t->err);
    if ((rc = check_batch(t, pixels, ids, lens, n))) return rc;
    if (t->keep && (size_t)n * t->nkeep > t->cap_keep)
        return cdb_err_set(&t->err, CLIPDB_EINVAL,
                           "patch dropout was set for %zu images, the batch has %d",
                           t->cap_keep / (size_t)t->nkeep, n);
    img = t->emb, txt = t->emb + (size_t)n * e; /* txt: K*n rows */
    nt = t->K * n;
    mb = t->o.micro_batch > 0 && t->o.micro_batch < n ? t->o.micro_batch : n;
    memset(t->grads, 0, t->numel * sizeof(float));
    if (mb == n) { /* the whole batch: forward both towers, the loss, backward */
        if ((rc = vision_fwd(t, pixels, t->keep, n, 1, img)) ||
            (rc = text_fwd(t, ids, lens, t->ends, nt, txt)))
            return rc;
        if ((rc = batch_loss(img, txt, n, t->K, e, *t->ls, t->o.label_smoothing, t->demb,
                             t->demb + (size_t)n * e, &dls, &loss)))
            return cdb_err_set(&t->err, rc, "out of memory (loss)");
        if ((rc = vision_bwd(t, pixels, t->keep, n, t->demb)) ||
            (rc = text_bwd(t, ids, lens, t->ends, nt, t->demb + (size_t)n * e)))
            return rc;
    } else {
        /* pass 0: the embeddings of the whole batch, in micro-batches of mb
        ** images and mb texts; the loss; pass 1: each micro-batch's forward
        ** again, with its activations kept, and its backward */
        for (pass = 0; pass < 2; pass++) {
            if (pass == 1 && (rc = batch_loss(img, txt, n, t->K, e, *t->ls,
                                              t->o.label_smoothing, t->demb,
                                              t->demb + (size_t)n * e, &dls, &loss)))
                return cdb_err_set(&t->err, rc, "out of memory (loss)");
            for (i0 = 0; i0 < n; i0 += mb) {
                const int nb = n - i0 < mb ? n - i0 : mb;
                const float *px = pixels + (size_t)i0 * img_floats;
                const int32_t *kp = t->keep ? t->keep + (size_t)i0 * t->nkeep : NULL;
                if ((rc = vision_fwd(t, px, kp, nb, pass == 1, img + (size_t)i0 * e)) ||
                    (pass == 1 && (rc = vision_bwd(t, px, kp, nb, t->demb + (size_t)i0 * e))))
                    return rc;
            }
            for (i0 = 0; i0 < nt; i0 += mb) {
                const int nb = nt - i0 < mb ? nt - i0 : mb;
                if ((rc = text_fwd(t, ids + i0, lens + i0, t->ends + i0, nb,
                                   txt + (size_t)i0 * e)) ||
                    (pass == 1 && (rc = text_bwd(t, ids + i0, lens + i0, t->ends + i0, nb,
                                                 t->demb + (size_t)(n + i0) * e))))
                    return rc;
            }
        }
    }
    if (t->gls) *t->gls = (float)dls;
    if (st) {
        memset(st, 0, sizeof *st);
        st->loss = (float)loss;
        st->logit_scale = *t->ls;
        st->seconds = cdb_now() - t0;
    }
    return CLIPDB_OK;
}

float cdb_trainer_lr(const cdb_trainer *t)
{
    const cdb_train_opts *o = &t->o;
    const long s = t->step;
    if (o->warmup > 0 && s < o->warmup) return o->lr * (float)(s + 1) / (float)o->warmup;
    if (o->schedule == CDB_SCHED_COSINE) {
        const double e = (double)(s - o->warmup), es = (double)(o->total_steps - o->warmup);
        if (e >= es) return 0.0f;
        return (float)(0.5 * (1.0 + cos(M_PI * e / es)) * o->lr);
    }
    return o->lr;
}

/* One AdamW update over the pieces, on the pool. */
typedef struct adam_job {
    cdb_trainer *t;
    float scale, beta1, beta2, eps, step_size, decay;
    double bc2s;
} adam_job;

static void adam_norm_task(void *arg, size_t c)
{
    const cdb_trainer *t = arg;
    const float *g = t->grads + t->chunks[c].off;
    double s = 0.0;
    size_t j;
    for (j = 0; j < t->chunks[c].n; j++) s += (double)g[j] * g[j];
    t->chunk_norm2[c] = s;
}

static void adam_update_task(void *arg, size_t c)
{
    const adam_job *a = arg;
    const cdb_trainer *t = a->t;
    const adam_chunk *ch = &t->chunks[c];
    float *p = t->params + ch->off, *m = t->m + ch->off, *v = t->v + ch->off;
    const float *g = t->grads + ch->off;
    size_t j;
    for (j = 0; j < ch->n; j++) {
        const float gj = g[j] * a->scale;
        float denom;
        if (ch->decay) p[j] *= a->decay;
        m[j] = m[j] * a->beta1 + gj * (1.0f - a->beta1);
        v[j] = v[j] * a->beta2 + gj * gj * (1.0f - a->beta2);
        denom = sqrtf(v[j]) / (float)a->bc2s + a->eps;
        p[j] -= a->step_size * (m[j] / denom);
    }
}

int cdb_train_apply(cdb_trainer *t, cdb_train_stats *st)
{
    const cdb_train_opts *o = &t->o;
    const float lr = cdb_trainer_lr(t);
    const long step = t->step + 1;
    /* torch.optim.AdamW (single-tensor path): bias corrections in double */
    const double bc1 = 1.0 - pow((double)o->beta1, (double)step);
    const double bc2s = sqrt(1.0 - pow((double)o->beta2, (double)step));
    const float step_size = (float)(lr / bc1), decay = 1.0f - lr * o->wd;
    double norm2 = 0.0;
    float scale = 1.0f, norm;
    adam_job job;
    size_t c;
    cdb_err_clear(&t->err);
    cdb_pool_run(t->n_chunks, adam_norm_task, t);
    for (c = 0; c < t->n_chunks; c++) norm2 += t->chunk_norm2[c];
    norm = (float)sqrt(norm2);
    if (!isfinite(norm))
        return cdb_err_set(&t->err, CLIPDB_ERROR,
                           "the gradient is not finite (NaN or infinity): step %ld refused", step);
    if (o->clip_grad > 0.0f) { /* torch.nn.utils.clip_grad_norm_ */
        const float clip = o->clip_grad / (norm + 1e-6f);
        if (clip < 1.0f) scale = clip;
    }
    job.t = t;
    job.scale = scale;
    job.beta1 = o->beta1;
    job.beta2 = o->beta2;
    job.eps = o->eps;
    job.step_size = step_size;
    job.decay = decay;
    job.bc2s = bc2s;
    cdb_pool_run(t->n_chunks, adam_update_task, &job);
    /* open_clip: logit_scale clamped to [0, ln 100] after each step */
    if (*t->ls < 0.0f) *t->ls = 0.0f;
    if (*t->ls > CDB_LOGIT_SCALE_MAX) *t->ls = CDB_LOGIT_SCALE_MAX;
    t->step = step;
    if (st) {
        st->lr = lr;
        st->grad_norm = norm;
        st->logit_scale = *t->ls;
    }
    return CLIPDB_OK;
}

int cdb_train_step(cdb_trainer *t, const float *pixels, const int32_t *const *ids,
                   const int *lens, int n, cdb_train_stats *st)
{
    const double t0 = cdb_now();
    int rc = cdb_train_grad(t, pixels, ids, lens, n, st);
    if (rc == CLIPDB_OK) rc = cdb_train_apply(t, st);
    if (st) st->seconds = cdb_now() - t0;
    return rc;
}

/* ---- state ---------------------------------------------------------------------- */

void cdb_trainer_state(cdb_trainer *t, cdb_train_state *out)
{
    out->numel = t->numel;
    out->params = t->params;
    out->grads = t->grads;
    out->m = t->m;
    out->v = t->v;
    out->tensors = t->tensors;
    out->n_tensors = t->n_tensors;
    out->step = t->step;
}

void cdb_trainer_set_step(cdb_trainer *t, long step)
{
    t->step = step < 0 ? 0 : step;
}

const cdb_ptensor *cdb_trainer_find(const cdb_trainer *t, const char *name)
{
    int i;
    for (i = 0; i < t->n_tensors; i++)
        if (!strcmp(t->tensors[i].name, name)) return &t->tensors[i];
    return NULL;
}

int cdb_trainer_nonfinite(const cdb_trainer *t)
{
    size_t j;
    for (j = 0; j < t->numel; j++)
        if (!isfinite(t->params[j])) return 1;
    return 0;
}

int cdb_trainer_sync(cdb_trainer *t, clipdb_model *m)
{
    return cdb_trainer_sync_params(t, m, t->params);
}

int cdb_trainer_sync_params(cdb_trainer *t, clipdb_model *m, const float *params)
{
    const float ls = params[t->ls - t->params];
    cdb_wref *w = NULL;
    size_t n = 0, i, off = 0;
    float *copy = NULL;
    int rc, k;
    cdb_err_clear(&t->err);
    if (!m || (!m->vision.t.blocks && !m->vision.rn) || !m->text.t.blocks ||
        strcmp(m->key_style, t->key_style) || !m->vision.rn != !t->vis.rn ||
        (m->vision.rn && (m->vision.rn->n_blocks != t->rn.n_blocks ||
                          m->vision.rn->width != t->rn.width || m->vision.rn->grid != t->rn.grid)) ||
        m->embed_dim != t->embed_dim || m->vision.t.layers != t->vis.t.layers ||
        m->text.t.layers != t->txt.t.layers || m->vision.t.width != t->vis.t.width ||
        m->text.t.width != t->txt.t.width || m->vision.n_pos != t->vis.n_pos ||
        m->text.vocab != t->txt.vocab)
        return cdb_err_set(&t->err, CLIPDB_EMISMATCH, "sync: not the model the trainer was built from");
    if (m == t->synced && t->synced_copy) { /* again into the same model: refresh the copy */
        memcpy(t->synced_copy, params, t->numel * sizeof *t->synced_copy);
        m->logit_scale = ls;
        goto repack;
    }
    if ((rc = cdb_weights_list(m->key_style, &m->vision, &m->text, m->embed_dim, &w, &n, &t->err)))
        return rc;
    copy = cdb_malloc_array(t->numel, sizeof *copy);
    if (!copy || cdb_grow((void **)&m->owned, &m->cap_owned, m->n_owned + 1, sizeof *m->owned)) {
        free(copy);
        free(w);
        return cdb_err_set(&t->err, CLIPDB_ENOMEM, "out of memory (sync)");
    }
    memcpy(copy, params, t->numel * sizeof *copy);
    m->owned[m->n_owned++] = copy;
    for (i = 0; i < n; i++) {
        for (k = 0; k < 3 && w[i].slot[k]; k++) *w[i].slot[k] = copy + off + w[i].off[k];
        off += w[i].numel;
    }
    m->logit_scale = ls;
    t->synced = m;
    t->synced_copy = copy;
    free(w);
repack:
    /* the model's packed weights (compute.h) were made from the old values */
    if ((rc = cdb_model_repack(m)) != CLIPDB_OK)
        return cdb_err_set(&t->err, rc, "sync: %s", m->err.msg);
    return CLIPDB_OK;
}
