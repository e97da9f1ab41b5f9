/*
** ingest.c: clipdb_db_add, the ingest pipeline.
**
** Images: the folder is walked (recursively, sorted, by extension), then a
** pool of decode threads reads each file, hashes it (SHA-256) and, unless
** the same path with the same hash is already stored, decodes and
** preprocesses it into a slot of a bounded ring. The calling thread takes
** the slots in file order, gathers batches, encodes them while the pool
** decodes the next files, and writes each batch in one transaction: an
** image, its vector, its captions and their vectors commit together or not
** at all, so a killed run resumes where it stopped.
**
** Encoding goes through the one batched encoder of ctx.c and its groups:
** clipdb_encode_images (its pixel form) for the images, clipdb_encode_batch
** for the captions and texts. The pool stays because the file-path form of
** clipdb_encode_batch would read each file a second time (the SHA-256
** stored must be of the bytes encoded), could not skip an unchanged file
** before decoding it, and decodes on the calling thread, one file after
** another, where the pool decodes in parallel with the encoder. A batch
** (clipdb_add_options.batch_size) is the unit of a transaction, not of the
** encoder.
*/
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store/captions.h"
#include "store/store.h"

#define MAX_DEPTH 64                       /* folder nesting */
#define TEXTS_PER_COMMIT 64 /* standalone texts per transaction */

void clipdb_add_options_init(clipdb_add_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->batch_size = CLIPDB_ADD_BATCH_DEFAULT;
    opt->progress_interval_s = 0.25;
}

/* ---- walking the folder --------------------------------------------------- */

typedef struct file_list {
    char **rel;   /* paths relative to the folder */
    size_t n, cap;
} file_list;

static int is_image_name(const char *name)
{
    static const char *const ext[] = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"};
    size_t n = strlen(name), i;
    for (i = 0; i < sizeof ext / sizeof ext[0]; i++) {
        size_t m = strlen(ext[i]);
        if (n > m && !strcasecmp(name + n - m, ext[i])) return 1;
    }
    return 0;
}

static int list_push(file_list *l, char *s)
{
    if (cdb_grow((void **)&l->rel, &l->cap, l->n + 1, sizeof *l->rel)) return -1;
    l->rel[l->n++] = s;
    return 0;
}

/* The folder walk: the files found, the folders already walked (by device
** and inode, so a symlink alias of a folder or a loop is walked once), and
** the entries that could not be walked (reported and skipped). */
typedef struct dir_id {
    dev_t dev;
    ino_t ino;
} dir_id;

typedef struct walk_ctx {
    const char *root;
    file_list *l;
    const clipdb_add_options *opt;
    dir_id *seen;
    size_t n_seen, cap_seen;
    int64_t failed;
} walk_ctx;

