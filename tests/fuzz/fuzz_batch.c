/* libFuzzer target: the query-file format of `clipdb search --batch`
** (clipdb_queries_parse). Any bytes give queries or an error with a
** message, never a crash; and what it accepts holds: at least one query,
** each of a known kind, strings inside the list's storage with no newline,
** a text never starting with "image:" or "item:", and exactly as many
** queries as non-empty lines. Seeds: tests/fuzz/seeds/batch. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "clipdb.h"

/* Non-empty lines ("\n" or "\r\n" ends) of data: the queries expected. */
static size_t count_lines(const uint8_t *data, size_t size)
{
    size_t i, start = 0, n = 0;
    for (i = 0; i <= size; i++) {
        if (i == size || data[i] == '\n') {
            size_t end = i;
            if (end > start && i < size && data[end - 1] == '\r') end--;
            n += end > start;
            start = i + 1;
        }
    }
    return n;
}

static void check_string(const clipdb_query_list *l, const char *s)
{
    size_t len;
    if (!s) abort();
    len = strlen(s);
    if (s < l->storage || memchr(s, '\n', len)) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    clipdb_query_list l;
    char *err = NULL;
    size_t i;
    int rc = clipdb_queries_parse((const char *)data, size, "fuzz.txt", &l, &err);
    if (rc == CLIPDB_OK) {
        if (err || l.n == 0 || !l.queries || !l.storage || memchr(data, 0, size)) abort();
        if (l.n != count_lines(data, size)) abort();
        for (i = 0; i < l.n; i++) {
            const clipdb_query *q = &l.queries[i];
            if (q->kind == CLIPDB_QUERY_TEXT) {
                check_string(&l, q->text);
                if (!*q->text || !strncmp(q->text, "image:", 6) || !strncmp(q->text, "item:", 5))
                    abort();
            } else if (q->kind == CLIPDB_QUERY_IMAGE) {
                check_string(&l, q->path);
                if (!*q->path) abort();
            } else if (q->kind != CLIPDB_QUERY_ITEM || q->item < 0) {
                abort();
            }
        }
        clipdb_query_list_free(&l);
    } else if (!err || !*err || l.n || l.queries || l.storage) {
        abort(); /* a failure always says why and leaves nothing to free */
    }
    clipdb_free(err);
    return 0;
}
