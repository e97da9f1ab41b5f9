/*
** sindex_exact.c: exact search as a stored-index type with nothing stored:
** one matrix product of the queries against every stored vector of the set
** (clipdb_flat_search), filters as a bitmap over its rows.
*/
#include <stdlib.h>
#include <string.h>

#include "index/index.h"
#include "store/sindex.h"

static int exact_search(clipdb_db *db, cdb_sindex *s, const cdb_search_call *c,
                        clipdb_hit *out, int *n_out)
{
    const cdb_vecset *vs = c->vs;
    clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, vs->d};
    clipdb_filter filter, *fp = NULL;
    clipdb_cvecs *cv = NULL;
    uint64_t *bitmap = NULL;
    char *errmsg = NULL;
    size_t i, j;
    int rc;
    (void)s;
    if (c->allowed) {
        /* keys of flat search are rows: ids -> rows (both sorted) */
        bitmap = cdb_calloc_array((vs->n + 63) / 64, sizeof *bitmap);
        if (!bitmap) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        for (i = j = 0; i < vs->n && j < c->n_allowed;) {
            if (vs->ids[i] < c->allowed[j]) i++;
            else if (vs->ids[i] > c->allowed[j]) j++;
            else {
                bitmap[i / 64] |= (uint64_t)1 << (i % 64);
                i++;
                j++;
            }
        }
        memset(&filter, 0, sizeof filter);
        filter.bitmap = bitmap;
        filter.nbits = vs->n;
        fp = &filter;
    }
    /* the set's compressed copy, when it has one and the caller did not opt out */
    if (!c->opt->no_compressed &&
        (rc = cdb_compressed_get(db, c->opt->vector_set, c->opt->target, vs, &cv)) != CLIPDB_OK)
        goto cleanup;
    if (cv) {
        // queries (nq, d) . copy (n, d)^T -> best candidates -> fp32 re-rank -> top k
        rc = clipdb_cvecs_search(cv, &base, c->q, c->nq, c->k, 0, c->opt->metric, fp, out, n_out,
                                 &errmsg);
        if (c->compressed) *c->compressed = clipdb_compress_name(clipdb_cvecs_kind(cv));
        if (c->scan_isa) *c->scan_isa = clipdb_cvecs_isa(cv);
    } else {
        // queries (nq, d) . base (n, d)^T -> scores (nq, n) -> top k per query
        rc = clipdb_flat_search(&base, c->q, c->nq, c->k, c->opt->metric, fp, out, n_out,
                                &errmsg);
    }
    if (rc != CLIPDB_OK)
        cdb_err_set(&db->err, rc, "exact search: %s", errmsg ? errmsg : "failed");
cleanup:
    free(errmsg);
    free(bitmap);
    return rc;
}

static void exact_release(cdb_sindex *s)
{
    (void)s; /* nothing loaded */
}

const cdb_sindex_type cdb_sindex_exact = {
    .name = "exact",
    .kind = CLIPDB_INDEX_EXACT,
    .search = exact_search,
    .invalidate = exact_release,
    .release = exact_release,
};