static void walk_warn(walk_ctx *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void walk_warn(walk_ctx *w, const char *fmt, ...)
{
    char msg[CDB_ERRMSG_MAX];
    va_list ap;
    if (!w->opt->on_warning) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    w->opt->on_warning(w->opt->arg, msg);
}

/* 1 if the folder was walked already; else records it and returns 0; -1 on OOM. */
static int seen_dir(walk_ctx *w, const struct stat *sb)
{
    size_t i;
    for (i = 0; i < w->n_seen; i++)
        if (w->seen[i].dev == sb->st_dev && w->seen[i].ino == sb->st_ino) return 1;
    if (cdb_grow((void **)&w->seen, &w->cap_seen, w->n_seen + 1, sizeof *w->seen)) return -1;
    w->seen[w->n_seen].dev = sb->st_dev;
    w->seen[w->n_seen].ino = sb->st_ino;
    w->n_seen++;
    return 0;
}

/* Walks root/rel. Only the top folder failing to open is an error; below
** it, an unreadable folder or entry, a symlink loop and a folder nested too
** deep are reported once each (on_warning) and skipped. */
static int walk(walk_ctx *w, const char *rel, int depth, cdb_err *e)
{
    struct dirent **names = NULL;
    char *dir = NULL;
    int n = 0, i, rc = CLIPDB_OK;

    dir = *rel ? cdb_path_join(w->root, rel) : cdb_strdup(w->root);
    if (!dir) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    if (depth > MAX_DEPTH) {
        walk_warn(w, "%s: folders nested deeper than %d", dir, MAX_DEPTH);
        w->failed++;
        goto cleanup;
    }
    if (depth == 0) {
        struct stat sb;
        if (stat(dir, &sb) != 0 || seen_dir(w, &sb) < 0) {
            rc = cdb_err_set(e, errno == ENOENT ? CLIPDB_ENOTFOUND : CLIPDB_EIO, "%s: %s", dir,
                             strerror(errno));
            goto cleanup;
        }
    }
    n = scandir(dir, &names, NULL, alphasort);
    if (n < 0) {
        if (depth == 0)
            rc = cdb_err_set(e, errno == ENOENT ? CLIPDB_ENOTFOUND : CLIPDB_EIO, "%s: %s", dir,
                             strerror(errno));
        else {
            walk_warn(w, "%s: %s", dir, strerror(errno));
            w->failed++;
        }
        n = 0;
        goto cleanup;
    }
    for (i = 0; i < n; i++) {
        const char *nm = names[i]->d_name;
        char *child = NULL, *full = NULL;
        struct stat sb;
        int seen;
        if (rc != CLIPDB_OK || nm[0] == '.') continue; /* ., .., hidden files */
        child = *rel ? cdb_path_join(rel, nm) : cdb_strdup(nm);
        full = child ? cdb_path_join(w->root, child) : NULL;
        if (!full) {
            free(child);
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            continue;
        }
        if (stat(full, &sb) != 0) {
            /* a dangling link, a symlink loop (ELOOP), no permission */
            walk_warn(w, "%s: %s", full, strerror(errno));
            w->failed++;
            free(child);
        } else if (S_ISDIR(sb.st_mode)) {
            if ((seen = seen_dir(w, &sb)) < 0) rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            else if (seen)
                walk_warn(w, "%s: a folder already walked (a symlink alias or loop); not walked again",
                          full);
            else rc = walk(w, child, depth + 1, e);
            free(child);
        } else if (S_ISREG(sb.st_mode) && is_image_name(nm)) {
            if (list_push(w->l, child)) {
                free(child);
                rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            }
        } else {
            if (is_image_name(nm)) {
                walk_warn(w, "%s: not a regular file", full);
                w->failed++;
            }
            free(child);
        }
        free(full);
    }
cleanup:
    for (i = 0; i < n; i++) free(names[i]);
    free(names);
    free(dir);
    return rc;
}

/* ---- images already stored -------------------------------------------------- */

typedef struct known {
    char *abspath;
    char sha[65];
    int64_t id;
} known;

static int cmp_known(const void *a, const void *b)
{
    return strcmp(((const known *)a)->abspath, ((const known *)b)->abspath);
}

static int load_known(clipdb_db *db, known **out, size_t *n_out)
{
    sqlite3_stmt *st = NULL;
    known *k = NULL;
    size_t n = 0, cap = 0;
    int rc = cdb_db_prepare(db, "SELECT abspath, sha256, id FROM items WHERE type = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, CLIPDB_ITEM_IMAGE);
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *a = (const char *)sqlite3_column_text(st, 0);
        const char *h = (const char *)sqlite3_column_text(st, 1);
        if (!a) continue;
        if (cdb_grow((void **)&k, &cap, n + 1, sizeof *k)) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        k[n].abspath = cdb_strdup(a);
        if (!k[n].abspath) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        snprintf(k[n].sha, sizeof k[n].sha, "%s", h ? h : "");
        k[n].id = sqlite3_column_int64(st, 2);
        n++;
    }
    if (n > 0) qsort(k, n, sizeof *k, cmp_known);
cleanup:
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) {
        while (n > 0) free(k[--n].abspath);
        free(k);
        k = NULL;
    }
    *out = k;
    *n_out = n;
    return rc;
}

/* ---- the decode pool ------------------------------------------------------ */

enum { SLOT_EMPTY, SLOT_DECODED, SLOT_UNCHANGED, SLOT_FAILED };

typedef struct slot {
    int state;
    int64_t size;
    int64_t known_id;   /* stored item with this path, or -1 */
    char sha[65];
    float *pixels;      /* 3 x S x S */
    char msg[2 * CDB_ERRMSG_MAX];
} slot;

typedef struct pool {
    pthread_mutex_t mu;
    pthread_cond_t ready, space;
    const char *root;
    file_list *files;
    char **abspaths;    /* files->n */
    const known *k;
    size_t n_known;
    slot *slots;
    size_t window;      /* number of slots */
    size_t next;        /* next file index to claim */
    size_t consumed;    /* files released by the consumer */
    int stop;
    clipdb_model *model;
    unsigned long long max_image_pixels; /* the handle's (clipdb_db_options) */
} pool;

static const known *find_known(const pool *p, const char *abspath)
{
    known key;
    key.abspath = (char *)abspath;
    return p->n_known ? bsearch(&key, p->k, p->n_known, sizeof *p->k, cmp_known) : NULL;
}

