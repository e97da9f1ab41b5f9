/*
** queries.c: the query-file format of `clipdb search --batch`
** (clipdb_queries_parse): one query per line, "image:PATH", "item:ID" or a
** text. A parser of outside input: bounded (CLIPDB_MAX_BATCH_BYTES,
** CLIPDB_MAX_BATCH_QUERIES), every failure names the file and the line.
** Fuzzed by tests/fuzz/fuzz_batch.c.
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "store/store.h"

void clipdb_query_list_free(clipdb_query_list *l)
{
    if (!l) return;
    free(l->queries);
    free(l->storage);
    memset(l, 0, sizeof *l);
}

/* A whole decimal number 0..INT64_MAX (no sign, no spaces) into *out. */
static int parse_id(const char *s, int64_t *out)
{
    char *end;
    long long v;
    if (*s < '0' || *s > '9') return 0;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end || v < 0) return 0;
    *out = (int64_t)v;
    return 1;
}

int clipdb_queries_parse(const char *data, size_t len, const char *name, clipdb_query_list *out,
                         char **errmsg)
{
    cdb_err e;
    const char *nul, *c;
    char *buf = NULL, *line, *p;
    size_t n = 0, i, lineno = 0;
    int rc = CLIPDB_OK;

    cdb_err_clear(&e);
    memset(out, 0, sizeof *out);
    if (errmsg) *errmsg = NULL;
    if (!name) name = "queries";
    if (!data && len) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "%s: no data", name);
        goto cleanup;
    }
    if (len > CLIPDB_MAX_BATCH_BYTES) {
        rc = cdb_err_set(&e, CLIPDB_ELIMIT, "%s: larger than %zu MiB", name,
                         CLIPDB_MAX_BATCH_BYTES >> 20);
        goto cleanup;
    }
    /* A NUL would end its line early and hide the rest of it. */
    if (len && (nul = memchr(data, '\0', len)) != NULL) {
        for (lineno = 1, c = data; c < nul; c++) lineno += *c == '\n';
        rc = cdb_err_set(&e, CLIPDB_EFORMAT, "%s:%zu: NUL byte in the line (queries are text)",
                         name, lineno);
        goto cleanup;
    }
    for (i = 0; i < len; i++) n += data[i] == '\n';
    n++; /* the last line may have no newline */
    if (n > CLIPDB_MAX_BATCH_QUERIES + 1) n = CLIPDB_MAX_BATCH_QUERIES + 1;
    if (!(buf = malloc(len + 1)) || !(out->queries = cdb_malloc_array(n, sizeof *out->queries))) {
        rc = cdb_err_set(&e, CLIPDB_ENOMEM, "%s: out of memory", name);
        goto cleanup;
    }
    if (len) memcpy(buf, data, len);
    buf[len] = '\0';
    out->storage = buf;
    buf = NULL;
    n = 0;
    for (line = out->storage, lineno = 1; *line; lineno++) {
        clipdb_query *q;
        p = strchr(line, '\n');
        if (p) *p = '\0';
        if (p && p > line && p[-1] == '\r') p[-1] = '\0';
        if (*line) {
            if (n == CLIPDB_MAX_BATCH_QUERIES) {
                rc = cdb_err_set(&e, CLIPDB_ELIMIT, "%s:%zu: more than %d queries", name, lineno,
                                 CLIPDB_MAX_BATCH_QUERIES);
                goto cleanup;
            }
            q = &out->queries[n];
            memset(q, 0, sizeof *q);
            if (!strncmp(line, "image:", 6)) {
                q->kind = CLIPDB_QUERY_IMAGE;
                q->path = line + 6;
                if (!*q->path) {
                    rc = cdb_err_set(&e, CLIPDB_EFORMAT, "%s:%zu: image: names no file", name,
                                     lineno);
                    goto cleanup;
                }
            } else if (!strncmp(line, "item:", 5)) {
                q->kind = CLIPDB_QUERY_ITEM;
                if (!parse_id(line + 5, &q->item)) {
                    rc = cdb_err_set(&e, CLIPDB_EFORMAT,
                                     "%s:%zu: item: needs an item id (a whole number from 0 to "
                                     "%lld), not '%.40s'",
                                     name, lineno, (long long)INT64_MAX, line + 5);
                    goto cleanup;
                }
            } else {
                q->kind = CLIPDB_QUERY_TEXT;
                q->text = line;
            }
            n++;
        }
        if (!p) break;
        line = p + 1;
    }
    out->n = n;
    if (n == 0) rc = cdb_err_set(&e, CLIPDB_EINVAL, "%s: no queries", name);
cleanup:
    free(buf);
    if (rc != CLIPDB_OK) {
        clipdb_query_list_free(out);
        if (errmsg) *errmsg = cdb_strdup(e.msg);
    }
    return rc;
}
