/*
** cmd_train.c: `clipdb finetune` and `clipdb train`. Parsing and printing
** only; the work is clipdb_finetune / clipdb_train (src/train/loop.c).
** Ctrl-C (SIGINT) asks the loop to stop: it writes a checkpoint and the
** command exits 130; the same command line resumes.
*/
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"

#define COMMON_OPTIONS_HELP                                                                \
    "  --out DIR            the model directory to write (refused if it exists)\n"         \
    "  --force              replace an existing --out\n"                                   \
    "  --epochs N           passes over the training pairs\n"                              \
    "  --batch N            pairs per step; each epoch drops the remainder: P pairs\n"     \
    "                       make floor(P / N) steps, fewer than N pairs is an error\n"     \
    "  --micro-batch N      pairs per forward/backward pass (exact gradient\n"             \
    "                       accumulation for batches larger than memory); 0 = batch\n"     \
    "  --lr X  --wd X  --betas B1,B2  --eps X\n"                                           \
    "                       AdamW (as torch.optim.AdamW; no decay on gains, biases,\n"     \
    "                       the class embedding and logit_scale)\n"                        \
    "  --warmup STEPS       linear warm-up steps (default 0)\n"                            \
    "  --schedule S         constant or cosine (decay to 0 at the last step)\n"            \
    "  --clip-grad NORM     clip the global gradient norm (default: off)\n"                \
    "  --label-smoothing E  in [0, 1): each direction's cross-entropy aims at 1 - E\n"     \
    "                       on the right pair and E / N on each of the batch's N\n"       \
    "                       (torch's label_smoothing); default 0, the paper's loss\n"    \
    "  --ema D              keep an exponential moving average of the weights,\n"        \
    "                       decay D in [0, 1) (e.g. 0.998; warmed up as\n"                \
    "                       min(D, (1 + t) / (10 + t)) after step t); validation\n"      \
    "                       measures it and it is the model written. Default: none\n"   \
    "  --captions-per-image K\n"                                                           \
    "                       pair each image of a step with K of its captions (the\n"     \
    "                       drawn one and the next K - 1, round again if it has\n"      \
    "                       fewer); the loss is the mean over the K of the image-\n"    \
    "                       caption loss, the text tower runs on K x batch texts.\n"    \
    "                       1..16, default 1 (the paper's one caption a step)\n"       \
    "  --train WHAT         all | proj (the two projections and the temperature) |\n"      \
    "                       last:N (the last N blocks of each tower, the final layer\n"    \
    "                       norms, projections and temperature); default all\n"            \
    "  --seed N             data order, caption choice, augmentation and\n"                \
    "                       initialisation (default 0)\n"                                  \
    "  --checkpoint-every N steps between checkpoints (default: each epoch)\n"             \
    "  --dtype T            F32, F16 or BF16 for the written weights\n"                    \
    "  --precision P        fp32 (default) or bf16: the GEMMs of each step take\n"       \
    "                       bf16 inputs and sum in fp32 (oneDNN; AVX-512 BF16 where\n"   \
    "                       the CPU has it); weights and optimizer state stay fp32\n"    \
    "  --progress-every S   seconds between progress lines when stderr is not a\n"         \
    "                       terminal (default 5; on a terminal one updating line)\n"       \
    "  -q, --quiet          no progress output\n"

#define RESUME_HELP                                                                        \
    "Checkpoints go to OUT.ckpt/ (weights, AdamW state, step, data order). A run\n"        \
    "stopped with Ctrl-C (it writes a checkpoint, exit status 130) or killed\n"            \
    "resumes from its last checkpoint when the SAME command is run again, and ends\n"      \
    "with the same weights as an uninterrupted run. OUT.ckpt is removed once OUT\n"        \
    "is written. The written directory holds model.safetensors, the tokenizer and\n"       \
    "clipdb_made.json (command, seed, data, steps, date); every command loads it.\n"       \
    "\n"                                                                                   \
    "Exit status: 0 done, 1 failure (message on stderr), 2 bad usage, 130 stopped.\n"