/* Reads, hashes and (unless unchanged) decodes file i into s's buffers and
** returns the slot's new state (SLOT_*); the caller publishes that state
** under the pool's mutex, so the consumer sees the pixels with it. */
static int decode_one(pool *p, clipdb_ctx *ctx, size_t i, slot *s)
{
    int state = SLOT_FAILED;
    char *path = cdb_path_join(p->root, p->files->rel[i]);
    char *data = NULL;
    size_t len = 0;
    cdb_err e;
    const known *k;

    cdb_err_clear(&e);
    s->known_id = -1;
    if (!path) {
        snprintf(s->msg, sizeof s->msg, "%s: out of memory", p->files->rel[i]);
        return SLOT_FAILED;
    }
    if (cdb_read_file(path, CLIPDB_MAX_IMAGE_FILE_BYTES, &data, &len, &e) != CLIPDB_OK) {
        snprintf(s->msg, sizeof s->msg, "%s", e.msg);
        goto cleanup;
    }
    s->size = (int64_t)len;
    if (cdb_sha256_hex(data, len, s->sha, &e) != CLIPDB_OK) {
        snprintf(s->msg, sizeof s->msg, "%s: %s", path, e.msg);
        goto cleanup;
    }
    k = find_known(p, p->abspaths[i]);
    if (k) {
        s->known_id = k->id;
        if (!strcmp(k->sha, s->sha)) {
            state = SLOT_UNCHANGED;
            goto cleanup;
        }
    }
    if (clipdb_image_load_memory(ctx, data, len, s->pixels) != CLIPDB_OK) {
        snprintf(s->msg, sizeof s->msg, "%s: %s", path, clipdb_ctx_errmsg(ctx));
        goto cleanup;
    }
    state = SLOT_DECODED;
cleanup:
    free(data);
    free(path);
    return state;
}

static void *decode_main(void *arg)
{
    pool *p = arg;
    clipdb_ctx *ctx = NULL;
    int ctx_rc = clipdb_ctx_new(&ctx, p->model);
    if (ctx_rc == CLIPDB_OK) clipdb_ctx_set_max_image_pixels(ctx, p->max_image_pixels);
    for (;;) {
        size_t i;
        slot *s;
        int state;
        pthread_mutex_lock(&p->mu);
        while (!p->stop && p->next < p->files->n && p->next >= p->consumed + p->window)
            pthread_cond_wait(&p->space, &p->mu);
        if (p->stop || p->next >= p->files->n) {
            pthread_mutex_unlock(&p->mu);
            break;
        }
        i = p->next++;
        pthread_mutex_unlock(&p->mu);
        s = &p->slots[i % p->window];
        if (ctx_rc != CLIPDB_OK) {
            state = SLOT_FAILED;
            snprintf(s->msg, sizeof s->msg, "%s: %s", p->files->rel[i], clipdb_ctx_errmsg(ctx));
        } else {
            state = decode_one(p, ctx, i, s);
        }
        /* published under the lock: the consumer reads state, then the
        ** slot's pixels and fields, under the same lock */
        pthread_mutex_lock(&p->mu);
        s->state = state;
        pthread_cond_broadcast(&p->ready);
        pthread_mutex_unlock(&p->mu);
    }
    clipdb_ctx_free(ctx);
    return NULL;
}

/* ---- batches ---------------------------------------------------------------- */

/* One image of a batch (new, changed, or unchanged with new captions). */
typedef struct batch_img {
    size_t file;          /* index in the file list */
    int64_t id;           /* stored id when known, else -1 */
    int encode;           /* 1: pixels in the batch buffer, row `row` */
    int update;           /* 1: a stored path whose content changed */
    int row;
    int64_t size;
    char sha[65];
    cdb_caption_entry *cap;
    size_t cap_first, cap_count; /* its new captions in the batch text list */
    size_t cap_dups;             /* of those, found stored under the write lock */
    int gone;            /* another process added it or deleted it meanwhile */
} batch_img;

typedef struct ingest {
    clipdb_db *db;
    const clipdb_add_options *opt;
    clipdb_add_result *res;
    clipdb_model *model;
    int d;
    size_t img_floats;
    int batch;
    float *pixels;        /* batch x img_floats */
    float *img_vecs;      /* batch x d */
    batch_img *imgs;      /* batch */
    int n_imgs, n_encode;
    const char **texts;   /* new caption texts of the batch */
    size_t n_texts, cap_texts;
    float *text_vecs;     /* cap_texts x d */
    file_list *files;
    char **abspaths;
    const char *root;
    int32_t tok_ids[CLIPDB_TEXT_CONTEXT]; /* scratch of the caption check */
    clipdb_add_progress prog;
    double t0, last_report;
} ingest;

static void report(ingest *g, int force)
{
    double now = cdb_now();
    if (!g->opt->on_progress) return;
    if (!force && now - g->last_report < g->opt->progress_interval_s) return;
    g->last_report = now;
    g->prog.elapsed_s = now - g->t0;
    g->opt->on_progress(g->opt->arg, &g->prog);
}

static void warn(ingest *g, const char *msg)
{
    if (g->opt->on_warning) g->opt->on_warning(g->opt->arg, msg);
}

