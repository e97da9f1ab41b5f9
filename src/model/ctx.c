/*
** ctx.c: the per-thread encoding context (clipdb_ctx) and its entry points,
** above the leaf modules: it calls the tokenizer (tokenizer.c), the image
** decoder and preprocessing (image.c) and the transformer (transformer.c),
** none of which knows the context. The context's struct is private to this
** file.
*/
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model/image.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "model/transformer.h"

/* Texts tokenized per group of clipdb_encode_batch: bounds the id buffer
** (4096 x 77 int32 = 1.2 MB) and leaves the text tower enough texts to group
** by length (cdb_text_forward). */
#define CDB_ENCODE_TEXT_GROUP 4096
/* Images per group, whether they come as files (decoded per group) or as
** preprocessed pixels (clipdb_encode_images): one forward chunk of the
** vision tower. The one image batching loop is encode_image_groups. */
#define CDB_ENCODE_IMAGE_GROUP CDB_VISION_CHUNK
/* Threads that decode a group's files at once (each with its own scratch). */
#define CDB_DECODE_THREADS 16

/* Per-thread scratch. Each part is owned and freed by its module:
** run (transformer.c), tok_cache (tokenizer.c), img (image.c). */
struct clipdb_ctx {
    cdb_err err;
    clipdb_model *m;
    struct cdb_run *run;
    cdb_tok_cache *tok_cache;
    struct cdb_img_scratch *img;
    struct cdb_img_scratch *img_more[CDB_DECODE_THREADS - 1]; /* decode_group's other threads */
    int truncate;                      /* clipdb_ctx_set_truncate */
    unsigned long long max_image_pixels; /* clipdb_ctx_set_max_image_pixels; 0: the default */
};

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
    for (int t = 0; t < CDB_DECODE_THREADS - 1; t++) cdb_img_scratch_free(c->img_more[t]);
    free(c);
}

int clipdb_ctx_errcode(const clipdb_ctx *c)
{
    return c ? c->err.code : CLIPDB_ENOMEM;
}

const char *clipdb_ctx_errmsg(const clipdb_ctx *c)
{
    if (!c) return "out of memory";
    return c->err.code == CLIPDB_OK ? "" : c->err.msg;
}

/* Checks that c can encode (a model with weights) and allocates its run
** scratch on first use; the message goes to c->err. */
static int ctx_ready(clipdb_ctx *c)
{
    if (!c->m) return cdb_err_set(&c->err, CLIPDB_EINVAL, "context has no model");
    if (!c->m->st)
        return cdb_err_set(&c->err, CLIPDB_EINVAL,
                           "model %s was opened without weights (tokenizer only); "
                           "open it with clipdb_model_open to encode",
                           c->m->dir ? c->m->dir : "");
    if (!c->run && !(c->run = cdb_run_new()))
        return cdb_err_set(&c->err, CLIPDB_ENOMEM, "out of memory");
    return CLIPDB_OK;
}

/* ---- texts ------------------------------------------------------------------- */

/* The tokenizer policy of the public API (clipdb_tokenize, the encoders):
** "empty text" (no token between start and end) is CLIPDB_EINVAL; more than
** cap tokens is CLIPDB_ELIMIT unless c->truncate, then truncated keeping the
** end token. Errors go to c->err; *n_ids is 0 on failure. */
static int tokenize_ctx(clipdb_ctx *c, const char *text, int32_t *ids, int cap, int *n_ids)
{
    int rc;
    size_t total = 0;
    *n_ids = 0;
    cdb_err_clear(&c->err);
    if (!c->m || !c->m->tok)
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "the model has no tokenizer");
    if (!text) return cdb_err_set(&c->err, CLIPDB_EINVAL, "no text given");
    rc = cdb_tok_encode_count(c->m->tok, c->tok_cache, text, strnlen(text, CLIPDB_MAX_TEXT_BYTES + 1),
                              ids, cap, n_ids, &total, &c->err);
    if (rc != CLIPDB_OK) return rc;
    if (total <= 2) {
        *n_ids = 0;
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "empty text");
    }
    if (total > (size_t)cap && !c->truncate) {
        *n_ids = 0;
        return cdb_err_set(&c->err, CLIPDB_ELIMIT,
                           "text is %zu tokens long; the context holds %d",
                           total, cap);
    }
    return CLIPDB_OK;
}

int clipdb_tokenize(clipdb_ctx *c, const char *text, int32_t *ids, int cap, int *n_ids)
{
    if (!c) return CLIPDB_EINVAL;
    return tokenize_ctx(c, text, ids, cap, n_ids);
}

