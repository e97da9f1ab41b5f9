/*
** cmd_eval.c: clipdb eval DB [options]: the retrieval evaluation of a
** database (src/eval through include/clipdb.h); parsing and printing only.
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"

const char cli_eval_help[] =
    "usage: clipdb eval DB [--split S] [--where FIELD=VALUE]... [--metric cosine|dot|l2]\n"
    "                   [--pairs all|first] [-k K,K,...] [--curve-k N] [--set NAME]\n"
    "                   [--no-index] [--nlist N] [--nprobe N,N,...] [--no-faiss]\n"
    "                   [--index-k K] [--samples N] [--seed S]\n"
    "                   [--json] [--plots DIR] [--plot-format png|svg|both] [--html FILE]\n"
    "                   [--model DIR]\n"
    "\n"
    "Measures how well the database's vectors retrieve the right item, with the\n"
    "ground truth it already holds: captions linked to their images.\n"
    "\n"
    "What is measured\n"
    "  The gallery is the images of the split (--split, --where) and their\n"
    "  captions. text->image: every caption is a query, its own image the right\n"
    "  answer among the gallery images. image->text: every image with a caption\n"
    "  is a query, any of its captions a right answer among the gallery captions.\n"
    "  The rank of a query is the position of its right item (the best one for\n"
    "  image->text) in clipdb's search order: higher score first, a tie going to\n"
    "  the smaller item id; ranks count from 1.\n"
    "  - the standard protocol (CLIP and retrieval papers): R@1, R@5, R@10 (the\n"
    "    fraction of queries whose rank <= K), median and mean rank, both ways;\n"
    "  - the paper's protocol: the hit rate within the top k for k = 1 .. 1000\n"
    "    (or the gallery size), both ways, for cosine, dot and L2, beside a random\n"
    "    ranking (k / N for one right item among N); --pairs first keeps one\n"
    "    caption per image, the variant the paper's 96% was measured with;\n"
    "  - exact search against clipdb's IVF and Faiss's IVF,Flat over nprobe:\n"
    "    recall of the exact top K, hit rates, queries per second (text->image,\n"
    "    every caption a query, all in one call, measured in this run);\n"
    "  - every vector set of the database side by side (one today: 'base');\n"
    "  - CPU against GPU: not measured (no GPU backend in this build);\n"
    "  - samples like the paper's Table 1: images with their top captions,\n"
    "    captions with their top images.\n"
    "  All queries are scored at once: one matrix product, captions x images,\n"
    "  serves the three metrics and both directions (in float32, as search).\n"
    "\n"
    "options:\n"
    "  --split S         the images whose metadata 'split' is S (e.g. test)\n"
    "  --where F=V       more filters on the images' metadata (repeatable)\n"
    "  --metric M        metric of the R@K table and the index comparison:\n"
    "                    cosine (default), dot or l2 (curves: all three)\n"
    "  --pairs P         all (default): every caption; first: the first caption of\n"
    "                    each image only\n"
    "  -k LIST           R@K cut-offs, comma-separated (default 1,5,10); each must\n"
    "                    fit the gallery\n"
    "  --curve-k N       hit-rate curves up to k = N (default 1000; clipped to the\n"
    "                    gallery)\n"
    "  --set NAME        evaluate only this vector set (default: every set)\n"
    "  --no-index        skip the index comparison (it times every search 3 times\n"
    "                    and keeps the median: seconds on a large split)\n"
    "  --nlist N         IVF lists (default: about sqrt(images))\n"
    "  --nprobe LIST     nprobe values (default 1,2,4,8,16,32,64; those <= nlist)\n"
    "  --no-faiss        leave Faiss out of the index comparison\n"
    "  --index-k K       k of the index comparison (default 10)\n"
    "  --samples N       Table-1 samples per direction (default 5; 0: none)\n"
    "  --seed S          seed of the sampling and of k-means (default " CLI_STR(CLIPDB_DEFAULT_SEED) ")\n"
    "  --json            print every figure as one JSON object:\n"
    "                    {\"database\", \"model\", \"vector_set\", \"split\", \"date\",\n"
    "                     \"metric\", \"pairs\", \"images\": N, \"captions\": M,\n"
    "                     \"images_without_captions\", \"captions_outside\",\n"
    "                     \"t2i\": {\"R@1\": r, \"R@5\": r, \"R@10\": r, \"median_rank\": m,\n"
    "                             \"mean_rank\": m, \"queries\": n, \"gallery\": n},\n"
    "                     \"i2t\": {...the same...},\n"
    "                     \"hit_rate\": {\"t2i\": {\"cosine\": [[k, rate], ...], \"dot\": [...],\n"
    "                                \"l2\": [...]}, \"i2t\": {...}},\n"
    "                     \"random\": [[k, k/N], ...], \"random_i2t\": [[k, rate], ...],\n"
    "                     \"sets\": [{\"name\", \"model\", \"t2i\", \"i2t\", \"hit_rate\"}],\n"
    "                     \"index_comparison\": {\"measured\", \"metric\", \"k\", \"nlist\",\n"
    "                        \"rows\": [{\"index\", \"nprobe\", \"recall\", \"hit@1\",\n"
    "                                  \"hit@K\", \"qps\", \"build_seconds\"}]},\n"
    "                     \"samples\": {\"i2t\": [...], \"t2i\": [...]},\n"
    "                     \"gpu\": {\"measured\": false, \"note\"}, \"timing\": {...}}\n"
    "                    rates are fractions in [0, 1]\n"
    "  --plots DIR       write hit_rate_t2i, hit_rate_i2t, index_speed and models\n"
    "                    plots (PLplot) into DIR\n"
    "  --plot-format F   png (default), svg or both\n"
    "  --html FILE       one self-contained HTML report (tables, plots, samples\n"
    "                    with thumbnails inline; opens with no network)\n"
    "  --model DIR       model directory (default: the recorded one)\n"
    "\n"
    "examples:\n"
    "  clipdb eval flickr.db --split test\n"
    "  clipdb eval flickr.db --split test --pairs first --json > eval.json\n"
    "  clipdb eval coco.db --where split=val2017 --plots plots/ --html report.html\n"
    "  clipdb eval coco.db -k 1,10,100 --metric l2 --nprobe 1,4,16 --no-faiss\n";

/* "1,5,10" -> vals (at most max values, each in [lo, hi]); -1 when bad. */
static int parse_list(const char *s, int lo, int hi, int *vals, int max)
{
    int n = 0;
    while (*s) {
        char *end;
        long v;
        errno = 0;
        v = strtol(s, &end, 10);
        if (errno || end == s || v < lo || v > hi || n == max) return -1;
        vals[n++] = (int)v;
        if (*end == ',') end++;
        else if (*end) return -1;
        s = end;
    }
    return n ? n : -1;
}

