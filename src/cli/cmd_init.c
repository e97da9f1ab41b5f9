/*
** cmd_init.c: clipdb init DB --model DIR
*/
#include <string.h>

#include "cli/cli.h"

const char cli_init_help[] =
    "usage: clipdb init DB --model DIR\n"
    "\n"
    "Creates a new database file DB bound to the CLIP model in DIR: the model's\n"
    "identity and shape are recorded, and vectors from any other model are\n"
    "refused later. The model directory is recorded too, so that later commands\n"
    "(add, search) find it without --model. DB must not exist.\n"
    "\n"
    "options:\n"
    "  --model DIR   the model directory (model.safetensors + tokenizer); required\n"
    "  --precision P encoder precision of every vector stored: fp32 (default),\n"
    "                bf16 or int8 (recorded; add and search then use it)\n"
    "\n"
    "example:\n"
    "  clipdb init photos.db --model models/clip-vit-b-32\n";

int cli_cmd_init(int argc, char **argv)
{
    const char *path = NULL, *model = NULL;
    clipdb_db_options opt;
    clipdb_db *db = NULL;
    clipdb_db_stats st;
    int i, rc;

    clipdb_db_options_init(&opt);
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc) opt.precision = argv[++i];
        else if (argv[i][0] == '-' && argv[i][1]) return cli_usage("init", "unknown option '%s'", argv[i]);
        else if (!path) path = argv[i];
        else return cli_usage("init", "unexpected argument '%s'", argv[i]);
    }
    if (!path) return cli_usage("init", "no database file given");
    if (!model) return cli_usage("init", "--model DIR is required");
    opt.create = 1;
    opt.model_dir = model;
    rc = clipdb_db_open(&db, path, &opt);
    if (rc != CLIPDB_OK) {
        cli_fail("init", "%s", clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return CLI_FAIL;
    }
    if (clipdb_db_get_stats(db, &st) == CLIPDB_OK) {
        printf("created %s (model %s, %d dims)\n", path, st.model, st.embed_dim);
        clipdb_db_stats_free(&st);
    }
    clipdb_db_close(db);
    return CLI_OK;
}
