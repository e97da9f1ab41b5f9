/*
** model.c: opening and closing a model directory (weights + tokenizer),
** its public description and identity.
*/
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

/* File names looked for, in order. */
static const char *const weight_files[] = {"model.safetensors",
                                           "open_clip_model.safetensors"};

static clipdb_model *model_alloc(const char *dir)
{
    clipdb_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->dir = cdb_strdup(dir);
    m->identity_lock = malloc(sizeof(pthread_mutex_t));
    if (!m->dir || !m->identity_lock) {
        free(m->dir);
        free(m->identity_lock);
        free(m);
        return NULL;
    }
    pthread_mutex_init((pthread_mutex_t *)m->identity_lock, NULL);
    return m;
}

/* ---- packed weights (compute.h) ---------------------------------------------- */

static void unpack_tower(cdb_tower *t)
{
    int l;
    for (l = 0; t->blocks && l < t->layers; l++) {
        cdb_block *b = &t->blocks[l];
        cdb_wpack_free(b->pk_qkv);
        cdb_wpack_free(b->pk_o);
        cdb_wpack_free(b->pk_fc1);
        cdb_wpack_free(b->pk_fc2);
        b->pk_qkv = b->pk_o = b->pk_fc1 = b->pk_fc2 = NULL;
    }
    cdb_wpack_free(t->pk_proj);
    t->pk_proj = NULL;
}

void cdb_model_unpack(clipdb_model *m)
{
    unpack_tower(&m->vision.t);
    unpack_tower(&m->text.t);
    cdb_wpack_free(m->vision.pk_patch);
    m->vision.pk_patch = NULL;
    m->packed_bytes = 0;
}

/* Packs W (n_out, n_in) (tw CDB_TRANS) or (n_in, n_out) into *pk. When the
** pack is a converted copy (bf16, int8) of fp32 weights read from the file
** mapping, those pages are dropped from memory again (MADV_DONTNEED on a
** private read-only file mapping: nothing reads them any more, and a later
** read would fault them back from the file), so a bf16 or int8 model does not
** keep the fp32 weights resident beside their packed copy. */
static int pack1(clipdb_model *m, cdb_wpack **pk, const float *W, cdb_trans tw, int n_out,
                 int n_in)
{
    int rc = cdb_wpack_new(pk, W, tw, n_out, n_in, m->prec, &m->err);
    size_t bytes = cdb_wpack_bytes(*pk);
    m->packed_bytes += bytes;
    if (rc == CLIPDB_OK && bytes && m->st && m->st->map.data) {
        const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        const uintptr_t lo = (uintptr_t)m->st->map.data, hi = lo + m->st->map.size;
        const uintptr_t a = (uintptr_t)W, b = a + (uintptr_t)n_out * (uintptr_t)n_in * 4;
        const uintptr_t a2 = (a + page - 1) & ~(page - 1), b2 = b & ~(page - 1);
        if (a >= lo && b <= hi && b2 > a2) madvise((void *)a2, b2 - a2, MADV_DONTNEED);
    }
    return rc;
}

static int pack_tower(clipdb_model *m, cdb_tower *t, int e_dim)
{
    const int d = t->width, f = t->mlp;
    float *cat = NULL;
    int l, rc = CLIPDB_OK;
    for (l = 0; l < t->layers; l++) {
        cdb_block *b = &t->blocks[l];
        if (b->wk == b->wq + (size_t)d * d && b->wv == b->wk + (size_t)d * d) {
            rc = pack1(m, &b->pk_qkv, b->wq, CDB_TRANS, 3 * d, d); /* in_proj (3d, d) */
        } else if (m->prec != CDB_PREC_FP32) {
            /* separate q/k/v_proj (d, d): one (3d, d) copy, packed (bf16/int8
            ** packs never alias it), then freed */
            if (!cat && !(cat = cdb_malloc_array((size_t)3 * d * d, sizeof *cat))) {
                rc = cdb_err_set(&m->err, CLIPDB_ENOMEM, "out of memory");
                goto cleanup;
            }
            memcpy(cat, b->wq, (size_t)d * d * sizeof *cat);
            memcpy(cat + (size_t)d * d, b->wk, (size_t)d * d * sizeof *cat);
            memcpy(cat + (size_t)2 * d * d, b->wv, (size_t)d * d * sizeof *cat);
            rc = pack1(m, &b->pk_qkv, cat, CDB_TRANS, 3 * d, d);
        } /* else fp32 runs the three plain (d, d) weights */
        if (rc || (rc = pack1(m, &b->pk_o, b->wo, CDB_TRANS, d, d)) ||
            (rc = pack1(m, &b->pk_fc1, b->fc1_w, CDB_TRANS, f, d)) ||
            (rc = pack1(m, &b->pk_fc2, b->fc2_w, CDB_TRANS, d, f)))
            goto cleanup;
    }
    /* proj (e, d) when transposed, else (d, e) */
    rc = pack1(m, &t->pk_proj, t->proj, t->proj_transposed ? CDB_TRANS : CDB_NO_TRANS, e_dim, d);
cleanup:
    free(cat);
    return rc;
}

