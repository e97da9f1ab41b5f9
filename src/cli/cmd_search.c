/*
** cmd_search.c: clipdb search DB (--text T | --image PATH | --item ID |
** --batch FILE) [options]
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cli/cli.h"
#include "core/core.h" /* cdb_grow */

const char cli_search_help[] =
    "usage: clipdb search DB (--text T | --image PATH | --item ID | --batch FILE)\n"
    "                     [--target image|text] [-k K] [--metric cosine|dot|l2]\n"
    "                     [--index exact|ivf|faiss] [--nprobe N] [--faiss SPEC]\n"
    "                     [--where FIELD=VALUE]... [--json] [--model DIR]\n"
    "                     [--space NAME] [--no-compressed] [--stats]\n"
    "\n"
    "Finds the K stored items of the target type (images or texts) nearest to\n"
    "the query: a text, an image file, or a stored item. Every direction\n"
    "(text->image, image->text, image->image, text->text) takes the same path.\n"
    "Scores are similarities, best first: cosine, dot product of the raw CLIP\n"
    "vectors, or for l2 the negative Euclidean distance. A --item query finds\n"
    "the item itself too.\n"
    "\n"
    "options:\n"
    "  --text T          query with a text\n"
    "  --image PATH      query with an image file\n"
    "  --item ID         query with a stored item's vector\n"
    "  --batch FILE      many queries, one per line (a text; or image:PATH, item:ID),\n"
    "                    encoded and searched together (one matrix product)\n"
    "  --target T        image (default) or text\n"
    "  -k K              number of results (default 10)\n"
    "  --metric M        cosine (default), dot or l2\n"
    "  --index I         exact (default), ivf (needs 'clipdb index DB --ivf'), or\n"
    "                    faiss (needs 'clipdb index DB --faiss SPEC', or --faiss)\n"
    "  --nprobe N        IVF lists to scan (default 8)\n"
    "  --faiss SPEC      build a Faiss index_factory index (e.g. \"IVF100,Flat\") in\n"
    "                    memory for this search instead of the stored one\n"
    "  --where F=V       only items whose metadata field F equals V (repeatable;\n"
    "                    all must hold); still K results when K items match\n"
    "  --json            {\"results\": [{\"id\", \"type\", \"path\" | \"text\", \"image\",\n"
    "                    <metadata fields>, \"score\"}], \"took_ms\"}; with --batch\n"
    "                    (a metadata field named like one of these is \"meta.NAME\";\n"
    "                    a score that is not finite is null)\n"
    "                    {\"queries\": [{\"query\", \"results\"}], \"took_ms\"}\n"
    "  --space NAME      the vector set to search (default base, the database's\n"
    "                    own model; others are added by 'clipdb reembed'): the\n"
    "                    query is encoded with that set's model; exact index only\n"
    "  --no-compressed   exact index: scan the fp32 vectors even where the set has\n"
    "                    a compressed copy ('clipdb index DB --compress KIND'),\n"
    "                    which exact search otherwise scans, re-ranking in fp32\n"
    "  --stats           print the time taken and the vectors scanned to stderr\n"
    "                    (with --json, \"scan\" says it in the output too)\n"
    "  --model DIR       model directory (default: the recorded one, of the set\n"
    "                    searched; another model is refused)\n"
    "  --precision P     encoder precision; must be the one recorded by init\n"
    "\n"
    "examples:\n"
    "  clipdb search photos.db --text \"a dog on a beach\" -k 5\n"
    "  clipdb search photos.db --image cat.jpg --target text --json\n"
    "  clipdb search photos.db --text \"a red bus\" --index ivf --nprobe 4 --where split=val2017\n"
    "  clipdb search photos.db --text \"a red bus\" --space finetuned\n";

/* The members a result object prints itself; a metadata field of one of
** these names is printed as "meta.NAME" so that it cannot shadow them (nor
** make a duplicate key). */
static const char *const reserved_fields[] = {"id", "type", "path", "abspath", "text",
                                              "image", "score", "query", "results"};

static int is_reserved(const char *name)
{
    size_t i;
    for (i = 0; i < sizeof reserved_fields / sizeof reserved_fields[0]; i++)
        if (!strcmp(name, reserved_fields[i]) || !strncmp(name, "meta.", 5)) return 1;
    return 0;
}