const char cli_finetune_help[] =
    "usage: clipdb finetune DB --model DIR --out DIR2 [options]\n"
    "\n"
    "Fine-tunes the CLIP model in DIR on the image-caption pairs of database DB:\n"
    "the images of --split that have captions (added with 'clipdb add --images\n"
    "... --captions ...'); each step draws one caption per image (more with\n"
    "--captions-per-image). No augmentation.\n"
    "Defaults are the paper's fine-tuning settings: AdamW lr 5e-8, weight decay\n"
    "1e-3, betas 0.9,0.999, eps 1e-8, constant rate, no warm-up, no clipping,\n"
    "5 epochs, batch 32. The weights are written in DIR's key convention (OpenAI\n"
    "or Hugging Face names) and dtype unless --dtype says otherwise.\n"
    "\n"
    "options:\n"
    "  --model DIR          the model to start from (required)\n"
    "  --split NAME         images whose metadata field split is NAME (default\n"
    "                       train); 'all' takes every captioned image\n" COMMON_OPTIONS_HELP
    "\n" RESUME_HELP
    "\n"
    "examples:\n"
    "  clipdb finetune photos.db --model models/clip --out models/clip-ft --split train2017\n"
    "  clipdb finetune photos.db --model models/clip --out ft --lr 1e-5 --schedule cosine \\\n"
    "      --warmup 20 --train last:2 --epochs 10\n";

const char cli_train_help[] =
    "usage: clipdb train --images DIR --captions FILE --out DIR2 --arch SPEC\n"
    "                    --tokenizer DIR [options]\n"
    "\n"
    "Trains a CLIP from scratch on the images under DIR and their captions in FILE\n"
    "(the captions formats of 'clipdb add'), with CLIP's initialisation,\n"
    "random-resized-crop (area 0.5-1 unless --crop-min, aspect 3/4-4/3) and\n"
    "horizontal-flip augmentation, and a held-out validation split whose\n"
    "text->image and image->text recall at 1, 5 and 10 is printed after each\n"
    "epoch. Weights are written in OpenAI key names (F32 unless --dtype).\n"
    "Defaults follow the CLIP paper: lr 5e-4, weight decay 0.2, betas 0.9,0.98,\n"
    "eps 1e-6, cosine schedule; no warm-up (give --warmup), 5 epochs, batch 32.\n"
    "\n"
    "options:\n"
    "  --images DIR         folder of images (names as in the captions file)\n"
    "  --captions FILE      their captions\n"
    "  --tokenizer DIR      a directory with CLIP's BPE files\n"
    "                       (bpe_simple_vocab_16e6.txt.gz, or vocab.json + merges.txt)\n"
    "  --arch SPEC          the architecture, three parts separated by ';':\n"
    "                       vit:image=S,patch=P,width=W,layers=L[,heads=H]\n"
    "                       text:width=W,layers=L[,heads=H][,context=C]\n"
    "                       embed=E\n"
    "                       S a multiple of P; widths multiples of 64 (heads are\n"
    "                       width/64 as in CLIP: a given heads must agree); MLP 4W;\n"
    "                       context default 77; e.g. \"vit:image=64,patch=8,\n"
    "                       width=192,layers=6;text:width=256,layers=4;embed=256\"\n"
    "                       The image tower may instead be CLIP's ModifiedResNet\n"
    "                       (as RN50: layers=3.4.6.3, width 64, image 224):\n"
    "                       rn:image=S,width=W,layers=A.B.C.D\n"
    "                       S a multiple of 32, W even; A-D bottlenecks per stage;\n"
    "                       its batch norms train on each batch's statistics\n"
    "  --split NAME         train on the entries whose split field is NAME\n"
    "  --val-split NAME     validate on the entries whose split field is NAME\n"
    "  --val FRACTION       without --val-split: hold out this share of the\n"
    "                       images, drawn with the seed (default 0.1)\n"
    "  --val-max N          at most N held-out images (default 1000)\n"
    "  --no-augment         plain CLIP preprocessing (centre crop)\n"
    "  --crop-min A         the smallest random crop, as a share of the image's\n"
    "                       area, in (0, 1] (default 0.5; smaller augments more,\n"
    "                       which a small data set needs for longer runs)\n"
    "  --text-drop P        drop each token of a caption with probability P in\n"
    "                       [0, 1) (at least one kept; default 0): augmentation of\n"
    "                       the text side, against learning captions by rare words\n"
    "  --patch-drop P       patch dropout (open_clip's patch_dropout): each step an\n"
    "                       image keeps floor(np * (1 - P)) of its np patches\n"
    "                       (at least one), drawn with the seed, and the image\n"
    "                       tower runs on those only: faster steps, a regulariser\n"
    "                       of the image side; inference sees every patch.\n"
    "                       In [0, 1), default 0\n" COMMON_OPTIONS_HELP
    "\n" RESUME_HELP
    "\n"
    "examples:\n"
    "  clipdb train --images flickr8k/images --captions flickr8k/captions.jsonl \\\n"
    "      --split train --val-split dev --tokenizer models/clip --out models/mine \\\n"
    "      --arch \"vit:image=64,patch=8,width=192,layers=6;text:width=256,layers=4;embed=256\" \\\n"
    "      --epochs 25 --batch 128 --warmup 200\n";