static int cmp_alias(const void *a, const void *b, void *arg)
{
    char *const *abs = arg;
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    int c = strcmp(abs[x], abs[y]);
    return c ? c : (x > y) - (x < y);
}

/* Keeps the first of the files that are one file under several names (a
** symlink to an image in the folder): each is reported and skipped, so the
** path stored for the file is unique. */
static int drop_aliases(ingest *g, file_list *files)
{
    size_t *order = NULL, i, j, keep;
    if (files->n < 2) return CLIPDB_OK;
    order = cdb_malloc_array(files->n, sizeof *order);
    if (!order) return cdb_err_set(&g->db->err, CLIPDB_ENOMEM, "out of memory");
    for (i = 0; i < files->n; i++) order[i] = i;
    qsort_r(order, files->n, sizeof *order, cmp_alias, g->abspaths);
    for (keep = order[0], i = 1; i < files->n; i++) {
        if (strcmp(g->abspaths[order[i]], g->abspaths[keep]) != 0) {
            keep = order[i];
            continue;
        }
        if (g->opt->on_warning) {
            char msg[CDB_ERRMSG_MAX];
            snprintf(msg, sizeof msg, "%s/%s: the same file as %s/%s; added once", g->root,
                     files->rel[order[i]], g->root, files->rel[keep]);
            g->opt->on_warning(g->opt->arg, msg);
        }
        free(files->rel[order[i]]);
        files->rel[order[i]] = NULL;
        free(g->abspaths[order[i]]);
        g->abspaths[order[i]] = NULL;
    }
    free(order);
    for (i = j = 0; i < files->n; i++) {
        if (!files->rel[i]) continue;
        files->rel[j] = files->rel[i];
        g->abspaths[j] = g->abspaths[i];
        j++;
    }
    files->n = j;
    return CLIPDB_OK;
}

/* *exists = 1 when image id already has a caption with this exact text. */
static int caption_exists(clipdb_db *db, int64_t image, const char *text, int *exists)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, "SELECT 1 FROM items WHERE text = ? AND image = ?", &st);
    *exists = 0;
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, text, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, image);
    *exists = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return CLIPDB_OK;
}

static int push_text(ingest *g, const char *t)
{
    size_t cap = g->cap_texts;
    if (g->n_texts == g->cap_texts) {
        /* the vectors' buffer follows the texts' capacity; its old rows
        ** are not needed (texts are encoded when the batch is flushed) */
        float *v;
        if (cdb_grow((void **)&g->texts, &cap, g->n_texts + 1, sizeof *g->texts) ||
            !(v = cdb_malloc_array(cap, (size_t)g->d * sizeof(float))))
            return cdb_err_set(&g->db->err, CLIPDB_ENOMEM, "out of memory");
        free(g->text_vecs);
        g->text_vecs = v;
        g->cap_texts = cap;
    }
    g->texts[g->n_texts++] = t;
    return CLIPDB_OK;
}

/* Queues the captions of b->cap that are not stored yet for b->id. */
static int queue_captions(ingest *g, batch_img *b)
{
    size_t i, j;
    int rc = CLIPDB_OK, exists, n_ids;
    b->cap_first = g->n_texts;
    b->cap_count = 0;
    if (!b->cap) return CLIPDB_OK;
    for (i = 0; i < b->cap->n_captions; i++) {
        const char *t = b->cap->captions[i];
        exists = 0;
        for (j = 0; j < i && !exists; j++) exists = !strcmp(b->cap->captions[j], t);
        if (!exists && b->id >= 0 && (rc = caption_exists(g->db, b->id, t, &exists)) != CLIPDB_OK)
            return rc;
        if (exists) {
            g->res->captions_duplicate++;
            continue;
        }
        /* a caption the encoder would refuse (empty after cleaning, ...) is
        ** reported with its line and image and skipped, as a bad --texts line */
        if (clipdb_tokenize(g->db->ctx, t, g->tok_ids, CLIPDB_TEXT_CONTEXT, &n_ids) != CLIPDB_OK) {
            char msg[CDB_ERRMSG_MAX];
            snprintf(msg, sizeof msg, "%s:%zu: caption of %s: %s", g->opt->captions_path,
                     b->cap->lines[i], b->cap->image, clipdb_ctx_errmsg(g->db->ctx));
            warn(g, msg);
            g->res->captions_failed++;
            continue;
        }
        if ((rc = push_text(g, t)) != CLIPDB_OK) return rc;
        b->cap_count++;
    }
    return CLIPDB_OK;
}

