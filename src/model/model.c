/*
** model.c: opening and closing a model directory (weights + tokenizer),
** its public description and identity.
*/
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda.h"
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

static int open_tokenizer(clipdb_model *m)
{
    int rc = cdb_tok_load_dir(m->dir, &m->tok, &m->err);
    if (rc != CLIPDB_OK) cdb_err_prefix(&m->err, "model %s: tokenizer", m->dir);
    return rc;
}

int clipdb_model_open_tokenizer(clipdb_model **out, const char *dir)
{
    clipdb_model *m;
    *out = m = model_alloc(dir ? dir : "");
    if (!m) return CLIPDB_ENOMEM;
    if (!dir) return cdb_err_set(&m->err, CLIPDB_EINVAL, "no model directory given");
    m->text.context = 77;
    return open_tokenizer(m);
}

int clipdb_model_open(clipdb_model **out, const char *dir)
{
    int rc = CLIPDB_OK;
    clipdb_model *m;
    char *path = NULL;
    size_t i;

    *out = m = model_alloc(dir ? dir : "");
    if (!m) return CLIPDB_ENOMEM;
    if (!dir) return cdb_err_set(&m->err, CLIPDB_EINVAL, "no model directory given");
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
    rc = open_tokenizer(m);
cleanup:
    free(path);
    return rc;
}

void clipdb_model_close(clipdb_model *m)
{
    if (!m) return;
    cdb_weights_release(m);
    cdb_st_close(m->st);
    cdb_tok_free(m->tok);
    pthread_mutex_destroy((pthread_mutex_t *)m->identity_lock);
    free(m->identity_lock);
    free(m->weights_path);
    free(m->dir);
    free(m);
}

const char *clipdb_model_errmsg(const clipdb_model *m)
{
    if (!m) return "out of memory";
    return m->err.code == CLIPDB_OK ? "no error" : m->err.msg;
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
    out->text_width = m->text.t.width;
    out->text_layers = m->text.t.layers;
    out->text_heads = m->text.t.heads;
    out->context_length = m->text.context;
    out->vocab_size = m->text.vocab;
    out->key_style = m->key_style;
    out->weights_dtype = m->dtype;
    out->weights_bytes = m->st->map.size;
    return CLIPDB_OK;
}

size_t clipdb_image_floats(const clipdb_model *m)
{
    return (size_t)3 * (size_t)m->vision.image_size * (size_t)m->vision.image_size;
}

int clipdb_ctx_new(clipdb_ctx **out, clipdb_model *m)
{
    clipdb_ctx *c;
    *out = c = calloc(1, sizeof *c);
    if (!c) return CLIPDB_ENOMEM;
    c->m = m;
    if (!m) return cdb_err_set(&c->err, CLIPDB_EINVAL, "no model given");
    c->tok_cache = cdb_tok_cache_new();
    if (!c->tok_cache) return cdb_err_set(&c->err, CLIPDB_ENOMEM, "out of memory");
    return CLIPDB_OK;
}

void clipdb_ctx_free(clipdb_ctx *c)
{
    if (!c) return;
    cdb_run_free(c->run);
    cdb_tok_cache_free(c->tok_cache);
    cdb_img_scratch_free(c->img);
    cdb_cuda_model_free(c->gpu);
    free(c);
}

const char *clipdb_ctx_errmsg(const clipdb_ctx *c)
{
    if (!c) return "out of memory";
    return c->err.code == CLIPDB_OK ? "no error" : c->err.msg;
}