/* ---- progress and Ctrl-C ---------------------------------------------------- */

typedef struct progress_state {
    const char *cmd;
    int tty, quiet, drawn;
    double every, last;
} progress_state;

static void fmt_eta(double s, char *buf, size_t n)
{
    long t = s > 0 && s < 1e9 ? (long)(s + 0.5) : 0;
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static void end_line(progress_state *ps)
{
    if (ps->drawn) {
        fputc('\n', stderr);
        ps->drawn = 0;
    }
}

static int on_progress(void *arg, const clipdb_train_progress *p)
{
    progress_state *ps = arg;
    char eta[32];
    if (ps->quiet) return cli_interrupted();
    fmt_eta(p->eta_s, eta, sizeof eta);
    if (!strcmp(p->event, "step")) {
        if (ps->tty) {
            fprintf(stderr,
                    "\repoch %d/%d  step %ld/%ld  loss %.4f  lr %.3g  %.1f pairs/s  ETA %s   ",
                    p->epoch, p->epochs, p->step, p->total_steps, (double)p->loss,
                    (double)p->lr, p->pairs_per_s, eta);
            ps->drawn = 1;
        } else if (p->elapsed_s - ps->last >= ps->every || p->step == p->total_steps) {
            fprintf(stderr, "epoch %d/%d step %ld/%ld loss %.4f lr %.3g %.1f pairs/s ETA %s\n",
                    p->epoch, p->epochs, p->step, p->total_steps, (double)p->loss,
                    (double)p->lr, p->pairs_per_s, eta);
            ps->last = p->elapsed_s;
        }
    } else if (!strcmp(p->event, "epoch")) {
        end_line(ps);
        fprintf(stderr, "epoch %d/%d done: mean loss %.4f", p->epoch, p->epochs, (double)p->loss);
        if (p->val_t2i[0] >= 0)
            fprintf(stderr,
                    "; validation (%ld images) text->image R@1/5/10 %.1f/%.1f/%.1f%%, "
                    "image->text %.1f/%.1f/%.1f%%",
                    p->val_pairs, 100.0 * p->val_t2i[0], 100.0 * p->val_t2i[1],
                    100.0 * p->val_t2i[2], 100.0 * p->val_i2t[0], 100.0 * p->val_i2t[1],
                    100.0 * p->val_i2t[2]);
        if (p->val_raw_t2i[0] >= 0)
            fprintf(stderr,
                    " (the average of the weights); the weights as trained: text->image "
                    "R@1/5/10 %.1f/%.1f/%.1f%%, image->text %.1f/%.1f/%.1f%%",
                    100.0 * p->val_raw_t2i[0], 100.0 * p->val_raw_t2i[1],
                    100.0 * p->val_raw_t2i[2], 100.0 * p->val_raw_i2t[0],
                    100.0 * p->val_raw_i2t[1], 100.0 * p->val_raw_i2t[2]);
        fputc('\n', stderr);
    } else if (!strcmp(p->event, "start")) {
        fprintf(stderr, "%s: %ld pairs per epoch, %d steps per epoch, %ld steps\n", ps->cmd,
                p->pairs, p->steps_per_epoch, p->total_steps);
    } else if (!strcmp(p->event, "resume")) {
        fprintf(stderr, "%s: resuming from %s at step %ld of %ld\n", ps->cmd, p->path, p->step,
                p->total_steps);
    } else if (!strcmp(p->event, "checkpoint") && !ps->tty) {
        fprintf(stderr, "checkpoint at step %ld: %s\n", p->step, p->path);
    }
    fflush(stderr);
    return cli_interrupted();
}

/* ---- options --------------------------------------------------------------- */

/* A float for the half-open ranges cli_parse_double cannot say (--val,
** --betas); the caller checks the range and names it. */
static int num_float(const char *s, float *out)
{
    char *end;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (errno || *end || end == s || !(v == v) || v > 1e30 || v < -1e30) return -1;
    *out = (float)v;
    return 0;
}

/* Parses one option shared by both commands at argv[*i]; 1 if it was one,
** 0 if not, -1 on a bad value (usage printed). */
static int common_option(const char *cmd, int argc, char **argv, int *i,
                         clipdb_train_options *o, progress_state *ps, const char **out)
{
    const char *a = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    long long n;
    double d;
    if (!strcmp(a, "--force")) return o->force = 1;
    if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) return ps->quiet = 1;
    if (!v) return 0;
#define TAKE (++*i, 1)
    if (!strcmp(a, "--out")) return *out = v, TAKE;
    if (!strcmp(a, "--epochs")) {
        if (cli_parse_int(cmd, a, v, 1, 1000000, &n)) return -1;
        return o->epochs = (int)n, TAKE;
    }
    if (!strcmp(a, "--batch")) {
        if (cli_parse_int(cmd, a, v, 2, 65536, &n)) return -1;
        return o->batch = (int)n, TAKE;
    }
    if (!strcmp(a, "--micro-batch")) {
        if (cli_parse_int(cmd, a, v, 0, 65536, &n)) return -1;
        return o->micro_batch = (int)n, TAKE;
    }
    if (!strcmp(a, "--label-smoothing")) {
        if (cli_parse_double(cmd, a, v, 0, 0.999999, &d)) return -1;
        return o->label_smoothing = (float)d, TAKE;
    }
    if (!strcmp(a, "--captions-per-image")) {
        if (cli_parse_int(cmd, a, v, 1, 16, &n)) return -1;
        return o->captions_per_image = (int)n, TAKE;
    }
    if (!strcmp(a, "--ema")) {
        if (cli_parse_double(cmd, a, v, 0, 0.999999, &d)) return -1;
        return o->ema = (float)d, TAKE;
    }
    if (!strcmp(a, "--lr") || !strcmp(a, "--wd") || !strcmp(a, "--eps") ||
        !strcmp(a, "--clip-grad")) {
        float *slot = !strcmp(a, "--lr") ? &o->lr : !strcmp(a, "--wd") ? &o->wd
                      : !strcmp(a, "--eps") ? &o->eps : &o->clip_grad;
        if (cli_parse_double(cmd, a, v, 0, 1e30, &d)) return -1;
        return *slot = (float)d, TAKE;
    }
    if (!strcmp(a, "--betas")) {
        char buf[64], *comma;
        snprintf(buf, sizeof buf, "%s", v);
        comma = strchr(buf, ',');
        if (!comma) return cli_usage(cmd, "--betas needs B1,B2 (e.g. 0.9,0.999)"), -1;
        *comma = 0;
        if (num_float(buf, &o->beta1) || num_float(comma + 1, &o->beta2) || o->beta1 < 0 ||
            o->beta1 >= 1 || o->beta2 < 0 || o->beta2 >= 1)
            return cli_usage(cmd, "--betas needs B1,B2 in [0, 1) (e.g. 0.9,0.999)"), -1;
        return TAKE;
    }
    if (!strcmp(a, "--warmup")) {
        if (cli_parse_int(cmd, a, v, 0, 100000000, &n)) return -1;
        return o->warmup = (int)n, TAKE;
    }
    if (!strcmp(a, "--schedule")) {
        if (strcmp(v, "constant") && strcmp(v, "cosine"))
            return cli_usage(cmd, "--schedule is constant or cosine"), -1;
        return o->schedule = v, TAKE;
    }
    if (!strcmp(a, "--train")) return o->train = v, TAKE;
    if (!strcmp(a, "--seed")) {
        char *end;
        errno = 0;
        o->seed = strtoull(v, &end, 10);
        if (errno || *end || end == v || *v == '-')
            return cli_usage(cmd, "--seed needs a non-negative integer"), -1;
        return TAKE;
    }
    if (!strcmp(a, "--checkpoint-every")) {
        if (cli_parse_int(cmd, a, v, 0, 100000000, &n)) return -1;
        return o->checkpoint_every = (int)n, TAKE;
    }
    if (!strcmp(a, "--dtype")) {
        if (strcmp(v, "F32") && strcmp(v, "F16") && strcmp(v, "BF16"))
            return cli_usage(cmd, "--dtype is F32, F16 or BF16"), -1;
        return o->out_dtype = v, TAKE;
    }
    if (!strcmp(a, "--precision")) {
        if (strcmp(v, "fp32") && strcmp(v, "bf16"))
            return cli_usage(cmd, "--precision is fp32 or bf16"), -1;
        return o->precision = v, TAKE;
    }
    if (!strcmp(a, "--progress-every")) {
        if (cli_parse_double(cmd, a, v, 0.01, 3600, &d)) return -1;
        return ps->every = d, TAKE;
    }
#undef TAKE
    return 0;
}