/* texts (n) -> the one batched encoder (it groups them itself) -> out (n, d);
** the encoder's status code is kept. */
static int encode_texts(ingest *g, const char *const *texts, size_t n, float *out)
{
    int rc;
    if (n == 0) return CLIPDB_OK;
    if (n > INT32_MAX) return cdb_err_set(&g->db->err, CLIPDB_ELIMIT, "too many texts in a batch");
    rc = clipdb_encode_batch(g->db->ctx, CLIPDB_INPUT_TEXT, texts, (int)n, out, NULL, NULL);
    if (rc != CLIPDB_OK)
        cdb_err_set(&g->db->err, rc, "encoding texts: %s", clipdb_ctx_errmsg(g->db->ctx));
    return rc;
}

/* Inside the write transaction of a batch: b->gone = 1 (reported, and
** counted as unchanged) when another process stored the same file since
** the pool looked, or deleted the image whose captions or new content this
** batch holds. */
static int recheck_image(ingest *g, batch_img *b)
{
    sqlite3_stmt *st = NULL;
    int rc, found;
    int by_path = b->encode && !b->update;
    char msg[CDB_ERRMSG_MAX];
    if (!by_path && b->id < 0) return CLIPDB_OK;
    rc = cdb_db_prepare(g->db,
                        by_path ? "SELECT 1 FROM items WHERE abspath = ?1 AND type = ?2"
                                : "SELECT 1 FROM items WHERE id = ?1 AND type = ?2",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    if (by_path) sqlite3_bind_text(st, 1, g->abspaths[b->file], -1, SQLITE_STATIC);
    else sqlite3_bind_int64(st, 1, b->id);
    sqlite3_bind_int(st, 2, CLIPDB_ITEM_IMAGE);
    found = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    if (by_path == found) {
        b->gone = 1;
        snprintf(msg, sizeof msg, "%s/%s: %s by another process meanwhile; left as it is",
                 g->root, g->files->rel[b->file], by_path ? "added" : "deleted");
        warn(g, msg);
        g->res->images_unchanged++;
    }
    return CLIPDB_OK;
}

/* Encodes the batch and writes it in one transaction. */
static int flush(ingest *g)
{
    int rc = CLIPDB_OK, i;
    size_t j;
    int in_tx = 0;

    if (g->n_imgs == 0) return CLIPDB_OK;
    for (i = 0; i < g->n_imgs; i++)
        if ((rc = queue_captions(g, &g->imgs[i])) != CLIPDB_OK) goto cleanup;
    // pixels (n_encode, 3, S, S) -> the batched encoder's image groups -> img_vecs (n_encode, d)
    /* images are decoded (and hashed, to skip unchanged files) by the pool
    ** above, so the encoder gets pixels here, not files */
    if (g->n_encode > 0 &&
        (rc = clipdb_encode_images(g->db->ctx, g->pixels, g->n_encode, g->img_vecs)) !=
            CLIPDB_OK) {
        cdb_err_set(&g->db->err, rc, "encoding images: %s", clipdb_ctx_errmsg(g->db->ctx));
        goto cleanup;
    }
    // texts (n_texts) -> text tower -> text_vecs (n_texts, d)
    if ((rc = encode_texts(g, g->texts, g->n_texts, g->text_vecs)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_begin(g->db)) != CLIPDB_OK) goto cleanup;
    in_tx = 1;
    for (i = 0; i < g->n_imgs; i++) {
        batch_img *b = &g->imgs[i];
        const float *v = g->img_vecs + (size_t)b->row * (size_t)g->d;
        /* checked again under the write lock: another process may have
        ** added this file, or deleted the image these captions belong to */
        b->gone = 0;
        if ((rc = recheck_image(g, b)) != CLIPDB_OK) goto cleanup;
        if (b->gone) continue;
        if (b->update) {
            rc = cdb_db_update_image(g->db, b->id, b->size, b->sha, v);
        } else if (b->encode) {
            char *path = cdb_path_join(g->root, g->files->rel[b->file]);
            if (!path) {
                rc = cdb_err_set(&g->db->err, CLIPDB_ENOMEM, "out of memory");
                goto cleanup;
            }
            rc = cdb_db_insert_image(g->db, path, g->abspaths[b->file], b->size, b->sha, v, &b->id);
            free(path);
        }
        if (rc != CLIPDB_OK) goto cleanup;
        if (b->encode && b->cap && b->cap->meta_json &&
            (rc = cdb_db_set_meta_json(g->db, b->id, b->cap->meta_json)) != CLIPDB_OK)
            goto cleanup;
        b->cap_dups = 0;
        for (j = 0; j < b->cap_count; j++) {
            int64_t tid;
            size_t t = b->cap_first + j;
            int dup = 0;
            /* checked again under the write lock: another process adding the
            ** same captions file may have stored it since queue_captions */
            if (!b->encode || b->update) {
                if ((rc = caption_exists(g->db, b->id, g->texts[t], &dup)) != CLIPDB_OK)
                    goto cleanup;
                if (dup) {
                    b->cap_dups++;
                    continue;
                }
            }
            rc = cdb_db_insert_text(g->db, g->texts[t], b->id, g->text_vecs + t * (size_t)g->d,
                                    &tid);
            if (rc == CLIPDB_OK && b->cap->meta_json)
                rc = cdb_db_set_meta_json(g->db, tid, b->cap->meta_json);
            if (rc != CLIPDB_OK) goto cleanup;
        }
    }
    rc = cdb_db_commit(g->db);
    in_tx = 0;
    if (rc != CLIPDB_OK) goto cleanup;
    for (i = 0; i < g->n_imgs; i++) {
        batch_img *b = &g->imgs[i];
        if (b->gone) continue;
        if (b->encode && b->update) g->res->images_updated++;
        else if (b->encode) g->res->images_added++;
        if (b->encode) g->res->last_id = b->id;
        g->res->captions_added += (int64_t)(b->cap_count - b->cap_dups);
        g->res->captions_duplicate += (int64_t)b->cap_dups;
    }
cleanup:
    if (in_tx) cdb_db_rollback(g->db);
    g->n_imgs = g->n_encode = 0;
    g->n_texts = 0;
    return rc;
}

static int add_images(ingest *g, cdb_captions *caps)
{
    clipdb_db *db = g->db;
    file_list files = {0};
    walk_ctx wc = {0};
    known *k = NULL;
    size_t n_known = 0, i;
    pool p;
    pthread_t *threads = NULL;
    int n_threads = 0, started = 0, rc, t, pool_init = 0;

    memset(&p, 0, sizeof p);
    g->files = &files;
    g->root = g->opt->images_dir;
    wc.root = g->root;
    wc.l = &files;
    wc.opt = g->opt;
    rc = walk(&wc, "", 0, &db->err);
    free(wc.seen);
    g->res->images_failed += wc.failed;
    g->prog.failed += wc.failed;
    if (rc != CLIPDB_OK) goto cleanup;
    g->abspaths = cdb_calloc_array(files.n, sizeof *g->abspaths);
    if (!g->abspaths) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < files.n; i++) {
        char *path = cdb_path_join(g->root, files.rel[i]);
        g->abspaths[i] = path ? realpath(path, NULL) : NULL;
        if (!g->abspaths[i]) g->abspaths[i] = path ? cdb_strdup(path) : NULL;
        free(path);
        if (!g->abspaths[i]) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    if ((rc = drop_aliases(g, &files)) != CLIPDB_OK) goto cleanup;
    if ((rc = load_known(db, &k, &n_known)) != CLIPDB_OK) goto cleanup;

    n_threads = g->opt->decode_threads > 0 ? g->opt->decode_threads
                                           : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > CLIPDB_ADD_MAX_DECODE_THREADS) n_threads = CLIPDB_ADD_MAX_DECODE_THREADS;
    p.root = g->root;
    p.files = &files;
    p.abspaths = g->abspaths;
    p.k = k;
    p.n_known = n_known;
    p.model = g->model;
    p.max_image_pixels = db->max_image_pixels;
    p.window = (size_t)(2 * g->batch > 4 * n_threads ? 2 * g->batch : 4 * n_threads);
    p.slots = cdb_calloc_array(p.window, sizeof *p.slots);
    threads = cdb_calloc_array((size_t)n_threads, sizeof *threads);
    if (!p.slots || !threads) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < p.window; i++) {
        p.slots[i].pixels = cdb_malloc_array(g->img_floats, sizeof(float));
        if (!p.slots[i].pixels) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.ready, NULL);
    pthread_cond_init(&p.space, NULL);
    pool_init = 1;
    for (t = 0; t < n_threads; t++) {
        if (pthread_create(&threads[t], NULL, decode_main, &p) != 0) break;
        started++;
    }
    if (started == 0) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "cannot start decode threads");
        goto cleanup;
    }

    g->prog.phase = "images";
    g->prog.total = (int64_t)files.n;
    for (i = 0; i < files.n; i++) {
        slot *s = &p.slots[i % p.window];
        cdb_caption_entry *ce = caps ? cdb_captions_find(caps, files.rel[i]) : NULL;
        batch_img *b;
        pthread_mutex_lock(&p.mu);
        while (s->state == SLOT_EMPTY) pthread_cond_wait(&p.ready, &p.mu);
        pthread_mutex_unlock(&p.mu);
        if (ce) ce->used = 1;
        if (s->state == SLOT_FAILED) {
            warn(g, s->msg);
            g->res->images_failed++;
            g->prog.failed++;
        } else if (s->state == SLOT_UNCHANGED && !ce) {
            g->res->images_unchanged++;
            g->prog.skipped++;
        } else {
            b = &g->imgs[g->n_imgs++];
            memset(b, 0, sizeof *b);
            b->file = i;
            b->id = s->known_id;
            b->cap = ce;
            b->size = s->size;
            memcpy(b->sha, s->sha, sizeof b->sha);
            if (s->state == SLOT_DECODED) {
                b->encode = 1;
                b->update = s->known_id >= 0;
                b->row = g->n_encode++;
                memcpy(g->pixels + (size_t)b->row * g->img_floats, s->pixels,
                       g->img_floats * sizeof(float));
                g->prog.added++;
            } else {
                g->res->images_unchanged++; /* only its captions may be new */
                g->prog.skipped++;
            }
        }
        /* release the slot to the decoders */
        pthread_mutex_lock(&p.mu);
        s->state = SLOT_EMPTY;
        p.consumed = i + 1;
        pthread_cond_broadcast(&p.space);
        pthread_mutex_unlock(&p.mu);
        if (g->n_imgs == g->batch || i + 1 == files.n) {
            if ((rc = flush(g)) != CLIPDB_OK) goto cleanup;
        }
        g->prog.done = (int64_t)i + 1;
        report(g, 0);
    }
    if (caps)
        for (i = 0; i < caps->n; i++)
            if (!caps->e[i].used) g->res->captions_unmatched++;
