/*
** cmd_rm.c: clipdb rm DB ID...
*/
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

const char cli_rm_help[] =
    "usage: clipdb rm DB ID...\n"
    "\n"
    "Deletes items (images or texts) and their vectors, by id (as printed by\n"
    "search). Deleting an image deletes its captions too (their count is\n"
    "printed). If any id does not exist nothing is deleted.\n"
    "\n"
    "example:\n"
    "  clipdb rm photos.db 12 40\n";

int cli_cmd_rm(int argc, char **argv)
{
    const char *path = NULL;
    int64_t *ids = NULL, n_items = 0, n_caps = 0;
    int n = 0, i, rc, ret = CLI_OK;
    clipdb_db *db = NULL;

    ids = calloc((size_t)argc, sizeof *ids);
    if (!ids) return cli_fail("rm", "out of memory");
    for (i = 1; i < argc; i++) {
        if (!path) {
            path = argv[i];
        } else {
            long long v;
            if ((rc = cli_parse_int("rm", "an item id", argv[i], 0, INT64_MAX, &v))) {
                free(ids);
                return rc;
            }
            ids[n++] = v;
        }
    }
    if (!path || n == 0) {
        free(ids);
        return cli_usage("rm", "give a database and at least one item id");
    }
    if (cli_open_db("rm", path, NULL, &db) != CLI_OK) {
        free(ids);
        return CLI_FAIL;
    }
    rc = clipdb_db_rm(db, ids, n, &n_items, &n_caps);
    if (rc != CLIPDB_OK) {
        ret = cli_fail("rm", "%s", clipdb_db_errmsg(db));
    } else {
        printf("deleted %lld item%s", (long long)n_items, n_items == 1 ? "" : "s");
        if (n_caps) printf(" and %lld caption%s of deleted images", (long long)n_caps,
                           n_caps == 1 ? "" : "s");
        printf("\n");
    }
    clipdb_db_close(db);
    free(ids);
    return ret;
}