static void print_dir(const char *name, const clipdb_eval_summary *s, const clipdb_eval_dir *d)
{
    int i;
    printf("%-14s", name);
    for (i = 0; i < s->n_ks; i++) printf(" %8.4f", d->recall[i]);
    printf(" %11g %11.2f %9lld\n", d->median_rank, d->mean_rank, (long long)d->queries);
}

static void print_text(clipdb_eval *ev)
{
    int i, n = clipdb_eval_n_sets(ev), k;
    for (i = 0; i < n; i++) {
        clipdb_eval_summary s;
        if (clipdb_eval_get_summary(ev, i, &s) != CLIPDB_OK) continue;
        printf("vector set %s (model %s): %lld images, %lld captions, metric %s\n", s.set,
               s.model, (long long)s.images, (long long)s.captions, clipdb_metric_name(s.metric));
        if (s.images_without_captions || s.captions_outside)
            printf("  excluded queries: %lld images without a caption, %lld captions of images "
                   "outside the split\n",
                   (long long)s.images_without_captions, (long long)s.captions_outside);
        printf("%-14s", "direction");
        for (k = 0; k < s.n_ks; k++) printf(" %8s%d", "R@", s.ks[k]);
        printf(" %11s %11s %9s\n", "median_rank", "mean_rank", "queries");
        print_dir("text->image", &s, &s.t2i);
        print_dir("image->text", &s, &s.i2t);
        printf("scores and ranks (all queries, 3 metrics): %.3f s\n", s.score_seconds);
    }
}