/* Prints the fields of the metadata object (JSON text from the library)
** as members of the result object: parsed and re-printed, never spliced. */
static void print_meta_fields(const char *meta_json)
{
    cJSON *obj = meta_json ? cJSON_Parse(meta_json) : NULL, *f;
    if (cJSON_IsObject(obj)) {
        cJSON_ArrayForEach(f, obj)
        {
            char *v = NULL;
            if (!f->string) continue;
            /* numbers, booleans, null: cJSON's text (a non-finite number is null) */
            if (!cJSON_IsString(f) && !(v = cJSON_PrintUnformatted(f))) continue;
            printf(", ");
            if (is_reserved(f->string)) {
                char *name = malloc(strlen(f->string) + 6);
                if (name) sprintf(name, "meta.%s", f->string);
                cli_print_json_string(stdout, name ? name : "meta.?");
                free(name);
            } else {
                cli_print_json_string(stdout, f->string);
            }
            printf(": ");
            if (cJSON_IsString(f)) cli_print_json_string(stdout, f->valuestring);
            else printf("%s", v);
            free(v);
        }
    }
    cJSON_Delete(obj);
}

static void print_result_json(const clipdb_result *r)
{
    printf("{\"id\": %lld, \"type\": \"%s\"", (long long)r->id,
           r->type == CLIPDB_ITEM_TEXT ? "text" : "image");
    if (r->path) {
        printf(", \"path\": ");
        cli_print_json_string(stdout, r->path);
    }
    if (r->abspath) {
        printf(", \"abspath\": ");
        cli_print_json_string(stdout, r->abspath);
    }
    if (r->text) {
        printf(", \"text\": ");
        cli_print_json_string(stdout, r->text);
    }
    if (r->image >= 0) printf(", \"image\": %lld", (long long)r->image);
    print_meta_fields(r->meta_json);
    printf(", \"score\": ");
    cli_print_json_number(stdout, (double)r->score);
    printf("}");
}

/* Prints the failure of a search with what to type when an index is missing. */
static int search_fail(clipdb_db *db, const char *path, const clipdb_search_options *opt)
{
    const char *target = opt->target == CLIPDB_ITEM_TEXT ? "text" : "image";
    const char *metric = clipdb_metric_name(opt->metric);
    if (clipdb_db_errcode(db) == CLIPDB_ENOTFOUND && opt->index == CLIPDB_INDEX_IVF)
        return cli_fail("search", "%s; build one with 'clipdb index %s --ivf --target %s --metric %s'",
                        clipdb_db_errmsg(db), path, target, metric);
    if (clipdb_db_errcode(db) == CLIPDB_ENOTFOUND && opt->index == CLIPDB_INDEX_FAISS &&
        !opt->faiss)
        return cli_fail("search",
                        "%s; build one with 'clipdb index %s --faiss \"IVF100,Flat\" --target %s "
                        "--metric %s' (or give --faiss SPEC to build one for this search)",
                        clipdb_db_errmsg(db), path, target, metric);
    if (clipdb_db_errcode(db) == CLIPDB_EINVAL && opt->index == CLIPDB_INDEX_FAISS &&
        opt->n_where > 0)
        return cli_fail("search", "%s (--where needs --index exact or ivf)", clipdb_db_errmsg(db));
    return cli_fail("search", "%s", clipdb_db_errmsg(db));
}

static void print_query(const clipdb_query *q)
{
    if (q->kind == CLIPDB_QUERY_TEXT) cli_print_json_string(stdout, q->text);
    else if (q->kind == CLIPDB_QUERY_IMAGE) {
        printf("{\"image\": ");
        cli_print_json_string(stdout, q->path);
        printf("}");
    } else printf("{\"item\": %lld}", (long long)q->item);
}

/* A batch file is read in reads of at least READ_CHUNK. */
#define READ_CHUNK ((size_t)64 << 10)