static void command_line(int argc, char **argv, char *buf, size_t n)
{
    size_t at = (size_t)snprintf(buf, n, "clipdb");
    int i;
    for (i = 0; i < argc && at < n; i++) {
        const char *s = argv[i];
        at += (size_t)snprintf(buf + at, n - at, " ");
        /* JSON-safe and shell-readable: quote arguments with odd characters */
        if (strpbrk(s, " \t;\"\\'$*?()[]{}<>|&") || !*s) {
            at += (size_t)snprintf(buf + at, n - at, "'");
            for (; *s && at < n; s++)
                if (*s != '"' && *s != '\\' && (unsigned char)*s >= 0x20)
                    at += (size_t)snprintf(buf + at, n - at, "%c", *s);
            at += (size_t)snprintf(buf + at, n - at, "'");
        } else {
            for (; *s && at < n; s++)
                if (*s != '"' && *s != '\\' && (unsigned char)*s >= 0x20)
                    at += (size_t)snprintf(buf + at, n - at, "%c", *s);
        }
    }
}

/* What both commands call: clipdb_finetune(db, model, out, ...) or
** clipdb_train(images, captions, out, ...). */
typedef int (*train_fn)(const char *a, const char *b, const char *out,
                        const clipdb_train_options *o, char **errmsg);