int cli_cmd_eval(int argc, char **argv)
{
    const char *path = NULL, *model = NULL, *plots = NULL, *html = NULL, **where = NULL;
    clipdb_eval_options opt;
    clipdb_db_options dopt;
    clipdb_db *db = NULL;
    clipdb_eval *ev = NULL;
    char *json_txt = NULL;
    int json = 0, png = 1, svg = 0, a, n, ret = CLI_OK, rc;

    clipdb_eval_options_init(&opt);
    where = calloc((size_t)argc, sizeof *where);
    if (!where) return cli_fail("eval", "out of memory");
    opt.where = where;
    for (a = 1; a < argc; a++) {
        const char *s = argv[a];
        int has = a + 1 < argc, v1[1];
        if (!strcmp(s, "--split") && has) opt.split = argv[++a];
        else if (!strcmp(s, "--where") && has) {
            if (!strchr(argv[a + 1], '=') || argv[a + 1][0] == '=') {
                ret = cli_usage("eval", "--where needs FIELD=VALUE, not '%s'", argv[a + 1]);
                goto cleanup;
            }
            where[opt.n_where++] = argv[++a];
        } else if (!strcmp(s, "--metric") && has) {
            clipdb_metric m;
            if (clipdb_metric_parse(argv[++a], &m) != CLIPDB_OK) {
                ret = cli_usage("eval", "--metric is cosine, dot or l2, not '%s'", argv[a]);
                goto cleanup;
            }
            opt.metric = m;
        } else if (!strcmp(s, "--pairs") && has) {
            a++;
            if (!strcmp(argv[a], "first")) opt.pairs_first = 1;
            else if (!strcmp(argv[a], "all")) opt.pairs_first = 0;
            else {
                ret = cli_usage("eval", "--pairs is all or first, not '%s'", argv[a]);
                goto cleanup;
            }
        } else if ((!strcmp(s, "-k") || !strcmp(s, "--k")) && has) {
            if ((n = parse_list(argv[++a], 1, CLIPDB_MAX_K, opt.ks, CLIPDB_EVAL_MAX_KS)) < 0) {
                ret = cli_usage("eval", "-k needs up to %d positive numbers like 1,5,10, not '%s'",
                                CLIPDB_EVAL_MAX_KS, argv[a]);
                goto cleanup;
            }
            opt.n_ks = n;
        } else if (!strcmp(s, "--curve-k") && has) {
            if (parse_list(argv[++a], 1, CLIPDB_MAX_K, v1, 1) != 1) {
                ret = cli_usage("eval", "--curve-k needs a positive number");
                goto cleanup;
            }
            opt.curve_max_k = v1[0];
        } else if (!strcmp(s, "--set") && has) opt.vector_set = argv[++a];
        else if (!strcmp(s, "--no-index")) opt.compare_indexes = 0;
        else if (!strcmp(s, "--no-faiss")) opt.faiss = 0;
        else if (!strcmp(s, "--nlist") && has) {
            if (parse_list(argv[++a], 1, CLIPDB_MAX_NLIST, v1, 1) != 1) {
                ret = cli_usage("eval", "--nlist needs a positive number");
                goto cleanup;
            }
            opt.nlist = v1[0];
        } else if (!strcmp(s, "--nprobe") && has) {
            if ((n = parse_list(argv[++a], 1, CLIPDB_MAX_NLIST, opt.nprobes,
                                CLIPDB_EVAL_MAX_NPROBES)) < 0) {
                ret = cli_usage("eval", "--nprobe needs up to %d positive numbers like 1,4,16",
                                CLIPDB_EVAL_MAX_NPROBES);
                goto cleanup;
            }
            opt.n_nprobes = n;
        } else if (!strcmp(s, "--index-k") && has) {
            if (parse_list(argv[++a], 1, 1000, v1, 1) != 1) {
                ret = cli_usage("eval", "--index-k needs a number from 1 to 1000");
                goto cleanup;
            }
            opt.index_k = v1[0];
        } else if (!strcmp(s, "--samples") && has) {
            if (parse_list(argv[++a], 0, 100, v1, 1) != 1) {
                ret = cli_usage("eval", "--samples needs a number from 0 to 100");
                goto cleanup;
            }
            opt.n_samples = v1[0];
        } else if (!strcmp(s, "--seed") && has) {
            char *end;
            errno = 0;
            opt.seed = strtoull(argv[++a], &end, 10);
            if (errno || *end || end == argv[a] || argv[a][0] == '-') {
                ret = cli_usage("eval", "--seed needs a non-negative number");
                goto cleanup;
            }
        } else if (!strcmp(s, "--json")) json = 1;
        else if (!strcmp(s, "--plots") && has) plots = argv[++a];
        else if (!strcmp(s, "--plot-format") && has) {
            a++;
            if (!strcmp(argv[a], "png")) png = 1, svg = 0;
            else if (!strcmp(argv[a], "svg")) png = 0, svg = 1;
            else if (!strcmp(argv[a], "both")) png = 1, svg = 1;
            else {
                ret = cli_usage("eval", "--plot-format is png, svg or both, not '%s'", argv[a]);
                goto cleanup;
            }
        } else if (!strcmp(s, "--html") && has) html = argv[++a];
        else if (!strcmp(s, "--model") && has) model = argv[++a];
        else if (s[0] == '-' && s[1]) {
            ret = cli_usage("eval", "unknown option '%s' (or a missing value)", s);
            goto cleanup;
        } else if (!path) path = s;
        else {
            ret = cli_usage("eval", "unexpected argument '%s'", s);
            goto cleanup;
        }
    }
    if (!path) {
        ret = cli_usage("eval", "no database file given");
        goto cleanup;
    }
    /* an unwritable output fails before the evaluation, not after it */
    if (plots && mkdir(plots, 0777) != 0 && errno != EEXIST) {
        ret = cli_fail("eval", "cannot create %s: %s", plots, strerror(errno));
        goto cleanup;
    }
    clipdb_db_options_init(&dopt);
    dopt.readonly = 1;
    dopt.model_dir = model;
    if (clipdb_db_open(&db, path, &dopt) != CLIPDB_OK) {
        ret = cli_fail("eval", "%s", clipdb_db_errmsg(db));
        goto cleanup;
    }
    rc = clipdb_eval_run(db, &opt, &ev);
    if (rc != CLIPDB_OK) {
        ret = cli_fail("eval", "%s", clipdb_eval_errmsg(ev));
        goto cleanup;
    }
    if (plots && clipdb_eval_write_plots(ev, plots, png, svg) != CLIPDB_OK) {
        ret = cli_fail("eval", "%s", clipdb_eval_errmsg(ev));
        goto cleanup;
    }
    if (html && clipdb_eval_write_html(ev, html) != CLIPDB_OK) {
        ret = cli_fail("eval", "%s", clipdb_eval_errmsg(ev));
        goto cleanup;
    }
    if (json) {
        if (clipdb_eval_json(ev, &json_txt) != CLIPDB_OK) {
            ret = cli_fail("eval", "%s", clipdb_eval_errmsg(ev));
            goto cleanup;
        }
        printf("%s\n", json_txt);
    } else {
        print_text(ev);
    }
cleanup:
    clipdb_free(json_txt);
    clipdb_eval_free(ev);
    clipdb_db_close(db);
    free(where);
    return ret;
}
