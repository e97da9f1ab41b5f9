/*
** cmd_reembed.c: clipdb reembed DB --model DIR --as NAME [options]
**                clipdb reembed DB --drop NAME
*/
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"

const char cli_reembed_help[] =
    "usage: clipdb reembed DB --model DIR --as NAME [--precision P] [--batch N] [-q]\n"
    "       clipdb reembed DB --drop NAME\n"
    "\n"
    "A database holds one VECTOR SET per model over the same items. 'base' is\n"
    "the vectors of the model the database was created with (made by add).\n"
    "reembed adds another: it encodes every stored item with the model in DIR\n"
    "(images from their stored paths, texts and captions from their stored\n"
    "text) into the set NAME, so that search, eval and the web page can compare\n"
    "the two models on the same data (the paper's \"fine-tuned or not\").\n"
    "\n"
    "Incremental and crash-safe like add: items already in the set are skipped,\n"
    "so a rerun after new adds encodes only those; every batch is committed, so\n"
    "a run that is killed or stopped (Ctrl-C: exit status 130) keeps what it\n"
    "committed and the same command finishes it. An image whose file is missing\n"
    "or unreadable is reported (path and reason) and counted, not fatal; the\n"
    "exit status is then 1. Deleting an item (clipdb rm) deletes its vectors in\n"
    "every set. A set keeps its model: a rerun with another model (or another\n"
    "precision) is refused; use a new name, or --drop the set first.\n"
    "\n"
    "options:\n"
    "  --model DIR       the model whose vectors the set holds (required)\n"
    "  --as NAME         the set: 1 to " CLI_STR(CLIPDB_VECTOR_SET_NAME_MAX)
    " characters of A-Z a-z 0-9 _ -, not 'base'\n"
    "  --precision P     encoder precision fp32 (default), bf16 or int8\n"
    "  --batch N         items per encoder batch and commit (default 32)\n"
    "  --drop NAME       delete the set NAME and its vectors (nothing else)\n"
    "  --json            print the summary as JSON\n"
    "  -q, --quiet       no progress output\n"
    "\n"
    "example (fine-tune, add the fine-tuned vectors, compare):\n"
    "  clipdb finetune photos.db --model models/clip --out models/clip-ft --split train\n"
    "  clipdb reembed photos.db --model models/clip-ft --as finetuned\n"
    "  clipdb search photos.db --text \"a dog catching a frisbee\" --space finetuned\n"
    "  clipdb eval photos.db --split val2017 --set finetuned\n"
    "  clipdb eval photos.db --split val2017      # every set, side by side\n";

typedef struct progress_state {
    cli_progress bar;
    int quiet;
    double every, last; /* seconds between lines (0.2 on a terminal, else 5) */
} progress_state;

static int on_progress(void *arg, const clipdb_add_progress *p)
{
    progress_state *ps = arg;
    char note[96];
    int final = p->done == p->total;
    if (!ps->quiet && (final || p->elapsed_s - ps->last >= ps->every)) {
        ps->last = p->elapsed_s;
        snprintf(note, sizeof note, "%lld already in the set, %lld failed",
                 (long long)p->skipped, (long long)p->failed);
        cli_progress_draw(&ps->bar, p->phase, p->done, p->total,
                          p->elapsed_s > 0 ? (double)p->done / p->elapsed_s : 0, 0, note,
                          final);
    }
    return cli_interrupted();
}

static void on_warning(void *arg, const char *msg)
{
    progress_state *ps = arg;
    cli_progress_break(&ps->bar);
    fprintf(stderr, "clipdb reembed: failed: %s\n", msg);
}

