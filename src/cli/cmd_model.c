/*
** cmd_model.c: `clipdb model info DIR [--json]` and
** `clipdb model fetch NAME DIR [...]`. Parsing and printing only: the work is
** clipdb_model_open / clipdb_model_get_info / clipdb_model_identity and
** clipdb_model_fetch; this file draws the progress the library reports.
*/
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"

#define CMD "model"

const char cli_model_help[] =
    "usage: clipdb model info DIR [--json] [--precision fp32|bf16|int8]\n"
    "       clipdb model fetch NAME DIR [--base-url URL] [--no-progress] [--timeout SECONDS]\n"
    "\n"
    "info   loads the model in DIR (model.safetensors or open_clip_model.safetensors,\n"
    "       and a tokenizer) and prints its architecture as inferred from the tensor\n"
    "       shapes, the weight dtype, the key naming (openai or hf) and its identity,\n"
    "       the string every stored vector is tagged with, and the digest of its\n"
    "       tokenizer (what a database also records beside the identity).\n"
    "       It also prints the encoder precision, the memory of the packed\n"
    "       (reordered) weights and the matrix backend with the instruction set it\n"
    "       dispatched to (e.g. \"onednn avx512_core_bf16\").\n"
    "         --json            one JSON object instead of aligned lines\n"
    "         --precision P     open the model in precision P (default fp32)\n"
    "\n"
    "fetch  downloads a published model from Hugging Face into DIR (created if\n"
    "       missing). NAME is a repository, ORG/NAME. Known names and their files:\n"
    "         openai/clip-vit-base-patch32\n"
    "             model.safetensors, vocab.json, merges.txt (transformers layout)\n"
    "         timm/vit_base_patch32_clip_224.openai\n"
    "         laion/CLIP-ViT-B-32-laion2B-s34B-b79K\n"
    "             open_clip_model.safetensors, and vocab.json + merges.txt where the\n"
    "             repository has them (open_clip layout)\n"
    "       Any other name: ORG 'timm' means the open_clip layout, any other ORG the\n"
    "       transformers layout. A directory without vocab.json + merges.txt needs\n"
    "       bpe_simple_vocab_16e6.txt.gz copied into it.\n"
    "         --base-url URL    a mirror with Hugging Face's URL layout\n"
    "                           (URL/NAME/resolve/main/FILE); default: $CLIPDB_HF_BASE_URL,\n"
    "                           else https://huggingface.co\n"
    "         --no-progress     print nothing while downloading\n"
    "         --timeout SECONDS give up when a transfer stays below 1 KiB/s this long\n"
    "                           (default 60; there is no limit on the total time)\n"
    "       Progress goes to stderr: a bar (percent, bytes, rate, time left) redrawn\n"
    "       in place on a terminal; otherwise (logs, pipes) a line when a file starts,\n"
    "       every 5 seconds, and when it is complete.\n"
    "\n"
    "How resume works: each file is written to DIR/FILE.part and renamed to DIR/FILE\n"
    "only once complete. If a download stops (network error, Ctrl-C), run the same\n"
    "command again: it asks the server for the rest (an HTTP Range request) and\n"
    "appends it; a server that ignores the request sends the whole file again,\n"
    "which is fine. Files already complete are skipped. Sizes are checked against\n"
    "what the server announced (a short or long transfer is an error), the\n"
    "SHA-256 of the weights against the one Hugging Face publishes, and the weights\n"
    "must parse as safetensors; a file failing either of the last two is removed.\n"
    "Two fetches into one DIR at once: the second stops at the file the first is\n"
    "writing.\n"
    "\n"
    "examples:\n"
    "  clipdb model fetch openai/clip-vit-base-patch32 models/b32\n"
    "  clipdb model fetch openai/clip-vit-base-patch32 models/b32 2> fetch.log\n"
    "  CLIPDB_HF_BASE_URL=http://mirror.local:8080 clipdb model fetch \\\n"
    "      openai/clip-vit-base-patch32 models/b32\n"
    "  clipdb model info models/b32\n"
    "  clipdb model info models/b32 --json\n"
    "\n"
    "exit status: 0 ok, 1 failure (one line on stderr), 2 bad usage.\n";

/* ---- progress drawing ------------------------------------------------------ */

