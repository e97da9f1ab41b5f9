/*
** cmd_embed.c: `clipdb embed`: prints the CLIP embeddings of texts and
** images. Parsing and printing only; the work is clipdb_encode_batch.
*/
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "core/core.h" /* cdb_grow */

typedef struct input {
    int is_image;
    char *s;  /* text or path, owned */
} input;

typedef struct inputs {
    input *v;
    int n;
    size_t cap;
} inputs;

static int add_input(inputs *in, int is_image, const char *s, size_t len)
{
    if (in->n == INT_MAX || cdb_grow((void **)&in->v, &in->cap, (size_t)in->n + 1, sizeof *in->v))
        return -1;
    in->v[in->n].is_image = is_image;
    in->v[in->n].s = malloc(len + 1);
    if (!in->v[in->n].s) return -1;
    memcpy(in->v[in->n].s, s, len);
    in->v[in->n].s[len] = 0;
    in->n++;
    return 0;
}

/* Adds one input per non-blank line of path ("-" is stdin); CR LF accepted. */
static int add_from_file(const char *cmd, inputs *in, int is_image, const char *path)
{
    FILE *f = strcmp(path, "-") ? cli_fopen_regular(cmd, path) : stdin;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int rc = CLI_OK;
    if (!f) return CLI_FAIL;
    while ((len = getline(&line, &cap, f)) >= 0) {
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) len--;
        if (len == 0) continue;
        if (add_input(in, is_image, line, (size_t)len)) {
            rc = cli_fail(cmd, "out of memory");
            break;
        }
    }
    if (rc == CLI_OK && ferror(f)) rc = cli_fail(cmd, "error reading %s", path);
    free(line);
    if (f != stdin) fclose(f);
    return rc;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A short, printable excerpt of a text for error messages. */
static void excerpt(const char *s, char *buf, size_t cap)
{
    size_t n = strlen(s);
    if (n + 1 <= cap) {
        memcpy(buf, s, n + 1);
        return;
    }
    snprintf(buf, cap, "%.*s...", (int)(cap - 4), s);
}

/* Encodes the n inputs of one kind with the one batched call; the first
** input that failed is named (texts by an excerpt, images by the path that
** starts the library's message) and fails the command. */
static int encode(const char *cmd, clipdb_ctx *c, clipdb_input_kind kind, const char **items,
                  int n, float *out)
{
    clipdb_item_status *st;
    int i, n_failed = 0, rc = CLI_OK;
    if (n == 0) return CLI_OK;
    st = calloc((size_t)n, sizeof *st);
    if (!st) return cli_fail(cmd, "out of memory");
    if (clipdb_encode_batch(c, kind, items, n, out, st, &n_failed) != CLIPDB_OK) {
        rc = cli_fail(cmd, "%s", clipdb_ctx_errmsg(c));
        goto cleanup;
    }
    for (i = 0; n_failed && i < n; i++) {
        if (st[i].code == CLIPDB_OK) continue;
        if (kind == CLIPDB_INPUT_IMAGE_FILE) {
            rc = cli_fail(cmd, "%s", st[i].msg);
        } else {
            char ex[64];
            excerpt(items[i], ex, sizeof ex);
            fprintf(stderr, "clipdb %s: text ", cmd);
            cli_print_json_string(stderr, ex);
            fprintf(stderr, ": %s%s\n", st[i].msg,
                    st[i].code == CLIPDB_ELIMIT ? " (use --truncate to cut it)" : "");
            rc = CLI_FAIL;
        }
        break;
    }
cleanup:
    free(st);
    return rc;
}

static void print_readable(const input *in, const float *v, int dim)
{
    double norm = 0;
    int i, show = dim < 6 ? dim : 6;
    for (i = 0; i < dim; i++) norm += (double)v[i] * v[i];
    printf("%-5s ", in->is_image ? "image" : "text");
    cli_print_json_string(stdout, in->s);
    printf("\n      dim %d  norm %.6f  [", dim, sqrt(norm));
    for (i = 0; i < show; i++) printf("%s%.6f", i ? ", " : "", (double)v[i]);
    printf("%s]\n", show < dim ? ", ..." : "");
}