int cli_cmd_reembed(int argc, char **argv)
{
    const char *path = NULL, *drop = NULL;
    clipdb_reembed_options opt;
    clipdb_reembed_result r;
    clipdb_db_options dopt;
    clipdb_db *db = NULL;
    progress_state ps = {0};
    int json = 0, i, rc, ret = CLI_OK;
    long long v;

    clipdb_reembed_options_init(&opt);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--model") && has) opt.model_dir = argv[++i];
        else if (!strcmp(a, "--as") && has) opt.name = argv[++i];
        else if (!strcmp(a, "--precision") && has) opt.precision = argv[++i];
        else if (!strcmp(a, "--drop") && has) drop = argv[++i];
        else if (!strcmp(a, "--batch") && has) {
            if ((rc = cli_parse_int("reembed", a, argv[++i], 1, 1024, &v)) != CLI_OK) return rc;
            opt.batch_size = (int)v;
        } else if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) ps.quiet = 1;
        else if (a[0] == '-' && a[1])
            return cli_usage("reembed", "unknown option or missing value '%s'", a);
        else if (!path) path = a;
        else return cli_usage("reembed", "unexpected argument '%s'", a);
    }
    if (!path) return cli_usage("reembed", "no database file given");
    if (drop && (opt.name || opt.model_dir))
        return cli_usage("reembed", "--drop NAME goes alone (no --model, no --as)");
    if (!drop && !opt.name) return cli_usage("reembed", "give --as NAME (the vector set)");
    if (!drop && !opt.model_dir) return cli_usage("reembed", "give --model DIR");
    if (opt.precision) {
        clipdb_precision p;
        if ((rc = cli_parse_precision("reembed", opt.precision, &p)) != CLI_OK) return rc;
    }
    clipdb_db_options_init(&dopt);
    if (cli_open_db("reembed", path, &dopt, &db) != CLI_OK) return CLI_FAIL;
    if (drop) {
        if (clipdb_db_drop_set(db, drop) != CLIPDB_OK)
            ret = cli_fail("reembed", "%s", clipdb_db_errmsg(db));
        else if (!ps.quiet)
            printf("vector set '%s' dropped\n", drop);
        clipdb_db_close(db);
        return ret;
    }
    ps.bar.tty = isatty(2);
    ps.every = ps.bar.tty ? 0.2 : 5.0;
    opt.on_progress = on_progress;
    opt.on_warning = on_warning;
    opt.arg = &ps;
    cli_catch_sigint();
    rc = clipdb_db_reembed(db, &opt, &r);
    signal(SIGINT, SIG_DFL);
    cli_progress_break(&ps.bar);
    if (rc == CLIPDB_ESTOPPED) {
        fprintf(stderr, "clipdb reembed: %s\n", clipdb_db_errmsg(db));
        ret = CLI_INTERRUPTED;
    } else if (rc != CLIPDB_OK) {
        ret = cli_fail("reembed", "%s", clipdb_db_errmsg(db));
    } else if (json) {
        printf("{\"set\": ");
        cli_print_json_string(stdout, opt.name);
        printf(", \"created\": %s, \"images_encoded\": %lld, \"images_present\": %lld, "
               "\"images_failed\": %lld, \"texts_encoded\": %lld, \"texts_present\": %lld, "
               "\"texts_failed\": %lld}\n",
               r.created ? "true" : "false", (long long)r.images_encoded,
               (long long)r.images_present, (long long)r.images_failed,
               (long long)r.texts_encoded, (long long)r.texts_present, (long long)r.texts_failed);
    } else {
        printf("vector set '%s'%s: images: %lld encoded, %lld already in the set, %lld failed; "
               "texts: %lld encoded, %lld already in the set, %lld failed\n",
               opt.name, r.created ? " (new)" : "", (long long)r.images_encoded,
               (long long)r.images_present, (long long)r.images_failed,
               (long long)r.texts_encoded, (long long)r.texts_present, (long long)r.texts_failed);
    }
    if (ret == CLI_OK && (r.images_failed || r.texts_failed)) {
        fprintf(stderr,
                "clipdb reembed: %lld images and %lld texts could not be encoded (reported "
                "above); they are not in vector set '%s'\n",
                (long long)r.images_failed, (long long)r.texts_failed, opt.name);
        ret = CLI_FAIL;
    }
    clipdb_db_close(db);
    return ret;
}
