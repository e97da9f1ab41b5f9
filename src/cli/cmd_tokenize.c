/*
** cmd_tokenize.c: `clipdb tokenize --model DIR [--truncate] TEXT...`
** prints the CLIP token ids of each text as a JSON array, one per line.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

const char cli_tokenize_help[] =
    "usage: clipdb tokenize --model DIR [--truncate] TEXT...\n"
    "\n"
    "Prints the CLIP token ids of each TEXT as a JSON array, one line per text,\n"
    "start (49406) and end (49407) tokens included, as OpenAI's clip.tokenize\n"
    "computes them (HTML entities decoded, whitespace collapsed, lower-cased,\n"
    "byte-level BPE; ftfy's mojibake repair is not applied).\n"
    "\n"
    "options:\n"
    "  --model DIR   model directory holding bpe_simple_vocab_16e6.txt.gz, or\n"
    "                vocab.json + merges.txt (Hugging Face); no weights needed\n"
    "  --truncate    cut texts longer than the 77-token context, keeping the\n"
    "                end token last (default: such a text is an error)\n"
    "  TEXT          a text (UTF-8); '-' reads texts from standard input, one\n"
    "                per line (e.g. thousands of captions in one run)\n"
    "  --            ends the options: every later argument is a TEXT, even\n"
    "                one starting with '-'\n"
    "  -h, --help    this help\n"
    "\n"
    "An empty text, a text that is not valid UTF-8 or one over the context\n"
    "(without --truncate) stops with exit status 1 and a message naming it.\n"
    "\n"
    "example:\n"
    "  $ clipdb tokenize --model models/clip-vit-b-32 'a photo of a cat'\n"
    "  [49406,320,1125,539,320,2368,49407]\n"
    "  $ printf 'a dog\\na cat\\n' | clipdb tokenize --model models/clip-vit-b-32 -\n";

static int print_ids(clipdb_ctx *ctx, const char *text, const char *where)
{
    int32_t ids[CLIPDB_TEXT_CONTEXT];
    int n = 0, i, rc;
    rc = clipdb_tokenize(ctx, text, ids, CLIPDB_TEXT_CONTEXT, &n);
    if (rc != CLIPDB_OK)
        return cli_fail("tokenize", "%s: %s%s", where, clipdb_ctx_errmsg(ctx),
                        rc == CLIPDB_ELIMIT ? " (use --truncate to cut it)" : "");
    putchar('[');
    for (i = 0; i < n; i++) printf(i ? ",%d" : "%d", (int)ids[i]);
    fputs("]\n", stdout);
    return CLI_OK;
}

/* Texts from stdin, one per line (the newline is not part of the text).
** A line is read in full only up to the text limit; longer is an error. */
static int tokenize_stdin(clipdb_ctx *ctx)
{
    size_t cap = (size_t)CLIPDB_MAX_TEXT_BYTES + 2, line_no = 0;
    char *buf = malloc(cap), where[64];
    int rc = CLI_OK;
    if (!buf) return cli_fail("tokenize", "out of memory");
    while (fgets(buf, (int)cap, stdin)) {
        size_t len = strlen(buf);
        line_no++;
        snprintf(where, sizeof where, "stdin line %zu", line_no);
        if (len > 0 && buf[len - 1] == '\n') buf[--len] = '\0';
        else if (len == cap - 1) {
            rc = cli_fail("tokenize", "%s: longer than %u bytes", where, CLIPDB_MAX_TEXT_BYTES);
            break;
        }
        rc = print_ids(ctx, buf, where);
        if (rc != CLI_OK) break;
    }
    if (rc == CLI_OK && ferror(stdin)) rc = cli_fail("tokenize", "error reading standard input");
    free(buf);
    return rc;
}

int cli_cmd_tokenize(int argc, char **argv)
{
    const char *dir = NULL;
    int truncate = 0, first_text, i, rc = CLI_OK, n_texts = 0;
    clipdb_model *m = NULL;
    clipdb_ctx *ctx = NULL;
    char where[32];

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model")) {
            if (++i >= argc) return cli_usage("tokenize", "--model needs a directory");
            dir = argv[i];
        } else if (!strcmp(argv[i], "--truncate")) {
            truncate = 1;
        } else if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            return cli_usage("tokenize", "unknown option '%s'", argv[i]);
        } else {
            break;
        }
    }
    first_text = i;
    if (!dir) return cli_usage("tokenize", "--model DIR is required");
    if (first_text >= argc) return cli_usage("tokenize", "no TEXT given");

    if (clipdb_model_open_tokenizer(&m, dir) != CLIPDB_OK) {
        rc = cli_fail("tokenize", "%s", clipdb_model_errmsg(m));
        goto cleanup;
    }
    if (clipdb_ctx_new(&ctx, m) != CLIPDB_OK) {
        rc = cli_fail("tokenize", "%s", clipdb_ctx_errmsg(ctx));
        goto cleanup;
    }
    clipdb_ctx_set_truncate(ctx, truncate);
    for (i = first_text; i < argc && rc == CLI_OK; i++) {
        n_texts++;
        if (!strcmp(argv[i], "-")) {
            rc = tokenize_stdin(ctx);
        } else {
            snprintf(where, sizeof where, "text %d", n_texts);
            rc = print_ids(ctx, argv[i], where);
        }
    }
cleanup:
    if (fflush(stdout) != 0 && rc == CLI_OK) rc = cli_fail("tokenize", "cannot write output");
    clipdb_ctx_free(ctx);
    clipdb_model_close(m);
    return rc;
}