int cli_cmd_embed(int argc, char **argv)
{
    const char *cmd = "embed", *model_dir = NULL;
    int json = 0, stats = 0, truncate = 0, i, rc = CLI_OK, dim, n_text = 0, n_img = 0, k;
    inputs in = {0};
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    clipdb_model_info info;
    float *emb = NULL, *stage = NULL;
    const char **texts = NULL, **paths = NULL;
    int *text_slot = NULL, *img_slot = NULL;
    double t0, t_text = 0, t_img = 0;
    clipdb_precision prec = CLIPDB_PRECISION_FP32;
    clipdb_device dev = CLIPDB_DEVICE_CPU;
    clipdb_precision vprec = CLIPDB_PRECISION_FP32;

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;
        if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "--truncate")) truncate = 1;
        else if (!strcmp(a, "--stats")) stats = 1;
        else if (!strcmp(a, "--model") && has_val) model_dir = argv[++i];
        else if (!strcmp(a, "--device") && has_val) {
            if ((rc = cli_parse_device(cmd, argv[++i], &dev, &vprec)) != CLI_OK) goto cleanup;
        }
        else if (!strcmp(a, "--precision") && has_val) {
            if ((rc = cli_parse_precision(cmd, argv[++i], &prec)) != CLI_OK) goto cleanup;
        } else if ((!strcmp(a, "--text") || !strcmp(a, "--image")) && has_val) {
            if (add_input(&in, a[2] == 'i', argv[i + 1], strlen(argv[i + 1]))) {
                rc = cli_fail(cmd, "out of memory");
                goto cleanup;
            }
            i++;
        } else if ((!strcmp(a, "--texts-from") || !strcmp(a, "--images-from")) && has_val) {
            if ((rc = add_from_file(cmd, &in, a[2] == 'i', argv[++i])) != CLI_OK) goto cleanup;
        } else if (!strncmp(a, "--", 2) &&
                   (!strcmp(a, "--model") || !strcmp(a, "--precision") || !strcmp(a, "--device") ||
                    !strcmp(a, "--text") || !strcmp(a, "--image") ||
                    !strcmp(a, "--texts-from") || !strcmp(a, "--images-from"))) {
            rc = cli_usage(cmd, "%s needs a value", a);
            goto cleanup;
        } else {
            rc = cli_usage(cmd, "unknown argument '%s'", a);
            goto cleanup;
        }
    }
    if (!model_dir) {
        rc = cli_usage(cmd, "--model DIR is required");
        goto cleanup;
    }
    if (in.n == 0) {
        rc = cli_usage(cmd, "nothing to embed: give --text, --image, --texts-from or --images-from");
        goto cleanup;
    }
    if ((rc = cli_open_model(cmd, model_dir, prec, &m)) != CLI_OK) goto cleanup;
    if (clipdb_ctx_new(&c, m) != CLIPDB_OK) {
        rc = cli_fail(cmd, "%s", clipdb_ctx_errmsg(c));
        goto cleanup;
    }
    clipdb_ctx_set_truncate(c, truncate);
    if (dev != CLIPDB_DEVICE_CPU && clipdb_ctx_set_device(c, dev) != CLIPDB_OK) {
        rc = cli_fail(cmd, "%s", clipdb_ctx_errmsg(c));
        goto cleanup;
    }
    clipdb_model_get_info(m, &info);
    dim = info.embed_dim;
    emb = malloc((size_t)in.n * dim * sizeof *emb);
    texts = malloc((size_t)in.n * sizeof *texts);
    text_slot = malloc((size_t)in.n * sizeof *text_slot);
    img_slot = malloc((size_t)in.n * sizeof *img_slot);
    paths = malloc((size_t)in.n * sizeof *paths);
    stage = malloc((size_t)in.n * dim * sizeof *stage);
    if (!emb || !texts || !paths || !text_slot || !img_slot || !stage) {
        rc = cli_fail(cmd, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < in.n; i++) {
        if (in.v[i].is_image) {
            img_slot[n_img] = i;
            paths[n_img++] = in.v[i].s;
        } else {
            text_slot[n_text] = i;
            texts[n_text++] = in.v[i].s;
        }
    }

    /* each kind in one batched call, results into a staging area then their slots */
    t0 = now_s();
    if ((rc = encode(cmd, c, CLIPDB_INPUT_TEXT, texts, n_text, stage)) != CLI_OK) goto cleanup;
    for (k = 0; k < n_text; k++)
        memcpy(emb + (size_t)text_slot[k] * dim, stage + (size_t)k * dim, (size_t)dim * sizeof *stage);
    t_text = now_s() - t0;
    t0 = now_s();
    if ((rc = encode(cmd, c, CLIPDB_INPUT_IMAGE_FILE, paths, n_img, stage)) != CLI_OK)
        goto cleanup;
    for (k = 0; k < n_img; k++)
        memcpy(emb + (size_t)img_slot[k] * dim, stage + (size_t)k * dim, (size_t)dim * sizeof *stage);
    t_img = now_s() - t0;

    for (i = 0; i < in.n; i++) {
        const float *v = emb + (size_t)i * dim;
        if (json) {
            printf("{\"type\": \"%s\", \"input\": ", in.v[i].is_image ? "image" : "text");
            cli_print_json_string(stdout, in.v[i].s);
            printf(", \"embedding\": ");
            cli_print_floats_json(stdout, v, dim);
            printf("}\n");
        } else {
            print_readable(&in.v[i], v, dim);
        }
    }
    if (fflush(stdout) != 0) rc = cli_fail(cmd, "error writing the output");
    if (stats) {
        if (n_text)
            fprintf(stderr, "texts: %d in %.3f s (%.1f/s)\n", n_text, t_text, n_text / t_text);
        if (n_img)
            fprintf(stderr, "images: %d in %.3f s (%.2f/s, decode + preprocess + encode)\n", n_img,
                    t_img, n_img / t_img);
    }
cleanup:
    for (i = 0; i < in.n; i++) free(in.v[i].s);
    free(in.v);
    free(emb);
    free(texts);
    free(text_slot);
    free(img_slot);
    free(paths);
    free(stage);
    clipdb_ctx_free(c);
    clipdb_model_close(m);
    return rc;
}