/* Converts and reorders every linear weight once for m->prec (compute.h). */
static int pack_model(clipdb_model *m)
{
    const cdb_vision *v = &m->vision;
    int rc;
    if (v->rn) { /* the ResNet tower runs its convolutions on the plain fp32 weights */
        if (m->prec != CDB_PREC_FP32)
            return cdb_err_set(&m->err, CLIPDB_EINVAL,
                               "precision %s: a ResNet image tower runs in fp32 only",
                               clipdb_precision_name((int)m->prec));
        /* its batch norms, folded again (a trainer's sync changed them) */
        if ((rc = cdb_resnet_fold(v->rn, &m->err))) return rc;
        if ((rc = pack_tower(m, &m->text.t, m->embed_dim))) {
            cdb_err_prefix(&m->err, "packing the weights");
            cdb_model_unpack(m);
        }
        return rc;
    }
    if ((rc = pack_tower(m, &m->vision.t, m->embed_dim)) ||
        (rc = pack_tower(m, &m->text.t, m->embed_dim)) ||
        (rc = pack1(m, &m->vision.pk_patch, v->patch_w, CDB_TRANS, v->t.width,
                    3 * v->patch * v->patch))) {
        cdb_err_prefix(&m->err, "packing the weights for %s", clipdb_precision_name((int)m->prec));
        cdb_model_unpack(m);
    }
    return rc;
}

int cdb_model_repack(clipdb_model *m)
{
    cdb_model_unpack(m);
    return pack_model(m);
}

static int open_tokenizer(clipdb_model *m)
{
    int rc = cdb_tok_load_dir(m->dir, &m->tok, &m->err);
    if (rc != CLIPDB_OK) cdb_err_prefix(&m->err, "model %s: tokenizer", m->dir);
    return rc;
}

const char *clipdb_model_tokenizer_digest(const clipdb_model *cm)
{
    /* like the identity: a lazily filled cache inside an immutable model */
    clipdb_model *m = (clipdb_model *)cm;
    const char *out = NULL;
    cdb_err ignored;
    if (!m || !m->tok || !m->identity_lock) return NULL;
    pthread_mutex_lock((pthread_mutex_t *)m->identity_lock);
    if (!m->tok_digest_ready &&
        cdb_tok_digest(m->tok, m->tok_digest, &ignored) == CLIPDB_OK)
        m->tok_digest_ready = 1;
    if (m->tok_digest_ready) out = m->tok_digest;
    pthread_mutex_unlock((pthread_mutex_t *)m->identity_lock);
    return out;
}

int clipdb_model_open_tokenizer(clipdb_model **out, const char *dir)
{
    clipdb_model *m;
    *out = m = model_alloc(dir ? dir : "");
    if (!m) return CLIPDB_ENOMEM;
    if (!dir) return cdb_err_set(&m->err, CLIPDB_EINVAL, "no model directory given");
    m->text.context = CLIPDB_TEXT_CONTEXT;
    return open_tokenizer(m);
}

int clipdb_model_open(clipdb_model **out, const char *dir)
{
    return clipdb_model_open_precision(out, dir, CLIPDB_PRECISION_FP32);
}

