/*
** examples/search.c: clipdb as a C library. Opens a database, finds the
** images nearest to a text (or to an image file: "image:PATH"), and prints
** them; on failure prints the status code and the message. Uses only
** include/clipdb.h.
**
**   cc -Iinclude examples/search.c build/libclipdb.a $(LIBS) -o search
**   ./search photos.db "a dog on a beach" [K]
**   ./search photos.db image:cat.jpg [K]
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clipdb.h"

int main(int argc, char **argv)
{
    int rc, exit_code = 1;
    clipdb_db *db = NULL;
    clipdb_results *res = NULL;
    clipdb_search_options opt;
    clipdb_query q = {0};
    size_t i;

    if (argc < 3) {
        fprintf(stderr, "usage: %s DB TEXT [K]\n", argv[0]);
        return 2;
    }
    rc = clipdb_db_open(&db, argv[1], NULL);  /* NULL: default options */
    if (rc != CLIPDB_OK) {
        fprintf(stderr, "%s: %s\n", clipdb_status_name(rc), clipdb_db_errmsg(db));
        goto cleanup;
    }
    clipdb_search_options_init(&opt);         /* cosine, exact, k = 10, images */
    if (argc > 3) opt.k = atoi(argv[3]);
    if (!strncmp(argv[2], "image:", 6)) {
        q.kind = CLIPDB_QUERY_IMAGE;
        q.path = argv[2] + 6;
    } else {
        q.kind = CLIPDB_QUERY_TEXT;
        q.text = argv[2];
    }
    rc = clipdb_db_search(db, &q, 1, &opt, &res);
    if (rc != CLIPDB_OK) {
        fprintf(stderr, "%s: %s\n", clipdb_status_name(rc), clipdb_db_errmsg(db));
        goto cleanup;
    }
    for (i = res->offsets[0]; i < res->offsets[1]; i++)
        printf("%lld\t%.6f\t%s\n", (long long)res->results[i].id,
               (double)res->results[i].score, res->results[i].path);
    exit_code = 0;
cleanup:
    clipdb_results_free(res);
    clipdb_db_close(db);  /* accepts NULL; also frees a handle that failed to open */
    return exit_code;
}