typedef struct progress {
    cli_progress bar;
    char file[128];
    double t0, last_line;
    int64_t first_done;  /* bytes already there when this file's transfer began */
    int finished;
} progress;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void draw(progress *p, int64_t done, int64_t total, int final)
{
    double dt = now_s() - p->t0;
    double rate = dt > 1e-6 ? (double)(done - p->first_done) / dt : 0.0;
    const char *note = !final ? NULL : done == p->first_done ? "already complete" : "done";
    cli_progress_draw(&p->bar, p->file, done, total, rate, 1, note, final);
}

static void on_progress(void *arg, const char *file, int64_t done, int64_t total)
{
    progress *p = arg;
    double t = now_s();
    int final = total >= 0 && done == total;

    if (strncmp(p->file, file, sizeof p->file - 1) != 0) {
        cli_progress_break(&p->bar);
        snprintf(p->file, sizeof p->file, "%s", file);
        p->t0 = t;
        p->last_line = 0;
        p->first_done = done;
        p->finished = 0;
    } else if (p->finished) {
        /* The server ignored a Range request: the file starts again. */
        if (final) return;
        p->finished = 0;
    }
    if (done < p->first_done) { /* restarted from 0 */
        p->first_done = done;
        p->t0 = t;
    }
    if (final) {
        draw(p, done, total, 1);
        p->finished = 1;
        return;
    }
    /* A terminal redraws at the library's pace (about 10/s); logs get a line
    ** at the start and every 5 seconds. */
    if (p->bar.tty || p->last_line == 0 || t - p->last_line >= 5.0) {
        draw(p, done, total, 0);
        p->last_line = t;
    }
}

/* ---- subcommands ------------------------------------------------------------- */

static int model_fetch(int argc, char **argv)
{
    clipdb_fetch_options opt;
    progress prog;
    const char *pos[2] = {NULL, NULL};
    int npos = 0, i, rc, show = 1;
    char *err = NULL;

    clipdb_fetch_options_init(&opt);
    for (i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--base-url")) {
            if (++i >= argc) return cli_usage(CMD, "--base-url needs a URL");
            opt.base_url = argv[i];
        } else if (!strcmp(argv[i], "--no-progress")) {
            show = 0;
        } else if (!strcmp(argv[i], "--timeout")) {
            long long v;
            if (++i >= argc) return cli_usage(CMD, "--timeout needs a number of seconds");
            if ((rc = cli_parse_int(CMD, "--timeout", argv[i], 1, 86400, &v))) return rc;
            opt.stall_timeout_s = (long)v;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            return cli_usage(CMD, "fetch: unknown option '%s'", argv[i]);
        } else if (npos < 2) {
            pos[npos++] = argv[i];
        } else {
            return cli_usage(CMD, "fetch: too many arguments ('%s')", argv[i]);
        }
    }
    if (npos < 2) return cli_usage(CMD, "fetch needs NAME and DIR");
    memset(&prog, 0, sizeof prog);
    prog.bar.tty = isatty(STDERR_FILENO);
    if (show) {
        opt.on_progress = on_progress;
        opt.progress_arg = &prog;
    }
    rc = clipdb_model_fetch(pos[0], pos[1], &opt, &err);
    cli_progress_break(&prog.bar);
    if (rc != CLIPDB_OK) {
        cli_fail(CMD, "fetch %s: %s", pos[0], err ? err : clipdb_status_name(rc));
        clipdb_free(err);
        return CLI_FAIL;
    }
    printf("fetched %s into %s\n", pos[0], pos[1]);
    return CLI_OK;
}

