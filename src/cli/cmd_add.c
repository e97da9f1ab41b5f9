/*
** cmd_add.c: clipdb add DB (--images DIR [--captions FILE] | --texts FILE)
*/
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"

const char cli_add_help[] =
    "usage: clipdb add DB --images DIR [--captions FILE] [--texts FILE] [options]\n"
    "\n"
    "Adds every image under DIR (recursively; .jpg .jpeg .png .webp .bmp .gif,\n"
    "any case) and, with --captions, their captions; or, with --texts, one\n"
    "standalone text per line. Incremental: files already stored with the same\n"
    "content (SHA-256) are skipped, changed files are re-encoded, and a run that\n"
    "was killed resumes where it stopped. Unreadable or corrupt images are\n"
    "reported (path and reason) and skipped; a malformed captions file stops\n"
    "the run before anything is added (FILE:LINE: reason).\n"
    "\n"
    "Captions files (detected from the content; a .csv name means CSV):\n"
    "  JSON lines  {\"image\": \"a.jpg\", \"captions\": [\"...\"], <other fields:\n"
    "              metadata such as split, image_id>}  (image relative to DIR)\n"
    "  COCO        captions_*.json: {\"images\": [{\"id\", \"file_name\"}],\n"
    "              \"annotations\": [{\"image_id\", \"caption\"}]}\n"
    "  CSV         header row with columns image,caption (RFC 4180 quoting);\n"
    "              other columns become metadata\n"
    "\n"
    "options:\n"
    "  --images DIR      folder of images\n"
    "  --captions FILE   captions of those images\n"
    "  --texts FILE      standalone texts, one per line\n"
    "  --model DIR       model directory (default: the one recorded by init)\n"
    "  --precision P     encoder precision; must be the one recorded by init\n"
    "  --batch N         images per commit (default " CLI_STR(CLIPDB_ADD_BATCH_DEFAULT) ", at most "
    CLI_STR(CLIPDB_ADD_MAX_BATCH) ")\n"
    "  --threads N       image decoding threads (default: number of CPUs; at\n"
    "                    most " CLI_STR(CLIPDB_ADD_MAX_DECODE_THREADS) ")\n"
    "  --device D        encode on cpu (default), cuda or auto (the GPU when\n"
    "                    present), in the recorded precision (fp32 or bf16)\n"
    "  --progress-every S  seconds between progress updates (default 0.2 on a\n"
    "                    terminal, else 5: one plain line each)\n"
    "  --json            print the summary as JSON\n"
    "  -q, --quiet       no progress output\n"
    "\n"
    "examples:\n"
    "  clipdb add photos.db --images coco/images --captions coco/captions.jsonl\n"
    "  clipdb add photos.db --texts queries.txt\n";

typedef struct progress_state {
    cli_progress bar;
    int quiet;
} progress_state;

static void on_progress(void *arg, const clipdb_add_progress *p)
{
    progress_state *ps = arg;
    char note[96];
    if (ps->quiet) return;
    snprintf(note, sizeof note, "%lld skipped, %lld failed", (long long)p->skipped,
             (long long)p->failed);
    cli_progress_draw(&ps->bar, p->phase, p->done, p->total,
                      p->elapsed_s > 0 ? (double)p->done / p->elapsed_s : 0, 0, note,
                      p->done == p->total);
}

static void on_warning(void *arg, const char *msg)
{
    progress_state *ps = arg;
    cli_progress_break(&ps->bar);
    fprintf(stderr, "clipdb add: skipped %s\n", msg);
}