int clipdb_ctx_set_truncate(clipdb_ctx *c, int on)
{
    if (!c) return CLIPDB_EINVAL;
    c->truncate = on ? 1 : 0;
    return CLIPDB_OK;
}

/* ---- images ------------------------------------------------------------------ */

int clipdb_ctx_set_max_image_pixels(clipdb_ctx *c, unsigned long long n)
{
    if (!c) return CLIPDB_EINVAL;
    if (n > CLIPDB_MAX_IMAGE_PIXELS)
        return cdb_err_set(&c->err, CLIPDB_EINVAL,
                           "image pixel limit %llu is above the largest, %u (CLIPDB_MAX_IMAGE_PIXELS)",
                           n, CLIPDB_MAX_IMAGE_PIXELS);
    c->max_image_pixels = n;
    return CLIPDB_OK;
}

static int image_load(clipdb_ctx *c, const char *path, const void *data, size_t len,
                      float *pixels)
{
    int size;
    if (!c) return CLIPDB_EINVAL;
    cdb_err_clear(&c->err);
    if (!c->m || !pixels || (!path && !data))
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "image load: missing argument");
    size = c->m->vision.image_size;
    if (size < 1) return cdb_err_set(&c->err, CLIPDB_EINVAL, "model has no vision tower");
    return cdb_image_load_with(&c->img, path, data, len, size, c->max_image_pixels, pixels,
                               &c->err);
}

int clipdb_image_load(clipdb_ctx *c, const char *path, float *pixels)
{
    if (!path) return c ? cdb_err_set(&c->err, CLIPDB_EINVAL, "no image path given") : CLIPDB_EINVAL;
    return image_load(c, path, NULL, 0, pixels);
}

int clipdb_image_load_memory(clipdb_ctx *c, const void *data, size_t len, float *pixels)
{
    if (!data) return c ? cdb_err_set(&c->err, CLIPDB_EINVAL, "no image data given") : CLIPDB_EINVAL;
    return image_load(c, NULL, data, len, pixels);
}

/* ---- encoding ------------------------------------------------------------------ */

int clipdb_encode_texts(clipdb_ctx *c, const char *const *texts, int n, float *out)
{
    return clipdb_encode_batch(c, CLIPDB_INPUT_TEXT, texts, n, out, NULL, NULL);
}

/* Input `index` failed with the error in c->err: recorded in status (the
** call goes on: returns CLIPDB_OK) or, without status, kept on the ctx (the
** call stops: returns the code). */
static int item_failed(clipdb_ctx *c, clipdb_item_status *status, int index, float *row, int dim,
                       int *n_failed)
{
    if (!status) return c->err.code;
    status[index].code = c->err.code;
    snprintf(status[index].msg, sizeof status[index].msg, "%s", c->err.msg);
    memset(row, 0, (size_t)dim * sizeof *row);
    (*n_failed)++;
    cdb_err_clear(&c->err);
    return CLIPDB_OK;
}

/* Row i of tmp (k, E) -> row slot[i] of out: the inputs of a group that
** were encoded go back to their places. */
static void scatter_rows(float *out, const int *slot, const float *tmp, int k, int E)
{
    int i;
    for (i = 0; i < k; i++)
        memcpy(out + (size_t)slot[i] * E, tmp + (size_t)i * E, (size_t)E * sizeof *tmp);
}