static int model_info(int argc, char **argv)
{
    clipdb_model *m = NULL;
    clipdb_model_info mi;
    const char *dir = NULL, *id, *tok;
    int json = 0, i, rc = CLI_OK;
    clipdb_precision prec = CLIPDB_PRECISION_FP32;

    for (i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc) {
            if ((rc = cli_parse_precision(CMD, argv[++i], &prec)) != CLI_OK) return rc;
        }
        else if (argv[i][0] == '-' && argv[i][1])
            return cli_usage(CMD, "info: unknown option '%s'", argv[i]);
        else if (!dir) dir = argv[i];
        else return cli_usage(CMD, "info: too many arguments ('%s')", argv[i]);
    }
    if (!dir) return cli_usage(CMD, "info needs DIR");
    if (cli_open_model(CMD, dir, prec, &m) != CLI_OK) return CLI_FAIL;
    if (clipdb_model_get_info(m, &mi) != CLIPDB_OK) {
        rc = cli_fail(CMD, "%s: %s", dir, clipdb_model_errmsg(m));
        goto cleanup;
    }
    id = clipdb_model_identity(m);
    if (!id) {
        rc = cli_fail(CMD, "%s: identity: %s", dir, clipdb_model_errmsg(m));
        goto cleanup;
    }
    if (!(tok = clipdb_model_tokenizer_digest(m))) {
        rc = cli_fail(CMD, "%s: tokenizer digest: out of memory", dir);
        goto cleanup;
    }
    if (json) {
        printf("{\"dir\":");
        cli_print_json_string(stdout, dir);
        printf(",\"identity\":");
        cli_print_json_string(stdout, id);
        printf(",\"tokenizer_digest\":");
        cli_print_json_string(stdout, tok);
        printf(",\"embed_dim\":%d,\"image_size\":%d,\"patch_size\":%d,"
               "\"vision_width\":%d,\"vision_layers\":%d,\"vision_heads\":%d,"
               "\"text_width\":%d,\"text_layers\":%d,\"text_heads\":%d,"
               "\"context_length\":%d,\"vocab_size\":%d,\"key_style\":",
               mi.embed_dim, mi.image_size, mi.patch_size, mi.vision_width, mi.vision_layers,
               mi.vision_heads, mi.text_width, mi.text_layers, mi.text_heads, mi.context_length,
               mi.vocab_size);
        cli_print_json_string(stdout, mi.key_style ? mi.key_style : "");
        printf(",\"weights_dtype\":");
        cli_print_json_string(stdout, mi.weights_dtype ? mi.weights_dtype : "");
        printf(",\"weights_bytes\":%" PRIu64 ",\"precision\":", mi.weights_bytes);
        cli_print_json_string(stdout, mi.precision);
        printf(",\"compute\":");
        cli_print_json_string(stdout, mi.compute);
        printf(",\"packed_bytes\":%" PRIu64 ",\"vision_kind\":", mi.packed_bytes);
        cli_print_json_string(stdout, mi.vision_kind);
        if (!strcmp(mi.vision_kind, "resnet"))
            printf(",\"vision_stages\":[%d,%d,%d,%d]", mi.vision_stages[0], mi.vision_stages[1],
                   mi.vision_stages[2], mi.vision_stages[3]);
        printf("}\n");
    } else {
        printf("directory       %s\n", dir);
        printf("identity        %s\n", id);
        printf("tokenizer       %s\n", tok);
        printf("embedding       %d\n", mi.embed_dim);
        if (!strcmp(mi.vision_kind, "resnet")) {
            printf("image           %d x %d pixels\n", mi.image_size, mi.image_size);
            printf("vision tower    ResNet (CLIP's ModifiedResNet), width %d, bottlenecks "
                   "%d-%d-%d-%d, attention pool of %d heads over a %d x %d grid\n",
                   mi.vision_width, mi.vision_stages[0], mi.vision_stages[1],
                   mi.vision_stages[2], mi.vision_stages[3], mi.vision_heads,
                   mi.image_size / 32, mi.image_size / 32);
        } else {
            printf("image           %d x %d pixels in patches of %d x %d (a %d x %d grid)\n",
                   mi.image_size, mi.image_size, mi.patch_size, mi.patch_size,
                   mi.patch_size ? mi.image_size / mi.patch_size : 0,
                   mi.patch_size ? mi.image_size / mi.patch_size : 0);
            printf("vision tower    width %d, %d layers, %d heads\n", mi.vision_width,
                   mi.vision_layers, mi.vision_heads);
        }
        printf("text tower      width %d, %d layers, %d heads, context %d, vocabulary %d\n",
               mi.text_width, mi.text_layers, mi.text_heads, mi.context_length, mi.vocab_size);
        printf("key naming      %s\n", mi.key_style ? mi.key_style : "?");
        printf("weights         %s, %" PRIu64 " bytes\n", mi.weights_dtype ? mi.weights_dtype : "?",
               mi.weights_bytes);
        printf("precision       %s (packed weights: %" PRIu64 " bytes)\n", mi.precision,
               mi.packed_bytes);
        printf("compute         %s\n", mi.compute);
    }
cleanup:
    clipdb_model_close(m);
    return rc;
}

int cli_cmd_model(int argc, char **argv)
{
    if (argc < 2) return cli_usage(CMD, "needs a subcommand: info or fetch");
    if (!strcmp(argv[1], "fetch")) return model_fetch(argc, argv);
    if (!strcmp(argv[1], "info")) return model_info(argc, argv);
    return cli_usage(CMD, "unknown subcommand '%s' (info or fetch)", argv[1]);
}