/* The rest of both commands once their options are parsed: records the
** command line, runs fn(a, b, out) with progress and Ctrl-C handling, and
** prints the outcome. */
static int run_training(const char *cmd, int argc, char **argv, train_fn fn, const char *a,
                        const char *b, const char *out, clipdb_train_options *o,
                        progress_state *ps)
{
    char *err = NULL, cmdline[4096];
    int rc;
    command_line(argc, argv, cmdline, sizeof cmdline);
    o->command = cmdline;
    ps->tty = isatty(2);
    o->progress = on_progress;
    o->progress_arg = ps;
    cli_catch_sigint();
    rc = fn(a, b, out, o, &err);
    end_line(ps);
    signal(SIGINT, SIG_DFL);
    if (rc == CLIPDB_ESTOPPED) {
        fprintf(stderr, "clipdb %s: %s; run the same command to resume\n", cmd,
                err ? err : "stopped");
        clipdb_free(err);
        return CLI_INTERRUPTED;
    }
    if (rc != CLIPDB_OK) {
        int ret = cli_fail(cmd, "%s", err ? err : clipdb_status_name(rc));
        clipdb_free(err);
        return ret;
    }
    printf("wrote %s\n", out);
    return CLI_OK;
}

int cli_cmd_finetune(int argc, char **argv)
{
    const char *db = NULL, *model = NULL, *out = NULL;
    clipdb_train_options o;
    progress_state ps = {"finetune", 0, 0, 0, 5.0, -1e9};
    int i;

    clipdb_train_options_init(&o);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc, c = common_option("finetune", argc, argv, &i, &o, &ps, &out);
        if (c < 0) return CLI_USAGE;
        if (c) continue;
        if (!strcmp(a, "--model") && has) model = argv[++i];
        else if (!strcmp(a, "--split") && has) {
            o.split = argv[++i];
            if (!strcmp(o.split, "all")) o.split = NULL;
        } else if (a[0] == '-' && a[1])
            return cli_usage("finetune", "unknown option or missing value '%s'", a);
        else if (!db) db = a;
        else return cli_usage("finetune", "unexpected argument '%s'", a);
    }
    if (!db) return cli_usage("finetune", "no database file given");
    if (!model) return cli_usage("finetune", "no --model DIR given");
    if (!out) return cli_usage("finetune", "no --out DIR given");
    return run_training("finetune", argc, argv, clipdb_finetune, db, model, out, &o, &ps);
}

