/*
** sindex.c: the registry of stored-index types, the loaded indexes of a
** handle (one array of slots) and the one write hook db.c calls. See
** sindex.h for the interface and the direction of calls.
*/
#include <stdlib.h>
#include <string.h>

#include "store/sindex.h"

static const cdb_sindex_type *const types[] = {&cdb_sindex_exact, &cdb_sindex_ivf,
                                               &cdb_sindex_faiss};
#define N_TYPES (sizeof types / sizeof types[0])

const cdb_sindex_type *cdb_sindex_type_of(clipdb_index_kind kind)
{
    size_t i;
    for (i = 0; i < N_TYPES; i++)
        if (types[i]->kind == kind) return types[i];
    return NULL;
}

static void slot_release(cdb_sindex *s)
{
    if (s->impl) s->type->release(s);
    s->impl = NULL;
    s->loaded = 0;
    free(s->note);
    s->note = NULL;
}

int cdb_sindex_slot(clipdb_db *db, const cdb_sindex_type *type, int set, clipdb_metric metric,
                    cdb_sindex **out)
{
    size_t i;
    cdb_sindex *s;
    for (i = 0; i < db->n_sindex; i++) {
        s = &db->sindex[i];
        if (s->type == type && s->set == set && s->metric == metric) {
            *out = s;
            return CLIPDB_OK;
        }
    }
    *out = NULL;
    if (cdb_grow((void **)&db->sindex, &db->cap_sindex, db->n_sindex + 1, sizeof *db->sindex))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    s = &db->sindex[db->n_sindex++];
    memset(s, 0, sizeof *s);
    s->type = type;
    s->set = set;
    s->metric = metric;
    *out = s;
    return CLIPDB_OK;
}

int cdb_sindex_get(clipdb_db *db, const cdb_sindex_type *type, int set, clipdb_metric metric,
                   const cdb_vecset *vs, cdb_sindex **out)
{
    cdb_sindex *s;
    int rc;
    *out = NULL;
    if ((rc = cdb_sindex_slot(db, type, set, metric, &s)) != CLIPDB_OK) return rc;
    if (s->loaded && s->changes == vs->changes && s->data_version == vs->data_version) {
        *out = s;
        return CLIPDB_OK;
    }
    /* stale (or never loaded): what reflects the old vectors goes */
    if (s->impl && type->invalidate) type->invalidate(s);
    s->loaded = 0;
    free(s->note);
    s->note = NULL;
    if (type->load && (rc = type->load(db, s, vs)) != CLIPDB_OK) return rc;
    s->loaded = 1;
    s->changes = vs->changes;
    s->data_version = vs->data_version;
    *out = s;
    return CLIPDB_OK;
}

void cdb_sindex_forget(clipdb_db *db, const cdb_sindex_type *type, int set, clipdb_metric metric)
{
    size_t i;
    for (i = 0; i < db->n_sindex; i++) {
        cdb_sindex *s = &db->sindex[i];
        if (s->type == type && s->set == set && s->metric == metric) slot_release(s);
    }
}

void cdb_sindex_release_all(clipdb_db *db)
{
    size_t i;
    for (i = 0; i < db->n_sindex; i++) slot_release(&db->sindex[i]);
    free(db->sindex);
    db->sindex = NULL;
    db->n_sindex = db->cap_sindex = 0;
}

/* Tells the stored indexes of every type for w->set about a new vector. */
static int tell_insert(clipdb_db *db, const cdb_sindex_type *type, const cdb_write *w)
{
    clipdb_metric metrics[3];
    cdb_sindex *s;
    int n = 0, i, rc;
    if (!type->on_insert || !type->stored_metrics) return CLIPDB_OK;
    if ((rc = type->stored_metrics(db, w->set, metrics, &n)) != CLIPDB_OK) return rc;
    for (i = 0; i < n; i++) {
        if ((rc = cdb_sindex_slot(db, type, w->set, metrics[i], &s)) != CLIPDB_OK) return rc;
        if ((rc = type->on_insert(db, s, w->id, w->vec)) != CLIPDB_OK) return rc;
    }
    return CLIPDB_OK;
}

int cdb_sindex_on_write(clipdb_db *db, const cdb_write *w)
{
    size_t t;
    int rc = CLIPDB_OK;
    for (t = 0; t < N_TYPES && rc == CLIPDB_OK; t++) {
        const cdb_sindex_type *type = types[t];
        if ((w->op == CDB_WRITE_DELETE || w->op == CDB_WRITE_REPLACE) && type->on_delete &&
            (rc = type->on_delete(db, w->id)) != CLIPDB_OK)
            break;
        if (w->op == CDB_WRITE_INSERT || w->op == CDB_WRITE_REPLACE)
            rc = tell_insert(db, type, w);
    }
    return rc;
}

int cdb_sindex_list_stored(clipdb_db *db, clipdb_db_stats *out)
{
    cdb_index_list l = {out, 0};
    size_t i;
    int rc;
    for (i = 0; i < N_TYPES; i++)
        if (types[i]->list_stored && (rc = types[i]->list_stored(db, &l)) != CLIPDB_OK) return rc;
    return CLIPDB_OK;
}

int cdb_sindex_ensure_tables(clipdb_db *db)
{
    size_t i;
    int rc;
    if (db->readonly)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "%s: opened read-only: the index tables are not created", db->path);
    for (i = 0; i < N_TYPES; i++)
        if (types[i]->ensure_tables && (rc = types[i]->ensure_tables(db)) != CLIPDB_OK) return rc;
    return CLIPDB_OK;
}
