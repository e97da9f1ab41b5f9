/*
** export.c: what an evaluation reads from the database: the images and
** captions of a split (the ground truth) and the vectors of a vector set.
** Additive to db.c/search.c: it only reads.
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "store/store.h"

#define EXPORT_MAX_WHERE 64

int cdb_db_set_shape(clipdb_db *db, const char *set, int *dim, const char **model)
{
    cdb_vset *v;
    int rc;
    if (set && !strcmp(set, CLIPDB_VECTOR_SET_BASE)) {
        *dim = db->embed_dim;
        *model = db->identity;
        return CLIPDB_OK;
    }
    if ((rc = cdb_vset_find(db, set, &v)) != CLIPDB_OK) return rc;
    *dim = v->dim;
    *model = v->identity;
    return CLIPDB_OK;
}

void cdb_split_free(cdb_split *s)
{
    size_t i;
    if (!s) return;
    for (i = 0; s->image_paths && i < s->n_images; i++) free(s->image_paths[i]);
    for (i = 0; s->caption_texts && i < s->n_captions; i++) free(s->caption_texts[i]);
    free(s->image_paths);
    free(s->caption_texts);
    free(s->image_ids);
    free(s->caption_ids);
    free(s->caption_image);
    free(s);
}

/* "SELECT item FROM item_meta WHERE key=? AND (value=? OR value=?)" once per
** filter, joined with INTERSECT: the items matching every filter. The value
** also matches as a number (image_id=139), as search's --where does. */
static int bind_filters(clipdb_db *db, const char *const *where, int n_where, sqlite3_stmt *st,
                        int first_param)
{
    int w;
    for (w = 0; w < n_where; w++) {
        const char *cond = where[w], *eq = cond ? strchr(cond, '=') : NULL, *v;
        char *end;
        long long iv;
        double dv;
        int p = first_param + 3 * w;
        if (!eq || eq == cond)
            return cdb_err_set(&db->err, CLIPDB_EINVAL, "bad filter '%s' (expected FIELD=VALUE)",
                               cond ? cond : "");
        v = eq + 1;
        sqlite3_bind_text(st, p, cond, (int)(eq - cond), SQLITE_STATIC);
        sqlite3_bind_text(st, p + 1, v, -1, SQLITE_STATIC);
        errno = 0;
        iv = strtoll(v, &end, 10);
        if (*v && !errno && *end == '\0') sqlite3_bind_int64(st, p + 2, iv);
        else if (*v && (dv = strtod(v, &end), *end == '\0')) sqlite3_bind_double(st, p + 2, dv);
        else sqlite3_bind_text(st, p + 2, v, -1, SQLITE_STATIC);
    }
    return CLIPDB_OK;
}

/* "SELECT item ... INTERSECT SELECT item ..." over the n_where filters
** (parameters 1 .. 3 n_where), or "" without filters. Caller frees. */
static char *filter_sql(int n_where)
{
    char *sql = cdb_strdup(""), *next;
    int w;
    for (w = 0; sql && w < n_where; w++) {
        next = cdb_sprintf("%s%sSELECT item FROM item_meta WHERE key = ?%d AND "
                           "(value = ?%d OR value = ?%d)",
                           sql, w ? " INTERSECT " : "", 3 * w + 1, 3 * w + 2, 3 * w + 3);
        free(sql);
        sql = next;
    }
    return sql;
}

/* The first position of a (n, ascending) holding a value >= x. */
static size_t lower_bound(const int64_t *a, size_t n, int64_t x)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int in_sorted(const int64_t *a, size_t n, int64_t x)
{
    size_t i = lower_bound(a, n, x);
    return i < n && a[i] == x;
}