int cli_cmd_train(int argc, char **argv)
{
    const char *images = NULL, *captions = NULL, *out = NULL;
    clipdb_train_options o;
    progress_state ps = {"train", 0, 0, 0, 5.0, -1e9};
    long long n;
    int i, rc;

    clipdb_train_options_init(&o);
    /* from scratch: the CLIP paper's optimizer settings */
    o.split = NULL;
    o.lr = 5e-4f;
    o.wd = 0.2f;
    o.beta2 = 0.98f;
    o.eps = 1e-6f;
    o.schedule = "cosine";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc, c = common_option("train", argc, argv, &i, &o, &ps, &out);
        if (c < 0) return CLI_USAGE;
        if (c) continue;
        if (!strcmp(a, "--images") && has) images = argv[++i];
        else if (!strcmp(a, "--captions") && has) captions = argv[++i];
        else if (!strcmp(a, "--arch") && has) o.arch = argv[++i];
        else if (!strcmp(a, "--tokenizer") && has) o.tokenizer_dir = argv[++i];
        else if (!strcmp(a, "--split") && has) o.split = argv[++i];
        else if (!strcmp(a, "--val-split") && has) o.val_split = argv[++i];
        else if (!strcmp(a, "--val") && has) {
            if (num_float(argv[++i], &o.val_fraction) || o.val_fraction < 0 ||
                o.val_fraction >= 1)
                return cli_usage("train", "--val needs a fraction in [0, 1)");
        } else if (!strcmp(a, "--val-max") && has) {
            if ((rc = cli_parse_int("train", a, argv[++i], 0, 1000000, &n)) != CLI_OK) return rc;
            o.val_max = (int)n;
        } else if (!strcmp(a, "--no-augment")) o.augment = 0;
        else if (!strcmp(a, "--crop-min") && has) {
            if (num_float(argv[++i], &o.crop_min) || !(o.crop_min > 0) || o.crop_min > 1)
                return cli_usage("train", "--crop-min needs a share of the area in (0, 1]");
        } else if (!strcmp(a, "--text-drop") && has) {
            if (num_float(argv[++i], &o.text_drop) || !(o.text_drop >= 0) || o.text_drop >= 1)
                return cli_usage("train", "--text-drop needs a probability in [0, 1)");
        } else if (!strcmp(a, "--patch-drop") && has) {
            if (num_float(argv[++i], &o.patch_drop) || !(o.patch_drop >= 0) || o.patch_drop >= 1)
                return cli_usage("train", "--patch-drop needs a share in [0, 1)");
        }
        else if (a[0] == '-' && a[1])
            return cli_usage("train", "unknown option or missing value '%s'", a);
        else return cli_usage("train", "unexpected argument '%s'", a);
    }
    if (!images || !captions) return cli_usage("train", "give --images DIR and --captions FILE");
    if (!out) return cli_usage("train", "no --out DIR given");
    if (!o.arch) return cli_usage("train", "no --arch SPEC given");
    if (!o.tokenizer_dir) return cli_usage("train", "no --tokenizer DIR given");
    return run_training("train", argc, argv, clipdb_train, images, captions, out, &o, &ps);
}