/* Reads the batch file whole (at most CLIPDB_MAX_BATCH_BYTES) and parses it
** with the library (clipdb_queries_parse) into *list. */
static int read_batch(const char *path, clipdb_query_list *list)
{
    FILE *f = cli_fopen_regular("search", path);
    size_t cap = 0, len = 0, i, want;
    char *buf = NULL, *err = NULL;
    int ret = CLI_OK;
    if (!f) return CLI_FAIL;
    for (;;) {
        /* room for READ_CHUNK more bytes and the NUL */
        if (cdb_grow((void **)&buf, &cap, len + READ_CHUNK + 1, 1)) {
            ret = cli_fail("search", "out of memory");
            goto cleanup;
        }
        /* at most one byte past the limit is read: that says "too large" */
        want = cap - len - 1;
        if (want > CLIPDB_MAX_BATCH_BYTES + 1 - len) want = CLIPDB_MAX_BATCH_BYTES + 1 - len;
        i = fread(buf + len, 1, want, f);
        len += i;
        if (i == 0) break;
        if (len > CLIPDB_MAX_BATCH_BYTES) {
            ret = cli_fail("search", "%s: batch file larger than %zu MiB", path,
                           (size_t)CLIPDB_MAX_BATCH_BYTES >> 20);
            goto cleanup;
        }
    }
    if (ferror(f)) {
        ret = cli_fail("search", "%s: cannot read it", path);
        goto cleanup;
    }
    if (clipdb_queries_parse(buf, len, path, list, &err) != CLIPDB_OK)
        ret = cli_fail("search", "%s", err ? err : "out of memory");
cleanup:
    fclose(f);
    free(buf);
    clipdb_free(err);
    return ret;
}

