/*
** data.c: the training data of clipdb train / finetune (see loop.h): image-
** caption pairs from files, the held-out split, the seeded draws, and batch
** assembly (decode, preprocess or augment, tokenize).
*/
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "store/captions.h"
#include "train/loop.h"

uint64_t cdb_tdraw(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b)
{
    /* splitmix64 over a mix of the four words: one independent stream per tuple */
    cdb_rng r = {seed};
    r.s = cdb_rng_next(&r) ^ (purpose * 0xd1b54a32d192ed03ull);
    r.s = cdb_rng_next(&r) ^ (a * 0x8cb92ba72f3d8dd7ull);
    r.s = cdb_rng_next(&r) ^ (b * 0xaf251af3b0f025b5ull);
    return cdb_rng_next(&r);
}

void cdb_tdata_order(uint64_t seed, long epoch, size_t n, int64_t *order)
{
    /* Fisher-Yates with one seeded stream per epoch */
    cdb_rng r = {cdb_tdraw(seed, CDB_DRAW_ORDER, (uint64_t)epoch, 0)};
    size_t i;
    for (i = 0; i < n; i++) order[i] = (int64_t)i;
    for (i = n; i > 1; i--) {
        size_t j = (size_t)cdb_rng_below(&r, i);
        int64_t tmp = order[i - 1];
        order[i - 1] = order[j];
        order[j] = tmp;
    }
}

void cdb_tdata_patches(uint64_t seed, long step, size_t img, int np, int nkeep, int32_t *keep)
{
    /* selection sampling (Knuth's algorithm S): each index is taken with
    ** probability (still needed) / (still left), so the kept set is uniform
    ** and comes out in increasing order */
    cdb_rng r = {cdb_tdraw(seed, CDB_DRAW_PATCH, (uint64_t)step, (uint64_t)img)};
    int p, k = 0;
    for (p = 0; p < np && k < nkeep; p++)
        if (cdb_rng_below(&r, (uint64_t)(np - p)) < (uint64_t)(nkeep - k)) keep[k++] = p;
}

int cdb_tdata_patch_count(int np, float p)
{
    int k;
    if (!(p > 0.0f)) return np;
    k = (int)floor((double)np * (1.0 - (double)p));
    return k < 1 ? 1 : k > np ? np : k;
}

void cdb_tdata_free(cdb_tdata *d)
{
    if (!d) return;
    cdb_pairs_free(d->pairs);
    free(d->train);
    free(d->val);
    memset(d, 0, sizeof *d);
}

/* The "split" field of an entry's metadata, compared with want. */
static int split_is(const cdb_caption_entry *en, const char *want)
{
    cJSON *j, *s;
    int eq;
    if (!en->meta_json) return 0;
    j = cJSON_Parse(en->meta_json);
    s = j ? cJSON_GetObjectItemCaseSensitive(j, "split") : NULL;
    eq = cJSON_IsString(s) && !strcmp(s->valuestring, want);
    cJSON_Delete(j);
    return eq;
}

int cdb_tdata_from_files(const char *images_dir, const char *captions_path, const char *split,
                         const char *val_split, float val_fraction, int val_max, uint64_t seed,
                         cdb_tdata *out, size_t *n_missing, cdb_err *e)
{
    cdb_captions *c = NULL;
    cdb_pairs *p = NULL;
    int8_t *role = NULL; /* per pair: 1 train, 2 val */
    size_t i, j, cap = 0, cap_t = 0, cap_v = 0;
    int rc;

    memset(out, 0, sizeof *out);
    *n_missing = 0;
    if ((rc = cdb_captions_load(captions_path, &c, e))) return rc;
    if (!(p = calloc(1, sizeof *p)) || !(role = calloc(c->n ? c->n : 1, 1))) goto oom;
    for (i = 0; i < c->n; i++) {
        cdb_caption_entry *en = &c->e[i];
        cdb_pair_image *im;
        int r = 0;
        char *path;
        if (!en->n_captions) continue;
        if (split && split_is(en, split)) r = 1;
        else if (val_split && split_is(en, val_split)) r = 2;
        else if (!split) r = 1;
        if (!r) continue;
        if (!(path = cdb_path_join(images_dir, en->image))) goto oom;
        if (!cdb_file_exists(path)) {
            (*n_missing)++;
            free(path);
            continue;
        }
        if (cdb_grow((void **)&p->img, &cap, p->n + 1, sizeof *p->img)) {
            free(path);
            goto oom;
        }
        im = &p->img[p->n];
        memset(im, 0, sizeof *im);
        im->id = (int64_t)p->n;
        im->path = path;
        role[p->n++] = (int8_t)r;
        for (j = 0; j < en->n_captions; j++) {
            char *s = cdb_strdup(en->captions[j]);
            if (!s || cdb_grow((void **)&im->captions, &im->cap_captions, im->n_captions + 1,
                               sizeof *im->captions)) {
                free(s);
                goto oom;
            }
            im->captions[im->n_captions++] = s;
            p->n_captions++;
        }
    }
    /* Without a validation split: hold out a seeded fraction of the images. */
    if (!val_split && val_fraction > 0 && p->n > 1) {
        size_t n_val = (size_t)llround((double)val_fraction * (double)p->n);
        int64_t *perm = cdb_malloc_array(p->n, sizeof *perm);
        if (!perm) goto oom;
        if (n_val > (size_t)val_max) n_val = (size_t)val_max;
        if (n_val >= p->n) n_val = p->n - 1;
        cdb_tdata_order(seed ^ CDB_DRAW_SPLIT, -1, p->n, perm);
        for (i = 0; i < n_val; i++) role[perm[i]] = 2;
        free(perm);
    }
    for (i = 0; i < p->n; i++) {
        int64_t **arr = role[i] == 2 ? &out->val : &out->train;
        size_t *n = role[i] == 2 ? &out->n_val : &out->n_train;
        if (cdb_grow((void **)arr, role[i] == 2 ? &cap_v : &cap_t, *n + 1, sizeof **arr))
            goto oom;
        (*arr)[(*n)++] = (int64_t)i;
    }
    out->pairs = p;
    free(role);
    cdb_captions_free(c);
    return CLIPDB_OK;
oom:
    free(role);
    cdb_pairs_free(p);
    cdb_captions_free(c);
    free(out->train);
    free(out->val);
    memset(out, 0, sizeof *out);
    return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory reading %s", captions_path);
}

