/*
** cmd_check.c: clipdb check DB [--quick] [--json]
*/
#include <string.h>

#include "cli/cli.h"

const char cli_check_help[] =
    "usage: clipdb check DB [--quick] [--json]\n"
    "\n"
    "Checks a database and reports each problem by item id: SQLite's integrity\n"
    "check of the file, then the invariants of the data: every caption's image\n"
    "exists; no text is stored twice (for one image, or standalone) and no\n"
    "image file twice; each item has its one vector and each vector its item;\n"
    "every vector is finite, of the database's dimension, with its own stored\n"
    "norm; no metadata without its item; no id above the highest id recorded\n"
    "(ids are never given twice); each IVF index lists exactly the vectors of\n"
    "its set; each Faiss index matches its SHA-256 and holds no deleted item\n"
    "unmarked. Reads only. Exit status 0 when clean, 1 when problems were found\n"
    "(or the file could not be opened).\n"
    "\n"
    "options:\n"
    "  --quick   SQLite's quick_check instead of integrity_check (does not\n"
    "            match SQLite's indexes to their tables; faster on large files)\n"
    "  --json    one JSON object: {\"ok\": true|false, \"items\": N, \"vectors\": V,\n"
    "            \"indexes\": I, \"problems\": [{\"kind\", \"item\" (null when\n"
    "            the problem is not one item's), \"message\"}], \"n_problems\": P,\n"
    "            \"truncated\": true when more than " CLI_STR(CLIPDB_CHECK_MAX_PROBLEMS)
    " were found}\n"
    "\n"
    "examples:\n"
    "  clipdb check photos.db\n"
    "  clipdb check photos.db --json\n";

int cli_cmd_check(int argc, char **argv)
{
    const char *path = NULL;
    int json = 0, quick = 0, i, rc;
    clipdb_db_options opt;
    clipdb_db *db = NULL;
    clipdb_db_check_report r;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (argv[i][0] == '-' && argv[i][1]) return cli_usage("check", "unknown option '%s'", argv[i]);
        else if (!path) path = argv[i];
        else return cli_usage("check", "unexpected argument '%s'", argv[i]);
    }
    if (!path) return cli_usage("check", "no database file given");
    clipdb_db_options_init(&opt);
    opt.readonly = 1;
    if (cli_open_db("check", path, &opt, &db) != CLI_OK) return CLI_FAIL;
    rc = clipdb_db_check(db, quick, &r);
    if (rc != CLIPDB_OK) {
        cli_fail("check", "%s", clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return CLI_FAIL;
    }
    if (json) {
        printf("{\"ok\": %s, \"items\": %lld, \"vectors\": %lld, \"indexes\": %lld, \"problems\": [",
               r.n_problems ? "false" : "true", (long long)r.items, (long long)r.vectors,
               (long long)r.indexes);
        for (i = 0; i < r.n_listed; i++) {
            printf("%s{\"kind\": \"%s\", \"item\": ", i ? ", " : "", r.problems[i].kind);
            if (r.problems[i].item >= 0) printf("%lld", (long long)r.problems[i].item);
            else printf("null");
            printf(", \"message\": ");
            cli_print_json_string(stdout, r.problems[i].message);
            printf("}");
        }
        printf("], \"n_problems\": %lld, \"truncated\": %s}\n", (long long)r.n_problems,
               r.n_problems > r.n_listed ? "true" : "false");
    } else {
        for (i = 0; i < r.n_listed; i++) {
            printf("%s: ", r.problems[i].kind);
            cli_print_plain(stdout, r.problems[i].message);
            putchar('\n');
        }
        if (r.n_problems > r.n_listed)
            printf("... and %lld more problems\n", (long long)(r.n_problems - r.n_listed));
        printf("%s: %lld item%s, %lld vector%s, %lld index%s checked: %s\n", path,
               (long long)r.items, r.items == 1 ? "" : "s", (long long)r.vectors,
               r.vectors == 1 ? "" : "s", (long long)r.indexes, r.indexes == 1 ? "" : "es",
               r.n_problems ? "problems found" : "ok");
    }
    if (r.n_problems)
        cli_fail("check", "%s: %lld problem%s found", path, (long long)r.n_problems,
                 r.n_problems == 1 ? "" : "s");
    rc = r.n_problems ? CLI_FAIL : CLI_OK;
    clipdb_db_check_free(&r);
    clipdb_db_close(db);
    return rc;
}