int cli_cmd_search(int argc, char **argv)
{
    const char *path = NULL, *model = NULL, *precision = NULL, *batch = NULL, **where = NULL;
    clipdb_search_options opt;
    clipdb_db_options dopt;
    clipdb_query one;
    const clipdb_query *qs = &one;
    clipdb_query_list list;
    clipdb_results *res = NULL;
    clipdb_db *db = NULL;
    size_t nq = 1, i, j;
    int json = 0, stats = 0, n_query = 0, rc, ret = CLI_OK, a;
    long long v;

    memset(&one, 0, sizeof one);
    memset(&list, 0, sizeof list);
    clipdb_search_options_init(&opt);
    where = calloc((size_t)argc, sizeof *where);
    if (!where) return cli_fail("search", "out of memory");
    opt.where = where;
    for (a = 1; a < argc; a++) {
        const char *s = argv[a];
        int has = a + 1 < argc;
        if (!strcmp(s, "--text") && has) {
            one.kind = CLIPDB_QUERY_TEXT;
            one.text = argv[++a];
            n_query++;
        } else if (!strcmp(s, "--image") && has) {
            one.kind = CLIPDB_QUERY_IMAGE;
            one.path = argv[++a];
            n_query++;
        } else if (!strcmp(s, "--item") && has) {
            if ((ret = cli_parse_int("search", s, argv[++a], 0, INT64_MAX, &v))) goto cleanup;
            one.kind = CLIPDB_QUERY_ITEM;
            one.item = v;
            n_query++;
        } else if (!strcmp(s, "--batch") && has) {
            batch = argv[++a];
            n_query++;
        } else if (!strcmp(s, "--target") && has) {
            if ((ret = cli_parse_target("search", argv[++a], &opt.target))) goto cleanup;
        } else if ((!strcmp(s, "-k") || !strcmp(s, "--k")) && has) {
            if ((ret = cli_parse_int("search", s, argv[++a], 1, CLIPDB_MAX_K, &v))) goto cleanup;
            opt.k = (int)v;
        } else if (!strcmp(s, "--metric") && has) {
            clipdb_metric m;
            if (clipdb_metric_parse(argv[++a], &m) != CLIPDB_OK) {
                ret = cli_usage("search", "--metric is cosine, dot or l2, not '%s'", argv[a]);
                goto cleanup;
            }
            opt.metric = m;
        } else if (!strcmp(s, "--index") && has) {
            a++;
            if (!strcmp(argv[a], "exact")) opt.index = CLIPDB_INDEX_EXACT;
            else if (!strcmp(argv[a], "ivf")) opt.index = CLIPDB_INDEX_IVF;
            else if (!strcmp(argv[a], "faiss")) opt.index = CLIPDB_INDEX_FAISS;
            else {
                ret = cli_usage("search", "--index is exact, ivf or faiss, not '%s'", argv[a]);
                goto cleanup;
            }
        } else if (!strcmp(s, "--nprobe") && has) {
            if ((ret = cli_parse_int("search", s, argv[++a], 1, CLIPDB_MAX_NLIST, &v))) goto cleanup;
            opt.nprobe = (int)v;
        } else if (!strcmp(s, "--faiss") && has) {
            opt.faiss = argv[++a];
            opt.index = CLIPDB_INDEX_FAISS;
        } else if (!strcmp(s, "--where") && has) {
            if (!strchr(argv[a + 1], '=') || argv[a + 1][0] == '=') {
                ret = cli_usage("search", "--where needs FIELD=VALUE, not '%s'", argv[a + 1]);
                goto cleanup;
            }
            where[opt.n_where++] = argv[++a];
        } else if (!strcmp(s, "--model") && has) {
            model = argv[++a];
        } else if (!strcmp(s, "--space") && has) {
            opt.vector_set = argv[++a];
        } else if (!strcmp(s, "--precision") && has) {
            precision = argv[++a];
        } else if (!strcmp(s, "--json")) {
            json = 1;
        } else if (!strcmp(s, "--no-compressed")) {
            opt.no_compressed = 1;
        } else if (!strcmp(s, "--stats")) {
            stats = 1;
        } else if (s[0] == '-' && s[1]) {
            ret = cli_usage("search", "unknown option or missing value '%s'", s);
            goto cleanup;
        } else if (!path) {
            path = s;
        } else {
            ret = cli_usage("search", "unexpected argument '%s'", s);
            goto cleanup;
        }
    }
    if (!path) {
        ret = cli_usage("search", "no database file given");
        goto cleanup;
    }
    if (n_query != 1) {
        ret = cli_usage("search", "give exactly one of --text, --image, --item, --batch");
        goto cleanup;
    }
    if (batch) {
        if ((ret = read_batch(batch, &list)) != CLI_OK) goto cleanup;
        qs = list.queries;
        nq = list.n;
    }
    clipdb_db_options_init(&dopt);
    dopt.readonly = 1;
    dopt.model_dir = model;
    dopt.precision = precision;
    if ((ret = cli_open_db("search", path, &dopt, &db)) != CLI_OK) goto cleanup;
    rc = clipdb_db_search(db, qs, nq, &opt, &res);
    if (rc != CLIPDB_OK) {
        ret = search_fail(db, path, &opt);
        goto cleanup;
    }
    if (res->note && opt.index == CLIPDB_INDEX_FAISS)
        fprintf(stderr, "clipdb search: note: %s ('clipdb index %s --faiss SPEC' stores one)\n",
                res->note, path);
    else if (res->note)
        fprintf(stderr, "clipdb search: note: %s\n", res->note);
    if (stats && res->compressed)
        fprintf(stderr, "clipdb search: %zu quer%s in %.3f ms (encoding %.3f ms); scan: %s copy (%s) "
                "+ fp32 re-rank\n", nq, nq == 1 ? "y" : "ies", res->took_ms, res->encode_ms,
                res->compressed, res->scan_isa ? res->scan_isa : "?");
    else if (stats)
        fprintf(stderr, "clipdb search: %zu quer%s in %.3f ms (encoding %.3f ms); scan: fp32\n", nq,
                nq == 1 ? "y" : "ies", res->took_ms, res->encode_ms);
    if (json) {
        printf(batch ? "{\"queries\": [" : "{\"results\": [");
        for (i = 0; i < nq; i++) {
            if (batch) {
                printf("%s{\"query\": ", i ? ", " : "");
                print_query(&qs[i]);
                printf(", \"results\": [");
            }
            for (j = res->offsets[i]; j < res->offsets[i + 1]; j++) {
                if (j > res->offsets[i]) printf(", ");
                print_result_json(&res->results[j]);
            }
            if (batch) printf("]}");
        }
        printf("], \"took_ms\": %.3f, \"encode_ms\": %.3f, \"scan\": \"%s\"}\n", res->took_ms,
               res->encode_ms, res->compressed ? res->compressed : "fp32");
    } else {
        for (i = 0; i < nq; i++) {
            if (batch) {
                printf("query %zu: ", i + 1);
                print_query(&qs[i]);
                printf("\n");
            }
            for (j = res->offsets[i]; j < res->offsets[i + 1]; j++) {
                const clipdb_result *r = &res->results[j];
                printf("%3zu. %9.6f  #%-6lld ", j - res->offsets[i] + 1, (double)r->score,
                       (long long)r->id);
                cli_print_plain(stdout, r->path ? r->path : r->text ? r->text : "");
                putchar('\n');
            }
        }
    }
cleanup:
    clipdb_results_free(res);
    clipdb_db_close(db);
    clipdb_query_list_free(&list);
    free(where);
    return ret;
}
