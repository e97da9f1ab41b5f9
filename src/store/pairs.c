/*
** pairs.c: the image-caption pairs of a database, for training (clipdb
** finetune). A pair set lists the images of one split (item_meta key
** "split") that have at least one caption (text items whose `image` is the
** image's id), each with its captions in id order. Read-only; one query.
*/
#include <stdlib.h>
#include <string.h>

#include "store/store.h"

void cdb_pairs_free(cdb_pairs *p)
{
    size_t i, j;
    if (!p) return;
    for (i = 0; i < p->n; i++) {
        free(p->img[i].path);
        for (j = 0; j < p->img[i].n_captions; j++) free(p->img[i].captions[j]);
        free(p->img[i].captions);
    }
    free(p->img);
    free(p);
}

static int add_caption(cdb_pair_image *im, const char *text)
{
    char *s;
    if (cdb_grow((void **)&im->captions, &im->cap_captions, im->n_captions + 1,
                 sizeof *im->captions))
        return -1;
    if (!(s = cdb_strdup(text))) return -1;
    im->captions[im->n_captions++] = s;
    return 0;
}

/* The item types of the queries below (:image, :text), bound rather than
** written into the SQL. */
static void bind_types(sqlite3_stmt *st)
{
    sqlite3_bind_int(st, sqlite3_bind_parameter_index(st, ":image"), CLIPDB_ITEM_IMAGE);
    sqlite3_bind_int(st, sqlite3_bind_parameter_index(st, ":text"), CLIPDB_ITEM_TEXT);
}

int cdb_db_pairs(clipdb_db *db, const char *split, cdb_pairs **out)
{
    /* Images (filtered by split unless split is NULL) joined with their
    ** captions, ordered by image id then caption id: one pass builds the set. */
    static const char *const q_all =
        "SELECT i.id, COALESCE(i.abspath, i.path), t.text FROM items i"
        " JOIN items t ON t.image = i.id AND t.type = :text"
        " WHERE i.type = :image ORDER BY i.id, t.id";
    static const char *const q_split =
        "SELECT i.id, COALESCE(i.abspath, i.path), t.text FROM items i"
        " JOIN item_meta s ON s.item = i.id AND s.key = 'split' AND s.value = ?1"
        " JOIN items t ON t.image = i.id AND t.type = :text"
        " WHERE i.type = :image ORDER BY i.id, t.id";
    sqlite3_stmt *st = NULL;
    cdb_pairs *p = NULL;
    size_t cap = 0;
    int rc = CLIPDB_OK, s;

    *out = NULL;
    if ((rc = cdb_db_prepare(db, split ? q_split : q_all, &st))) return rc;
    if (split) sqlite3_bind_text(st, 1, split, -1, SQLITE_TRANSIENT);
    bind_types(st);
    if (!(p = calloc(1, sizeof *p))) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(st, 0);
        const char *path = (const char *)sqlite3_column_text(st, 1);
        const char *text = (const char *)sqlite3_column_text(st, 2);
        cdb_pair_image *im;
        if (!path || !text) continue;
        if (!p->n || p->img[p->n - 1].id != id) {
            if (cdb_grow((void **)&p->img, &cap, p->n + 1, sizeof *p->img)) goto oom;
            im = &p->img[p->n++];
            memset(im, 0, sizeof *im);
            im->id = id;
            if (!(im->path = cdb_strdup(path))) goto oom;
        }
        im = &p->img[p->n - 1];
        if (add_caption(im, text)) goto oom;
        p->n_captions++;
    }
    if (s != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading image-caption pairs");
        goto cleanup;
    }
    *out = p;
    p = NULL;
    goto cleanup;
oom:
    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory reading image-caption pairs");
cleanup:
    sqlite3_finalize(st);
    cdb_pairs_free(p);
    return rc;
}

int cdb_db_split_counts(clipdb_db *db, char **out)
{
    /* "name (N images with captions), ..." for the error of an empty split. */
    static const char *const q =
        "SELECT s.value, COUNT(DISTINCT i.id) FROM items i"
        " JOIN item_meta s ON s.item = i.id AND s.key = 'split'"
        " WHERE i.type = :image"
        " AND EXISTS (SELECT 1 FROM items t WHERE t.image = i.id AND t.type = :text)"
        " GROUP BY s.value ORDER BY s.value LIMIT 20";
    sqlite3_stmt *st = NULL;
    char *acc = cdb_strdup(""), *next;
    int rc, s;
    *out = NULL;
    if (!acc) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    if ((rc = cdb_db_prepare(db, q, &st))) {
        free(acc);
        return rc;
    }
    bind_types(st);
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        next = cdb_sprintf("%s%s'%s' (%lld)", acc, *acc ? ", " : "", name ? name : "",
                           (long long)sqlite3_column_int64(st, 1));
        free(acc);
        if (!(acc = next)) {
            sqlite3_finalize(st);
            return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        }
    }
    sqlite3_finalize(st);
    if (s != SQLITE_DONE) {
        free(acc);
        return cdb_db_sqlerr(db, "reading splits");
    }
    *out = acc;
    return CLIPDB_OK;
}
