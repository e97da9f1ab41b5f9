/*
** pairs.c: the image-caption pairs of a database, for training (clipdb
** finetune). A pair set lists the images of one split (item_meta key
** "split") that have at least one caption (text items whose `image` is the
** image's id), each with its captions in id order: the split as an
** evaluation reads it (cdb_db_split), grouped by image. Read-only.
*/
#include <stdlib.h>
#include <string.h>

#include "store/store.h"

void cdb_pairs_free(cdb_pairs *p)
{
    size_t i, j;
    if (!p) return;
    for (i = 0; p->img && i < p->n; i++) {
        free(p->img[i].path);
        for (j = 0; j < p->img[i].n_captions; j++) free(p->img[i].captions[j]);
        free(p->img[i].captions);
    }
    free(p->img);
    free(p);
}

/* The item types of the query below (:image, :text), bound rather than
** written into the SQL. */
static void bind_types(sqlite3_stmt *st)
{
    sqlite3_bind_int(st, sqlite3_bind_parameter_index(st, ":image"), CLIPDB_ITEM_IMAGE);
    sqlite3_bind_int(st, sqlite3_bind_parameter_index(st, ":text"), CLIPDB_ITEM_TEXT);
}

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* The split's images and captions come from the one reader of a split
** (cdb_db_split, export.c, filter "split=NAME"); here they are grouped: the
** images with a path and at least one caption, each with its captions in id
** order. The strings move from the split to the pairs. */
int cdb_db_pairs(clipdb_db *db, const char *split, cdb_pairs **out)
{
    cdb_split *s = NULL;
    cdb_pairs *p = NULL;
    char *cond = NULL;
    const char *where[1];
    size_t *slot = NULL, *count = NULL, i, k;
    int rc = CLIPDB_OK;

    *out = NULL;
    if (split && !(cond = cdb_sprintf("split=%s", split)))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    where[0] = cond;
    if ((rc = cdb_db_split(db, where, split ? 1 : 0, &s)) != CLIPDB_OK) goto cleanup;
    p = calloc(1, sizeof *p);
    count = calloc(s->n_images + 1, sizeof *count);
    slot = cdb_malloc_array(s->n_captions + 1, sizeof *slot);
    if (!p || !count || !slot) goto oom;
    /* each caption's image (by position in the split), and captions per image */
    for (i = 0; i < s->n_captions; i++) {
        const int64_t *im = bsearch(&s->caption_image[i], s->image_ids, s->n_images,
                                    sizeof *s->image_ids, cmp_id);
        slot[i] = im ? (size_t)(im - s->image_ids) : s->n_images;
        count[slot[i]]++;
    }
    for (k = 0; k < s->n_images; k++) p->n += count[k] > 0 && s->image_paths[k][0];
    if (p->n && !(p->img = calloc(p->n, sizeof *p->img))) goto oom;
    /* the images in id order; count[k] becomes the pair index + 1 (0: none) */
    for (k = 0, i = 0; k < s->n_images; k++) {
        cdb_pair_image *im;
        if (!count[k] || !s->image_paths[k][0]) {
            count[k] = 0;
            continue;
        }
        im = &p->img[i];
        im->id = s->image_ids[k];
        im->path = s->image_paths[k];
        s->image_paths[k] = NULL;
        if (!(im->captions = cdb_malloc_array(count[k], sizeof *im->captions))) goto oom;
        im->cap_captions = count[k];
        count[k] = ++i;
    }
    for (i = 0; i < s->n_captions; i++) {
        cdb_pair_image *im;
        if (slot[i] == s->n_images || !count[slot[i]]) continue;
        im = &p->img[count[slot[i]] - 1];
        im->captions[im->n_captions++] = s->caption_texts[i];
        s->caption_texts[i] = NULL;
        p->n_captions++;
    }
    *out = p;
    p = NULL;
    goto cleanup;
oom:
    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory reading image-caption pairs");
cleanup:
    cdb_split_free(s);
    cdb_pairs_free(p);
    free(cond);
    free(slot);
    free(count);
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