/* ---- batches ---------------------------------------------------------------- */

int cdb_batch_init(cdb_batch *b, int cap, int texts, int image_size, int context,
                   size_t n_images, cdb_err *e)
{
    size_t plane = (size_t)3 * image_size * image_size, i, rows;
    memset(b, 0, sizeof *b);
    if (cap < 1 || texts < 1 || texts > CDB_MAX_TEXTS_PER_IMAGE)
        return cdb_err_set(e, CLIPDB_EINVAL, "a batch of %d images with %d texts each", cap,
                           texts);
    rows = (size_t)cap * (size_t)texts;
    b->cap = cap;
    b->texts = texts;
    b->image_size = image_size;
    b->context = context;
    b->pixels = cdb_malloc_array((size_t)cap, plane * sizeof(float));
    b->ids = cdb_calloc_array(rows, sizeof *b->ids);
    b->ids_buf = cdb_malloc_array(rows * (size_t)context, sizeof *b->ids_buf);
    b->lens = cdb_calloc_array(rows, sizeof *b->lens);
    b->tok_cache = cdb_tok_cache_new();
    b->n_images = n_images;
    b->cache_budget = CDB_PIXEL_CACHE_BYTES;
    if (n_images) b->cache = cdb_calloc_array(n_images, sizeof *b->cache);
    if (!b->pixels || !b->ids || !b->ids_buf || !b->lens || !b->tok_cache ||
        (n_images && !b->cache)) {
        cdb_batch_free(b);
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory for a batch of %d", cap);
    }
    for (i = 0; i < rows; i++) b->ids[i] = b->ids_buf + i * (size_t)context;
    return CLIPDB_OK;
}

void cdb_batch_free(cdb_batch *b)
{
    size_t i;
    if (!b) return;
    free(b->pixels);
    free(b->ids);
    free(b->ids_buf);
    free(b->lens);
    for (i = 0; b->cache && i < b->n_images; i++) free(b->cache[i]);
    free(b->cache);
    cdb_rgb_free(&b->rgb);
    cdb_img_scratch_free(b->scratch);
    cdb_tok_cache_free(b->tok_cache);
    memset(b, 0, sizeof *b);
}

/* torchvision RandomResizedCrop.get_params: up to 10 tries of an area in
** [crop_min, 1] of the image and a log-uniform aspect in [3/4, 4/3]; else
** the centre crop of the largest box within those aspect bounds. */
static void crop_box(cdb_rng *r, int w, int h, float crop_min, int *x, int *y, int *cw, int *ch)
{
    double area = (double)w * h, lr0 = log(3.0 / 4.0), lr1 = log(4.0 / 3.0), ratio;
    int t;
    for (t = 0; t < 10; t++) {
        double target = area * (crop_min + (1.0 - crop_min) * cdb_rng_unif(r));
        double ar = exp(lr0 + (lr1 - lr0) * cdb_rng_unif(r));
        int bw = (int)lround(sqrt(target * ar)), bh = (int)lround(sqrt(target / ar));
        if (bw > 0 && bh > 0 && bw <= w && bh <= h) {
            *x = (int)cdb_rng_below(r, (uint64_t)(w - bw + 1));
            *y = (int)cdb_rng_below(r, (uint64_t)(h - bh + 1));
            *cw = bw;
            *ch = bh;
            return;
        }
    }
    ratio = (double)w / h;
    if (ratio < 3.0 / 4.0) {
        *cw = w;
        *ch = (int)lround(w / (3.0 / 4.0));
    } else if (ratio > 4.0 / 3.0) {
        *ch = h;
        *cw = (int)lround(h * (4.0 / 3.0));
    } else {
        *cw = w;
        *ch = h;
    }
    *x = (w - *cw) / 2;
    *y = (h - *ch) / 2;
}