/* Texts in groups: tokenize every text of the group (per-input failures),
** then one text-tower call on those that tokenized. */
static int encode_text_groups(clipdb_ctx *c, const char *const *texts, int n, float *out,
                              clipdb_item_status *status, int *n_failed)
{
    int rc = CLIPDB_OK, C = c->m->text.context, E = c->m->embed_dim;
    int G = n < CDB_ENCODE_TEXT_GROUP ? n : CDB_ENCODE_TEXT_GROUP, g0, i, k;
    int32_t *buf = cdb_malloc_array((size_t)G * (size_t)C, sizeof *buf);
    const int32_t **ids = cdb_malloc_array((size_t)G, sizeof *ids);
    int *lens = cdb_malloc_array((size_t)G, sizeof *lens);
    int *slot = cdb_malloc_array((size_t)G, sizeof *slot);
    float *tmp = cdb_malloc_array((size_t)G * (size_t)E, sizeof *tmp);

    if (!buf || !ids || !lens || !slot || !tmp) {
        rc = cdb_err_set(&c->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (g0 = 0; g0 < n; g0 += G) {
        int cnt = n - g0 < G ? n - g0 : G;
        for (i = k = 0; i < cnt; i++) {
            int32_t *row = buf + (size_t)k * C;
            /* CLIP's policy (tokenizer.c): empty text, non-UTF-8 and more
            ** than C tokens (unless clipdb_ctx_set_truncate) are refused */
            if (tokenize_ctx(c, texts[g0 + i], row, C, &lens[k]) != CLIPDB_OK) {
                if (n > 1) cdb_err_prefix(&c->err, "text %d", g0 + i);
                rc = item_failed(c, status, g0 + i, out + (size_t)(g0 + i) * E, E, n_failed);
                if (rc != CLIPDB_OK) goto cleanup;
                continue;
            }
            ids[k] = row;
            slot[k++] = g0 + i;
        }
        if (k == 0) continue;
        // k texts (ids, lens) -> tmp (k, E)
        rc = cdb_text_forward(c->run, &c->m->text, E, ids, lens, k, 0, tmp, &c->err);
        if (rc != CLIPDB_OK) goto cleanup;
        scatter_rows(out, slot, tmp, k, E);
    }
cleanup:
    free(buf);
    free(ids);
    free(lens);
    free(slot);
    free(tmp);
    return rc;
}

/* The one image batching loop, in groups of CDB_ENCODE_IMAGE_GROUP, for both
** sources of images: files (paths != NULL: decode + preprocess each into the
** group's buffer, per-input failures, then one vision-tower call on those
** that decoded) or preprocessed pixels (n, 3, S, S) of the caller (no
** decoding and no copy: the group's rows are the caller's). */
/* pixels (n, 3, S, S) -> out (n, E) through the model's image tower: the
** ViT (transformer.c) or CLIP's ModifiedResNet (resnet.c). */
static int vision_forward(clipdb_ctx *c, const float *pixels, int n, float *out)
{
    const cdb_vision *v = &c->m->vision;
    if (v->rn)
        return cdb_resnet_forward(v->rn, v->image_size, c->m->embed_dim, pixels, n, out, &c->err);
    return cdb_vision_forward(c->run, v, c->m->embed_dim, pixels, n, out, &c->err);
}

/* The files of one image group, decoded at once: file i into row i of pix,
** its status into errs[i] (a file's message starts with its path). */
typedef struct decode_job {
    clipdb_ctx *c;
    const char *const *paths; /* the group's cnt paths */
    float *pix;               /* (cnt, 3, S, S) */
    cdb_err *errs;            /* (cnt) */
    int cnt, size;
    atomic_int next;
} decode_job;

/* Task t takes files one at a time until none is left (photos take unequal
** times: no fixed split), decoding each with thread t's own scratch. */
static void decode_task(void *arg, size_t t)
{
    decode_job *j = arg;
    struct cdb_img_scratch **s = t == 0 ? &j->c->img : &j->c->img_more[t - 1];
    const size_t px = (size_t)3 * (size_t)j->size * (size_t)j->size;
    int i;
    while ((i = atomic_fetch_add(&j->next, 1)) < j->cnt) {
        cdb_err_clear(&j->errs[i]);
        if (!j->paths[i])
            cdb_err_set(&j->errs[i], CLIPDB_EINVAL, "no image path given");
        else
            cdb_image_load_with(s, j->paths[i], NULL, 0, j->size, j->c->max_image_pixels,
                                j->pix + (size_t)i * px, &j->errs[i]);
    }
}

/* Decodes and preprocesses a group's files on all threads: on the OpenMP
** threads the model's GEMMs run on (gcc; as transformer.c's run_tasks, so
** that they do not spin on the cores the decoders need), else on the
** process pool. Measured on 128 photos, 2 cores: decoding on one thread
** while the other waited was a quarter of a bf16 `clipdb embed`. */
static void decode_group(clipdb_ctx *c, const char *const *paths, int cnt, float *pix,
                         cdb_err *errs)
{
    decode_job j = {.c = c, .paths = paths, .pix = pix, .errs = errs, .cnt = cnt,
                    .size = c->m->vision.image_size};
    int nt;
#ifdef _OPENMP
    nt = omp_in_parallel() ? 1 : omp_get_max_threads();
#else
    nt = cdb_pool_threads();
#endif
    if (nt > CDB_DECODE_THREADS) nt = CDB_DECODE_THREADS;
    if (nt > cnt) nt = cnt;
    atomic_init(&j.next, 0);
    if (nt <= 1) {
        decode_task(&j, 0);
        return;
    }
#ifdef _OPENMP
    {
        int t;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
        for (t = 0; t < nt; t++) decode_task(&j, (size_t)t);
    }
#else
    cdb_pool_run((size_t)nt, decode_task, &j);
#endif
}

static int encode_image_groups(clipdb_ctx *c, const char *const *paths, const float *pixels,
                               int n, float *out, clipdb_item_status *status, int *n_failed)
{
    int rc = CLIPDB_OK, E = c->m->embed_dim, g0, i, k;
    int G = n < CDB_ENCODE_IMAGE_GROUP ? n : CDB_ENCODE_IMAGE_GROUP;
    size_t px = clipdb_image_floats(c->m);
    float *pix = NULL, *tmp = NULL;
    int *slot = NULL;
    cdb_err *errs = NULL;

    if (paths) {
        if (c->m->vision.image_size < 1)
            return cdb_err_set(&c->err, CLIPDB_EINVAL, "model has no vision tower");
        pix = cdb_malloc_array((size_t)G * px, sizeof *pix);
        tmp = cdb_malloc_array((size_t)G * (size_t)E, sizeof *tmp);
        slot = cdb_malloc_array((size_t)G, sizeof *slot);
        errs = cdb_malloc_array((size_t)G, sizeof *errs);
        if (!pix || !tmp || !slot || !errs) {
            rc = cdb_err_set(&c->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    for (g0 = 0; g0 < n; g0 += G) {
        int cnt = n - g0 < G ? n - g0 : G;
        if (!paths) {
            // pixels[g0..] (cnt, 3, S, S) -> out[g0..] (cnt, E)
            rc = vision_forward(c, pixels + (size_t)g0 * px, cnt, out + (size_t)g0 * E);
            if (rc != CLIPDB_OK) goto cleanup;
            continue;
        }
        // files paths[g0..] -> pix (cnt, 3, S, S), statuses errs (cnt)
        decode_group(c, paths + g0, cnt, pix, errs);
        for (i = k = 0; i < cnt; i++) { /* in input order, as if decoded one by one */
            if (errs[i].code != CLIPDB_OK) {
                c->err = errs[i];
                rc = item_failed(c, status, g0 + i, out + (size_t)(g0 + i) * E, E, n_failed);
                if (rc != CLIPDB_OK) goto cleanup;
                continue;
            }
            if (k != i) memcpy(pix + (size_t)k * px, pix + (size_t)i * px, px * sizeof *pix);
            slot[k++] = g0 + i;
        }
        if (k == 0) continue;
        // pixels (k, 3, S, S) -> tmp (k, E)
        rc = vision_forward(c, pix, k, tmp);
        if (rc != CLIPDB_OK) goto cleanup;
        scatter_rows(out, slot, tmp, k, E);
    }
cleanup:
    free(pix);
    free(tmp);
    free(slot);
    free(errs);
    return rc;
}

/* The pixel form of the batched encoder: the same image groups as the files
** of clipdb_encode_batch (the ingest pipeline decodes in its own threads and
** hands the pixels here). */
int clipdb_encode_images(clipdb_ctx *c, const float *pixels, int n, float *out)
{
    int rc;
    if (!c) return CLIPDB_EINVAL;
    cdb_err_clear(&c->err);
    if ((rc = ctx_ready(c))) return rc;
    if (n < 0 || (n > 0 && (!pixels || !out)))
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "encode_images: bad arguments");
    // pixels (n, 3, S, S) -> out (n, embed_dim)
    return encode_image_groups(c, NULL, pixels, n, out, NULL, NULL);
}

int clipdb_encode_batch(clipdb_ctx *c, clipdb_input_kind kind, const char *const *inputs, int n,
                        float *out, clipdb_item_status *status, int *n_failed)
{
    int rc, failed = 0, i;
    if (n_failed) *n_failed = 0;
    if (!c) return CLIPDB_EINVAL;
    cdb_err_clear(&c->err);
    if (n < 0 || (n > 0 && (!inputs || !out)))
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "encode_batch: bad arguments");
    if (kind != CLIPDB_INPUT_TEXT && kind != CLIPDB_INPUT_IMAGE_FILE)
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "encode_batch: unknown input kind %d",
                           (int)kind);
    if ((rc = ctx_ready(c))) return rc;
    for (i = 0; status && i < n; i++) {
        status[i].code = CLIPDB_OK;
        status[i].msg[0] = 0;
    }
    if (n == 0) return CLIPDB_OK;
    rc = kind == CLIPDB_INPUT_TEXT ? encode_text_groups(c, inputs, n, out, status, &failed)
                                   : encode_image_groups(c, inputs, NULL, n, out, status, &failed);
    if (n_failed) *n_failed = failed;
    return rc;
}