const char cli_embed_help[] =
    "usage: clipdb embed --model DIR [--text T]... [--image PATH]... [options]\n"
    "\n"
    "Prints the CLIP embedding (the projected vector, not normalised) of each\n"
    "text and image, in the order given.\n"
    "\n"
    "options:\n"
    "  --model DIR          model directory (model.safetensors + tokenizer files)\n"
    "  --text T             a text to embed (repeatable)\n"
    "  --image PATH         an image file to embed: JPEG, PNG, WebP, BMP, GIF (repeatable)\n"
    "  --texts-from FILE    texts, one per line (blank lines skipped; '-' is stdin)\n"
    "  --images-from FILE   image paths, one per line\n"
    "  --json               one JSON object per line:\n"
    "                       {\"type\": \"text\"|\"image\", \"input\": \"...\", \"embedding\": [...]}\n"
    "  --truncate           cut texts longer than " CLI_STR(CLIPDB_TEXT_CONTEXT)
    " tokens (as CLIP's truncate=True)\n"
    "                       instead of failing\n"
    "  --stats              print counts and throughput on stderr\n"
    "  --precision P        encoder precision: fp32 (default, exact), bf16 (bf16\n"
    "                       inputs and weights, fp32 accumulation) or int8 (weights\n"
    "                       per output channel, activations per token)\n"
    "  --device D           encode on cpu (default), cuda or auto (the GPU when\n"
    "                       present), in the --precision given (fp32, or bf16 on\n"
    "                       the tensor cores)\n"
    "\n"
    "Texts are encoded in one batch, images likewise (decoded and encoded in groups).\n"
    "A text that is empty, not UTF-8 or too long, or an image that cannot be read,\n"
    "fails the command with a message naming it (exit 1).\n"
    "\n"
    "example:\n"
    "  clipdb embed --model models/clip-vit-b-32 --text \"a photo of a cat\" \\\n"
    "      --image cat.jpg --json\n";
