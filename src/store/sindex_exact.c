/*
** sindex_exact.c: exact search as a stored-index type with nothing stored:
** one matrix product of the queries against every stored vector of the set
** (clipdb_flat_search), filters as a bitmap over its rows. On a handle set
** to CUDA (clipdb_db_set_device) the same search runs on the GPU
** (src/cuda/search.cu): the slot then holds the set's vectors resident on
** the GPU, uploaded at the first search and again only when they change.
*/
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda.h"
#include "index/index.h"
#include "store/sindex.h"

/* What an exact slot keeps: the vectors on the GPU and the set they are
** of (a slot serves one item type, which base and named sets share). */
typedef struct gpu_slot {
    cdb_cuda_flat *flat;
    const cdb_vecset *vs;
} gpu_slot;

static void exact_release(cdb_sindex *s)
{
    gpu_slot *g = s->impl;
    if (g) cdb_cuda_flat_free(g->flat);
    free(g);
    s->impl = NULL;
}

/* The vectors of vs on the GPU (s->impl), uploaded when missing. */
static int gpu_flat(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs, cdb_cuda_flat **out)
{
    clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, vs->d};
    gpu_slot *g = s->impl;
    int rc;
    if (g && g->vs == vs && g->flat) {
        *out = g->flat;
        return CLIPDB_OK;
    }
    exact_release(s);
    if (!(g = calloc(1, sizeof *g))) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    s->impl = g;
    rc = cdb_cuda_flat_new(&g->flat, &base, cdb_cuda_dtype_of(db->gpu_vec_prec), &db->err);
    if (rc != CLIPDB_OK) return rc;
    g->vs = vs;
    *out = g->flat;
    return CLIPDB_OK;
}

static int exact_search(clipdb_db *db, cdb_sindex *s, const cdb_search_call *c,
                        clipdb_hit *out, int *n_out)
{
    const cdb_vecset *vs = c->vs;
    clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, vs->d};
    clipdb_filter filter, *fp = NULL;
    uint64_t *bitmap = NULL;
    char *errmsg = NULL;
    size_t i, j;
    int rc;
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
    if (db->device == CLIPDB_DEVICE_CUDA && c->k <= CDB_CUDA_MAX_K) {
        cdb_cuda_flat *gf = NULL;
        // the same on the GPU: queries (nq, d) . base (n, d)^T by cuBLAS -> top k selected there
        if ((rc = gpu_flat(db, s, vs, &gf)) == CLIPDB_OK)
            rc = cdb_cuda_flat_search(gf, c->q, c->nq, c->k, c->opt->metric, fp, out, n_out,
                                      &db->err);
        if (rc != CLIPDB_OK) cdb_err_prefix(&db->err, "exact search on the GPU");
        free(bitmap);
        return rc;
    }
    // queries (nq, d) . base (n, d)^T -> scores (nq, n) -> top k per query
    rc = clipdb_flat_search(&base, c->q, c->nq, c->k, c->opt->metric, fp, out, n_out, &errmsg);
    if (rc != CLIPDB_OK)
        cdb_err_set(&db->err, rc, "exact search: %s", errmsg ? errmsg : "failed");
    free(errmsg);
    free(bitmap);
    return rc;
}

const cdb_sindex_type cdb_sindex_exact = {
    .name = "exact",
    .kind = CLIPDB_INDEX_EXACT,
    .search = exact_search,
    .invalidate = exact_release,
    .release = exact_release,
};