cleanup:
    if (pool_init) {
        pthread_mutex_lock(&p.mu);
        p.stop = 1;
        pthread_cond_broadcast(&p.space);
        pthread_mutex_unlock(&p.mu);
        for (t = 0; t < started; t++) pthread_join(threads[t], NULL);
        pthread_mutex_destroy(&p.mu);
        pthread_cond_destroy(&p.ready);
        pthread_cond_destroy(&p.space);
    }
    for (i = 0; p.slots && i < p.window; i++) free(p.slots[i].pixels);
    free(p.slots);
    free(threads);
    for (i = 0; i < n_known; i++) free(k[i].abspath);
    free(k);
    for (i = 0; i < files.n; i++) {
        free(files.rel[i]);
        if (g->abspaths) free(g->abspaths[i]);
    }
    free(files.rel);
    free(g->abspaths);
    g->abspaths = NULL;
    g->files = NULL;
    return rc;
}

/* Standalone texts: one per non-empty line; texts already stored as
** standalone texts are skipped. */
static int add_texts(ingest *g)
{
    clipdb_db *db = g->db;
    char *data = NULL;
    size_t len = 0, pos = 0, lineno = 0, n_lines = 0, i;
    const char **batch = NULL;
    float *vecs = NULL;   /* TEXTS_PER_COMMIT x d */
    int64_t last = -1;
    sqlite3_stmt *exists = NULL;
    int32_t ids[CLIPDB_TEXT_CONTEXT];
    int rc, in_tx = 0, n_ids = 0, added = 0, dup_now = 0;

    rc = cdb_read_file(g->opt->texts_path, (size_t)1 << 30, &data, &len, &db->err);
    if (rc != CLIPDB_OK) return rc;
    for (i = 0; i < len; i++) n_lines += data[i] == '\n';
    g->prog.phase = "texts";
    g->prog.total = (int64_t)n_lines + 1;
    g->prog.done = g->prog.added = g->prog.skipped = g->prog.failed = 0;
    batch = cdb_calloc_array(TEXTS_PER_COMMIT, sizeof *batch);
    vecs = cdb_malloc_array(TEXTS_PER_COMMIT, (size_t)g->d * sizeof(float));
    if (!batch || !vecs) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    rc = cdb_db_prepare(db, "SELECT 1 FROM items WHERE text = ?1 AND type = ?2 AND image IS NULL",
                        &exists);
    if (rc != CLIPDB_OK) goto cleanup;
    while (pos < len) {
        int n = 0, j;
        /* gather up to TEXTS_PER_COMMIT new lines */
        while (pos < len && n < TEXTS_PER_COMMIT) {
            char *line = data + pos, *nl = memchr(line, '\n', len - pos);
            size_t m = nl ? (size_t)(nl - line) : len - pos;
            int dup = 0;
            pos += m + 1;
            lineno++;
            g->prog.done++;
            if (m > 0 && line[m - 1] == '\r') m--;
            line[m] = '\0';
            if (m == 0) continue;
            /* a line the encoder would refuse (too long, a NUL byte,
            ** invalid UTF-8, nothing left after cleaning) is reported and
            ** skipped; the tokenizer applies the encoder's own policy */
            if (m > CLIPDB_MAX_TEXT_BYTES || strlen(line) != m ||
                clipdb_tokenize(db->ctx, line, ids, CLIPDB_TEXT_CONTEXT, &n_ids) != CLIPDB_OK) {
                char msg[512];
                snprintf(msg, sizeof msg, "%s:%zu: %s; skipped", g->opt->texts_path, lineno,
                         m > CLIPDB_MAX_TEXT_BYTES ? "text too long"
                         : strlen(line) != m      ? "text holds a NUL byte"
                                                  : clipdb_ctx_errmsg(db->ctx));
                warn(g, msg);
                g->prog.failed++;
                g->res->texts_failed++;
                continue;
            }
            sqlite3_reset(exists);
            sqlite3_bind_text(exists, 1, line, -1, SQLITE_STATIC);
            sqlite3_bind_int(exists, 2, CLIPDB_ITEM_TEXT);
            dup = sqlite3_step(exists) == SQLITE_ROW;
            for (j = 0; j < n && !dup; j++) dup = !strcmp(batch[j], line);
            sqlite3_reset(exists);
            if (dup) {
                g->res->texts_unchanged++;
                g->prog.skipped++;
                continue;
            }
            batch[n++] = line;
        }
        if (n == 0) continue;
        // batch (n texts) -> text tower -> text_vecs (n, d)
        if ((rc = encode_texts(g, batch, (size_t)n, vecs)) != CLIPDB_OK) goto cleanup;
        if ((rc = cdb_db_begin(db)) != CLIPDB_OK) goto cleanup;
        in_tx = 1;
        added = 0;
        for (j = 0; j < n; j++) {
            int64_t id;
            /* checked again under the write lock: another process may have
            ** added the same text since the check above */
            sqlite3_reset(exists);
            sqlite3_bind_text(exists, 1, batch[j], -1, SQLITE_STATIC);
            sqlite3_bind_int(exists, 2, CLIPDB_ITEM_TEXT);
            dup_now = sqlite3_step(exists) == SQLITE_ROW;
            sqlite3_reset(exists);
            if (dup_now) {
                g->res->texts_unchanged++;
                continue;
            }
            rc = cdb_db_insert_text(db, batch[j], -1, vecs + (size_t)j * (size_t)g->d, &id);
            if (rc != CLIPDB_OK) goto cleanup;
            last = id;
            added++;
        }
        rc = cdb_db_commit(db);
        in_tx = 0;
        if (rc != CLIPDB_OK) goto cleanup;
        g->res->texts_added += added;
        g->res->last_id = last;
        g->prog.added += added;
        report(g, 0);
    }
    g->prog.done = g->prog.total;
cleanup:
    if (in_tx) cdb_db_rollback(db);
    sqlite3_finalize(exists);
    free(batch);
    free(vecs);
    free(data);
    return rc;
}