int clipdb_model_open_precision(clipdb_model **out, const char *dir, clipdb_precision prec)
{
    int rc = CLIPDB_OK;
    clipdb_model *m;
    char *path = NULL;
    size_t i;

    *out = m = model_alloc(dir ? dir : "");
    if (!m) return CLIPDB_ENOMEM;
    if (!dir) return cdb_err_set(&m->err, CLIPDB_EINVAL, "no model directory given");
    if (prec != CLIPDB_PRECISION_FP32 && prec != CLIPDB_PRECISION_BF16 &&
        prec != CLIPDB_PRECISION_INT8)
        return cdb_err_set(&m->err, CLIPDB_EINVAL, "unknown precision %d", (int)prec);
    m->prec = (cdb_prec)prec;
    for (i = 0; i < sizeof weight_files / sizeof weight_files[0]; i++) {
        free(path);
        path = cdb_path_join(dir, weight_files[i]);
        if (!path) {
            rc = cdb_err_set(&m->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        if (cdb_file_exists(path)) break;
    }
    if (i == sizeof weight_files / sizeof weight_files[0]) {
        rc = cdb_err_set(&m->err, CLIPDB_ENOTFOUND,
                         "model %s: no model.safetensors (or open_clip_model.safetensors) in it",
                         dir);
        goto cleanup;
    }
    rc = cdb_st_open(path, &m->st, &m->err);
    if (rc != CLIPDB_OK) goto cleanup;
    m->weights_path = path; /* owned by m from here */
    path = NULL;
    rc = cdb_weights_bind(m);
    if (rc != CLIPDB_OK) {
        cdb_err_prefix(&m->err, "%s", m->weights_path);
        goto cleanup;
    }
    if ((rc = pack_model(m)) != CLIPDB_OK) goto cleanup;
    rc = open_tokenizer(m);
cleanup:
    free(path);
    return rc;
}

void clipdb_model_close(clipdb_model *m)
{
    if (!m) return;
    cdb_model_unpack(m);
    cdb_weights_release(m);
    cdb_st_close(m->st);
    cdb_tok_free(m->tok);
    pthread_mutex_destroy((pthread_mutex_t *)m->identity_lock);
    free(m->identity_lock);
    free(m->weights_path);
    free(m->dir);
    free(m);
}

int clipdb_model_errcode(const clipdb_model *m)
{
    return m ? m->err.code : CLIPDB_ENOMEM;
}

const char *clipdb_model_errmsg(const clipdb_model *m)
{
    if (!m) return "out of memory";
    return m->err.code == CLIPDB_OK ? "" : m->err.msg;
}

int clipdb_model_get_info(const clipdb_model *m, clipdb_model_info *out)
{
    memset(out, 0, sizeof *out);
    if (!m->st) return CLIPDB_EINVAL;
    out->embed_dim = m->embed_dim;
    out->image_size = m->vision.image_size;
    out->patch_size = m->vision.patch;
    out->vision_width = m->vision.t.width;
    out->vision_layers = m->vision.t.layers;
    out->vision_heads = m->vision.t.heads;
    if (m->vision.rn) { /* ResNet: patch_size 0; the stage-1 width, its bottlenecks */
        const cdb_resnet *r = m->vision.rn;
        out->vision_width = r->width;
        out->vision_layers = r->n_blocks;
        out->vision_heads = r->heads;
        out->vision_kind = "resnet";
        out->vision_stages[0] = r->layers[0], out->vision_stages[1] = r->layers[1];
        out->vision_stages[2] = r->layers[2], out->vision_stages[3] = r->layers[3];
    } else {
        out->vision_kind = "vit";
    }
    out->text_width = m->text.t.width;
    out->text_layers = m->text.t.layers;
    out->text_heads = m->text.t.heads;
    out->context_length = m->text.context;
    out->vocab_size = m->text.vocab;
    out->key_style = m->key_style;
    out->weights_dtype = m->dtype;
    out->weights_bytes = m->st->map.size;
    out->precision = clipdb_precision_name((clipdb_precision)m->prec);
    out->compute = clipdb_compute_info();
    out->packed_bytes = m->packed_bytes;
    return CLIPDB_OK;
}

size_t clipdb_image_floats(const clipdb_model *m)
{
    return (size_t)3 * (size_t)m->vision.image_size * (size_t)m->vision.image_size;
}

/* ---- precision names and the compute backend ------------------------------------- */

const char *clipdb_precision_name(clipdb_precision p)
{
    switch (p) {
    case CLIPDB_PRECISION_FP32: return "fp32";
    case CLIPDB_PRECISION_BF16: return "bf16";
    case CLIPDB_PRECISION_INT8: return "int8";
    }
    return "?";
}

int clipdb_precision_parse(const char *s, clipdb_precision *out)
{
    clipdb_precision p;
    for (p = CLIPDB_PRECISION_FP32; p <= CLIPDB_PRECISION_INT8; p++)
        if (s && !strcmp(s, clipdb_precision_name(p))) {
            *out = p;
            return CLIPDB_OK;
        }
    return CLIPDB_EINVAL;
}

const char *clipdb_compute_info(void)
{
    return cdb_compute_describe();
}