/* Text augmentation: drops each token between the start (ids[0]) and end
** (ids[n-1]) tokens with probability p, keeping at least one, and moves the
** end token up; the freed tail is zeroed. */
static void drop_tokens(int32_t *ids, int *n, float p, uint64_t state)
{
    cdb_rng r = {state};
    int i, k = 1, last = *n - 1, keep_one = 1 + (int)cdb_rng_below(&r, (uint64_t)(last - 1));
    int32_t end = ids[last];
    for (i = 1; i < last; i++) {
        if (cdb_rng_unif(&r) >= p) ids[k++] = ids[i];
    }
    if (k == 1) ids[k++] = ids[keep_one]; /* ids[keep_one] is untouched: nothing was moved */
    ids[k++] = end;
    for (i = k; i < *n; i++) ids[i] = 0;
    *n = k;
}

/* Tokenizes text (a caption of im) into text row `row`, tokens dropped with
** probability text_drop from the random stream drop_state. */
static int load_text(cdb_batch *b, int row, const cdb_pair_image *im, const char *text,
                     const cdb_tokenizer *tok, float text_drop, uint64_t drop_state, cdb_err *e)
{
    int n_ids = 0;
    int rc = cdb_tok_encode(tok, b->tok_cache, text, strlen(text), b->ids[row], b->context,
                            &n_ids, e);
    if (rc != CLIPDB_OK) {
        cdb_err_prefix(e, "caption of %s", im->path);
        return rc;
    }
    if (text_drop > 0 && n_ids > 3) drop_tokens(b->ids[row], &n_ids, text_drop, drop_state);
    b->lens[row] = n_ids;
    return CLIPDB_OK;
}

int cdb_batch_load(cdb_batch *b, int j, const cdb_pairs *p, size_t img, size_t cap,
                   const cdb_tokenizer *tok, int augment, float crop_min, float text_drop,
                   uint64_t seed, long step, cdb_err *e)
{
    const cdb_pair_image *im = &p->img[img];
    const char *text = im->captions[cap];
    float *px = b->pixels + (size_t)j * 3 * b->image_size * b->image_size;
    size_t plane = (size_t)3 * b->image_size * b->image_size;
    int rc;

    if (!augment && b->cache && img < b->n_images && b->cache[img]) {
        memcpy(px, b->cache[img], plane * sizeof *px);
        goto tokenize;
    }
    /* augmentation crops the full-size image; plain CLIP preprocessing may
    ** decode a large JPEG at a reduced scale, as clipdb add does */
    rc = cdb_image_decode_file(im->path, augment ? 0 : b->image_size, &b->rgb, e);
    if (rc != CLIPDB_OK) return rc;
    if (augment) {
        cdb_rng r = {cdb_tdraw(seed, CDB_DRAW_CROP, (uint64_t)step, (uint64_t)img)};
        int x, y, cw, ch, flip;
        crop_box(&r, b->rgb.w, b->rgb.h, crop_min, &x, &y, &cw, &ch);
        flip = (int)(cdb_rng_next(&r) >> 63);
        rc = cdb_image_preprocess_box(&b->scratch, &b->rgb, x, y, cw, ch, flip, b->image_size,
                                      px);
    } else {
        rc = cdb_image_preprocess_with(&b->scratch, &b->rgb, b->image_size, px);
    }
    if (rc != CLIPDB_OK)
        return cdb_err_set(e, rc, "%s: preprocessing failed (%s)", im->path,
                           clipdb_status_name(rc));
    if (!augment && b->cache && img < b->n_images &&
        b->cache_bytes + plane * sizeof *px <= b->cache_budget &&
        (b->cache[img] = cdb_malloc_array(plane, sizeof *px)) != NULL) {
        memcpy(b->cache[img], px, plane * sizeof *px);
        b->cache_bytes += plane * sizeof *px;
    }
tokenize:
    return load_text(b, j, im, text, tok, text_drop,
                     cdb_tdraw(seed, CDB_DRAW_TEXT_DROP, (uint64_t)step, (uint64_t)img), e);
}

int cdb_batch_load_text(cdb_batch *b, int row, const cdb_pairs *p, size_t img, size_t cap,
                        const cdb_tokenizer *tok, float text_drop, uint64_t drop_state,
                        cdb_err *e)
{
    if (row < 0 || row >= b->cap * b->texts || img >= p->n || cap >= p->img[img].n_captions)
        return cdb_err_set(e, CLIPDB_EINVAL, "text row %d, image %zu, caption %zu: out of range",
                           row, img, cap);
    return load_text(b, row, &p->img[img], p->img[img].captions[cap], tok, text_drop,
                     drop_state, e);
}