int cli_cmd_add(int argc, char **argv)
{
    const char *path = NULL, *model = NULL, *precision = NULL;
    clipdb_add_options opt;
    clipdb_add_result r;
    clipdb_db_options dopt;
    clipdb_db *db = NULL;
    progress_state ps = {0};
    int json = 0, i, rc, ret = CLI_OK;
    long long v;
    double every = 0;
    clipdb_device dev = CLIPDB_DEVICE_CPU;
    clipdb_precision vprec = CLIPDB_PRECISION_FP32;

    clipdb_add_options_init(&opt);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--images") && has) opt.images_dir = argv[++i];
        else if (!strcmp(a, "--captions") && has) opt.captions_path = argv[++i];
        else if (!strcmp(a, "--texts") && has) opt.texts_path = argv[++i];
        else if (!strcmp(a, "--model") && has) model = argv[++i];
        else if (!strcmp(a, "--device") && has) {
            if ((rc = cli_parse_device("add", argv[++i], &dev, &vprec)) != CLI_OK) return rc;
        }
        else if (!strcmp(a, "--precision") && has) precision = argv[++i];
        else if (!strcmp(a, "--batch") && has) {
            if ((rc = cli_parse_int("add", a, argv[++i], 1, CLIPDB_ADD_MAX_BATCH, &v)) != CLI_OK) return rc;
            opt.batch_size = (int)v;
        } else if (!strcmp(a, "--threads") && has) {
            if ((rc = cli_parse_int("add", a, argv[++i], 1, CLIPDB_ADD_MAX_DECODE_THREADS, &v)) != CLI_OK) return rc;
            opt.decode_threads = (int)v;
        } else if (!strcmp(a, "--progress-every") && has) {
            if ((rc = cli_parse_double("add", a, argv[++i], 0.01, 3600, &every)) != CLI_OK)
                return rc;
        } else if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) ps.quiet = 1;
        else if (a[0] == '-' && a[1]) return cli_usage("add", "unknown option or missing value '%s'", a);
        else if (!path) path = a;
        else return cli_usage("add", "unexpected argument '%s'", a);
    }
    if (!path) return cli_usage("add", "no database file given");
    if (!opt.images_dir && !opt.texts_path) return cli_usage("add", "give --images DIR or --texts FILE");
    if (opt.captions_path && !opt.images_dir) return cli_usage("add", "--captions needs --images DIR");
    ps.bar.tty = isatty(2);
    opt.on_progress = on_progress;
    opt.on_warning = on_warning;
    opt.progress_interval_s = every > 0 ? every : ps.bar.tty ? 0.2 : 5.0;
    opt.arg = &ps;
    clipdb_db_options_init(&dopt);
    dopt.model_dir = model;
    dopt.precision = precision;
    if (cli_open_db("add", path, &dopt, &db) != CLI_OK) return CLI_FAIL;
    rc = CLIPDB_OK;
    if (dev != CLIPDB_DEVICE_CPU) rc = clipdb_db_set_device(db, dev, vprec);
    if (rc == CLIPDB_OK) rc = clipdb_db_add(db, &opt, &r);
    cli_progress_break(&ps.bar);
    if (rc != CLIPDB_OK) {
        ret = cli_fail("add", "%s", clipdb_db_errmsg(db));
    } else if (json) {
        printf("{\"images_added\": %lld, \"images_updated\": %lld, \"images_unchanged\": %lld, "
               "\"images_failed\": %lld, \"captions_added\": %lld, \"captions_unmatched\": %lld, "
               "\"captions_duplicate\": %lld, \"captions_failed\": %lld, "
               "\"texts_added\": %lld, \"texts_unchanged\": %lld, \"texts_failed\": %lld}\n",
               (long long)r.images_added, (long long)r.images_updated,
               (long long)r.images_unchanged, (long long)r.images_failed,
               (long long)r.captions_added, (long long)r.captions_unmatched,
               (long long)r.captions_duplicate, (long long)r.captions_failed,
               (long long)r.texts_added, (long long)r.texts_unchanged, (long long)r.texts_failed);
    } else {
        if (opt.images_dir)
            printf("images: %lld added, %lld updated, %lld unchanged (skipped), %lld failed; "
                   "captions: %lld added",
                   (long long)r.images_added, (long long)r.images_updated,
                   (long long)r.images_unchanged, (long long)r.images_failed,
                   (long long)r.captions_added);
        if (opt.images_dir && r.captions_duplicate)
            printf(", %lld skipped as repeats of a caption of the same image",
                   (long long)r.captions_duplicate);
        if (opt.images_dir && r.captions_failed)
            printf(", %lld failed (reported above, skipped)", (long long)r.captions_failed);
        if (opt.images_dir && r.captions_unmatched)
            printf(", %lld caption entries name no image in the folder",
                   (long long)r.captions_unmatched);
        if (opt.images_dir) putchar('\n');
        if (opt.texts_path)
            printf("texts: %lld added, %lld already present (skipped), %lld failed\n",
                   (long long)r.texts_added, (long long)r.texts_unchanged,
                   (long long)r.texts_failed);
    }
    clipdb_db_close(db);
    return ret;
}