int cdb_db_split(clipdb_db *db, const char *const *where, int n_where, cdb_split **out)
{
    cdb_split *s = NULL;
    sqlite3_stmt *st = NULL;
    char *sql = NULL, *filt = NULL;
    size_t cap_i = 0, cap_c = 0, cap_ci = 0, cap_p = 0, cap_t = 0;
    int rc = CLIPDB_OK, step;

    *out = NULL;
    if (n_where < 0 || n_where > EXPORT_MAX_WHERE || (n_where > 0 && !where))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "at most %d filters", EXPORT_MAX_WHERE);
    s = calloc(1, sizeof *s);
    if (!s) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");

    /* the images of the split */
    if (!(filt = filter_sql(n_where))) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    sql = cdb_sprintf("SELECT id, coalesce(abspath, path, '') FROM items WHERE type = %d%s%s%s "
                      "ORDER BY id",
                      CLIPDB_ITEM_IMAGE, n_where ? " AND id IN (" : "", filt, n_where ? ")" : "");
    if (!sql) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = cdb_db_prepare(db, sql, &st)) != CLIPDB_OK) goto cleanup;
    if ((rc = bind_filters(db, where, n_where, st, 1)) != CLIPDB_OK) goto cleanup;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        const char *p = (const char *)sqlite3_column_text(st, 1);
        if (cdb_grow((void **)&s->image_ids, &cap_i, s->n_images + 1, sizeof *s->image_ids) ||
            cdb_grow((void **)&s->image_paths, &cap_p, s->n_images + 1, sizeof *s->image_paths)) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        s->image_paths[s->n_images] = cdb_strdup(p ? p : "");
        s->image_ids[s->n_images] = sqlite3_column_int64(st, 0);
        if (!s->image_paths[s->n_images++]) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    if (step != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading the split's images");
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;
    free(sql);

    /* the captions: every text linked to an image of the split (whatever its
    ** own metadata); those matching the filters whose image is outside the
    ** split are counted */
    sql = cdb_sprintf("SELECT id, image, text, %s%s%s FROM items WHERE type = %d AND image IS "
                      "NOT NULL ORDER BY id",
                      n_where ? "id IN (" : "0", filt, n_where ? ")" : "", CLIPDB_ITEM_TEXT);
    if (!sql) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = cdb_db_prepare(db, sql, &st)) != CLIPDB_OK) goto cleanup;
    if ((rc = bind_filters(db, where, n_where, st, 1)) != CLIPDB_OK) goto cleanup;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        const char *t = (const char *)sqlite3_column_text(st, 2);
        int64_t img;
        img = sqlite3_column_int64(st, 1);
        if (!in_sorted(s->image_ids, s->n_images, img)) {
            s->n_captions_outside += sqlite3_column_int(st, 3) != 0;
            continue;
        }
        if (cdb_grow((void **)&s->caption_ids, &cap_c, s->n_captions + 1, sizeof(int64_t)) ||
            cdb_grow((void **)&s->caption_image, &cap_ci, s->n_captions + 1, sizeof(int64_t)) ||
            cdb_grow((void **)&s->caption_texts, &cap_t, s->n_captions + 1, sizeof(char *))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        s->caption_texts[s->n_captions] = cdb_strdup(t ? t : "");
        s->caption_ids[s->n_captions] = sqlite3_column_int64(st, 0);
        s->caption_image[s->n_captions] = img;
        if (!s->caption_texts[s->n_captions++]) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    if (step != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading the split's captions");
        goto cleanup;
    }
    *out = s;
    s = NULL;
cleanup:
    sqlite3_finalize(st);
    free(sql);
    free(filt);
    cdb_split_free(s);
    return rc;
}

int cdb_db_set_vectors(clipdb_db *db, const char *set, int type, const int64_t *ids, size_t n,
                       float *out)
{
    const cdb_vecset *vs = NULL;
    cdb_vset *v = NULL;
    size_t i, d;
    int rc;

    if (set && !strcmp(set, CLIPDB_VECTOR_SET_BASE)) rc = cdb_db_vectors(db, type, &vs);
    else if ((rc = cdb_vset_find(db, set, &v)) == CLIPDB_OK) rc = cdb_vset_vectors(db, v, type, &vs);
    if (rc != CLIPDB_OK) return rc;
    d = (size_t)vs->d;
    for (i = 0; i < n; i++) {
        size_t lo = lower_bound(vs->ids, vs->n, ids[i]);
        if ((lo == vs->n || vs->ids[lo] != ids[i]) && v)
            return cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                               "item %lld has no vector in vector set '%s' (run 'clipdb "
                               "reembed %s --model DIR --as %s' to fill it in)",
                               (long long)ids[i], set, db->path, set);
        if (lo == vs->n || vs->ids[lo] != ids[i])
            return cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "item %lld has no vector",
                               (long long)ids[i]);
        memcpy(out + i * d, vs->vecs + lo * d, d * sizeof *out);
    }
    return CLIPDB_OK;
}