int clipdb_db_add(clipdb_db *db, const clipdb_add_options *opt, clipdb_add_result *res)
{
    clipdb_add_options def;
    clipdb_add_result tmp;
    cdb_captions *caps = NULL;
    ingest g;
    int rc;

    memset(&g, 0, sizeof g);
    if (!opt) {
        clipdb_add_options_init(&def);
        opt = &def;
    }
    if (!res) res = &tmp;
    memset(res, 0, sizeof *res);
    res->last_id = -1;
    cdb_err_clear(&db->err);
    if (db->readonly) return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: opened read-only", db->path);
    if (!opt->images_dir && !opt->texts_path)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "nothing to add: give images or texts");
    if (opt->captions_path && !opt->images_dir)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "captions need an images folder");
    /* Parse captions first: a malformed file fails before anything is added. */
    if (opt->captions_path &&
        (rc = cdb_captions_load(opt->captions_path, &caps, &db->err)) != CLIPDB_OK)
        goto cleanup;
    if ((rc = clipdb_db_model(db, &g.model)) != CLIPDB_OK) goto cleanup;
    g.db = db;
    g.opt = opt;
    g.res = res;
    g.d = db->embed_dim;
    g.img_floats = clipdb_image_floats(g.model);
    g.batch = opt->batch_size > 0 ? opt->batch_size : CLIPDB_ADD_BATCH_DEFAULT;
    if (g.batch > CLIPDB_ADD_MAX_BATCH) g.batch = CLIPDB_ADD_MAX_BATCH;
    g.t0 = g.last_report = cdb_now();
    if (opt->images_dir) {
        g.pixels = cdb_malloc_array((size_t)g.batch, g.img_floats * sizeof(float));
        g.img_vecs = cdb_malloc_array((size_t)g.batch, (size_t)g.d * sizeof(float));
        g.imgs = cdb_calloc_array((size_t)g.batch, sizeof *g.imgs);
        if (!g.pixels || !g.img_vecs || !g.imgs) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        if ((rc = add_images(&g, caps)) != CLIPDB_OK) goto cleanup;
        report(&g, 1);
    }
    if (opt->texts_path) {
        if ((rc = add_texts(&g)) != CLIPDB_OK) goto cleanup;
        report(&g, 1);
    }
cleanup:
    cdb_captions_free(caps);
    free(g.pixels);
    free(g.img_vecs);
    free(g.imgs);
    free(g.texts);
    free(g.text_vecs);
    return rc;
}
