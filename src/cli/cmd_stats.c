/*
** cmd_stats.c: clipdb stats DB [--json]
*/
#include <string.h>

#include "cli/cli.h"

const char cli_stats_help[] =
    "usage: clipdb stats DB [--json]\n"
    "\n"
    "Prints what the database holds: numbers of images, texts (captions\n"
    "included) and vectors, the model identity and directory, the format\n"
    "version, the stored indexes (IVF, Faiss) and the vector sets: 'base' (the\n"
    "database's own model) and any added by 'clipdb reembed', with their models\n"
    "and how many images and texts each holds, and the compressed copies\n"
    "('clipdb index DB --compress KIND') that exact search scans.\n"
    "\n"
    "options:\n"
    "  --json   one JSON object: {\"images\": N, \"texts\": M, \"captions\": C,\n"
    "           \"vectors\": V, \"model\": ..., \"model_dir\": ..., \"dim\": D,\n"
    "           \"format_version\": 1, \"indexes\": [{\"kind\": \"ivf\", \"target\": ...,\n"
    "           \"metric\": ..., \"nlist\": ..., \"vectors\": ...}, {\"kind\": \"faiss\",\n"
    "           \"factory\": ..., \"target\": ..., \"metric\": ..., \"vectors\": ...}],\n"
    "           \"sets\": [{\"name\": \"base\", \"model\": ..., \"model_dir\": ...,\n"
    "           \"precision\": ..., \"dim\": ..., \"images\": ..., \"texts\": ...,\n"
    "           \"vectors\": ..., \"created_at\": ...}, ...], \"compressed\":\n"
    "           [{\"space\": \"base\", \"target\": ..., \"kind\": \"sq8\", \"dim\": ...}]}\n"
    "\n"
    "example:\n"
    "  clipdb stats photos.db --json\n";

static const char *target_name(int t)
{
    return t == CLIPDB_ITEM_TEXT ? "text" : "image";
}

int cli_cmd_stats(int argc, char **argv)
{
    const char *path = NULL;
    int json = 0, i, rc;
    clipdb_db_options opt;
    clipdb_db *db = NULL;
    clipdb_db_stats st;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (argv[i][0] == '-' && argv[i][1]) return cli_usage("stats", "unknown option '%s'", argv[i]);
        else if (!path) path = argv[i];
        else return cli_usage("stats", "unexpected argument '%s'", argv[i]);
    }
    if (!path) return cli_usage("stats", "no database file given");
    clipdb_db_options_init(&opt);
    opt.readonly = 1;
    if (cli_open_db("stats", path, &opt, &db) != CLI_OK) return CLI_FAIL;
    rc = clipdb_db_get_stats(db, &st);
    if (rc != CLIPDB_OK) {
        cli_fail("stats", "%s", clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return CLI_FAIL;
    }
    if (json) {
        printf("{\"images\": %lld, \"texts\": %lld, \"captions\": %lld, \"vectors\": %lld, "
               "\"model\": ",
               (long long)st.images, (long long)st.texts, (long long)st.captions,
               (long long)st.vectors);
        cli_print_json_string(stdout, st.model);
        printf(", \"model_dir\": ");
        cli_print_json_string(stdout, st.model_dir);
        printf(", \"dim\": %d, \"format_version\": %d, \"indexes\": [", st.embed_dim,
               st.format_version);
        for (i = 0; i < st.n_indexes; i++) {
            const clipdb_db_index_info *x = &st.indexes[i];
            printf("%s{\"kind\": \"%s\", ", i ? ", " : "", x->kind);
            if (x->factory) {
                printf("\"factory\": ");
                cli_print_json_string(stdout, x->factory);
                printf(", ");
            } else {
                printf("\"nlist\": %d, ", x->nlist);
            }
            printf("\"target\": \"%s\", \"metric\": \"%s\", \"vectors\": %lld}",
                   target_name(x->target), clipdb_metric_name(x->metric), (long long)x->n_vectors);
        }
        printf("], \"sets\": [");
        for (i = 0; i < st.n_sets; i++) {
            const clipdb_db_set_info *x = &st.sets[i];
            printf("%s{\"name\": ", i ? ", " : "");
            cli_print_json_string(stdout, x->name);
            printf(", \"model\": ");
            cli_print_json_string(stdout, x->model);
            printf(", \"model_dir\": ");
            cli_print_json_string(stdout, x->model_dir);
            printf(", \"precision\": \"%s\", \"dim\": %d, \"images\": %lld, \"texts\": %lld, "
                   "\"vectors\": %lld, \"created_at\": %lld}",
                   x->precision, x->dim, (long long)x->images, (long long)x->texts,
                   (long long)(x->images + x->texts), (long long)x->created_at);
        }
        printf("], \"compressed\": [");
        for (i = 0; i < st.n_compressed; i++) {
            const clipdb_db_compressed_info *x = &st.compressed[i];
            printf("%s{\"space\": ", i ? ", " : "");
            cli_print_json_string(stdout, x->space);
            printf(", \"target\": \"%s\", \"kind\": \"%s\", \"dim\": %d}", target_name(x->target),
                   x->kind, x->dim);
        }
        printf("]}\n");
    } else {
        printf("database   %s (format version %d)\n", st.path, st.format_version);
        printf("model      %s (%d dims)\n", st.model, st.embed_dim);
        printf("model dir  %s\n", st.model_dir);
        printf("images     %lld\n", (long long)st.images);
        printf("texts      %lld (%lld captions)\n", (long long)st.texts, (long long)st.captions);
        printf("vectors    %lld\n", (long long)st.vectors);
        for (i = 0; i < st.n_indexes; i++) {
            const clipdb_db_index_info *x = &st.indexes[i];
            if (x->factory)
                printf("index      faiss \"%s\" on %s vectors, metric %s, %lld vectors\n",
                       x->factory, target_name(x->target), clipdb_metric_name(x->metric),
                       (long long)x->n_vectors);
            else
                printf("index      %s on %s vectors, metric %s, %d lists, %lld vectors\n",
                       x->kind, target_name(x->target), clipdb_metric_name(x->metric), x->nlist,
                       (long long)x->n_vectors);
        }
        for (i = 0; i < st.n_sets; i++) {
            const clipdb_db_set_info *x = &st.sets[i];
            printf("set        ");
            cli_print_plain(stdout, x->name); /* names from the file: one line each */
            printf(": %lld images, %lld texts; model ", (long long)x->images, (long long)x->texts);
            cli_print_plain(stdout, x->model);
            printf(" (%d dims, %s)\n", x->dim, x->precision);
        }
        for (i = 0; i < st.n_compressed; i++) {
            const clipdb_db_compressed_info *x = &st.compressed[i];
            printf("compressed %s copy of the %s vectors of set ", x->kind, target_name(x->target));
            cli_print_plain(stdout, x->space);
            printf(" (%d dims; exact search scans it, re-ranks in fp32)\n", x->dim);
        }
    }
    clipdb_db_stats_free(&st);
    clipdb_db_close(db);
    return CLI_OK;
}
