/*
** cmd_index.c: clipdb index DB (--ivf [--nlist N] | --faiss SPEC |
** --compress sq8|bf16|fp16 | --drop) [--target image|text] [--metric M]
** [--space NAME]
*/
#include <string.h>

#include "cli/cli.h"

const char cli_index_help[] =
    "usage: clipdb index DB (--ivf [--nlist N] [--seed S] | --faiss SPEC)\n"
    "                    [--target image|text] [--metric cosine|dot|l2]\n"
    "       clipdb index DB (--compress sq8|bf16|fp16 | --drop)\n"
    "                    [--target image|text] [--space NAME]\n"
    "\n"
    "Trains an IVF index (k-means, seeded) on the stored vectors of the target\n"
    "type (without --target: one on the image vectors and one on the text\n"
    "vectors) and stores its centroids and the list of every vector in the\n"
    "database, replacing an earlier one for the same target and metric. Then\n"
    "'clipdb search DB --index ivf --nprobe N' uses it. Items added later go to\n"
    "their nearest list; deleted ones leave it. Retrain after large changes.\n"
    "\n"
    "With --faiss SPEC it builds a Faiss index instead (any index_factory\n"
    "string) and stores its bytes, with their SHA-256 (checked before every\n"
    "load), and the ids it holds; 'clipdb search DB --index faiss' uses it.\n"
    "Items added later join it at search time and deleted ones leave it; an\n"
    "index type that cannot remove items (e.g. HNSW) is then rebuilt in\n"
    "memory for the search, with a note: run this command again.\n"
    "\n"
    "With --compress KIND it gives the vectors of a vector set (--space, default\n"
    "base) a compressed copy: sq8 (8-bit codes per dimension, a quarter of the\n"
    "fp32 bytes), bf16 or fp16 (half). Exact search (the default index) then\n"
    "scans the copy and re-ranks the best candidates on the fp32 vectors, so\n"
    "scores stay exact ('clipdb search --no-compressed' scans fp32 instead).\n"
    "sq8 stores the per-dimension ranges of the vectors stored now; items added\n"
    "later are quantised with them (values outside clamp). --drop removes the\n"
    "copy. 'clipdb stats' lists the copies.\n"
    "\n"
    "options:\n"
    "  --ivf           build clipdb's IVF-Flat index\n"
    "  --faiss SPEC    build and store a Faiss index, e.g. \"IVF100,Flat\", \"Flat\"\n"
    "  --nlist N       number of lists (default: about sqrt(number of vectors))\n"
    "  --target T      image or text; default: --ivf builds both (a target\n"
    "                  without vectors is skipped), --faiss builds image\n"
    "  --metric M      the metric it serves: cosine (default), dot or l2\n"
    "  --seed S        k-means seed (default " CLI_STR(CLIPDB_DEFAULT_SEED) ")\n"
    "  --compress KIND make the compressed copy sq8, bf16 or fp16 (without\n"
    "                  --target: of the image and the text vectors that exist)\n"
    "  --drop          drop the compressed copy\n"
    "  --space NAME    the vector set of --compress / --drop (default base)\n"
    "\n"
    "example:\n"
    "  clipdb index photos.db --ivf --nlist 64      (image and text indexes)\n"
    "  clipdb index photos.db --faiss \"IVF100,Flat\" --target text --metric dot\n"
    "  clipdb index photos.db --compress sq8 --target image\n";

int cli_cmd_index(int argc, char **argv)
{
    const char *path = NULL, *faiss = NULL, *space = NULL;
    clipdb_compress kind = CLIPDB_COMPRESS_NONE;
    int compress = 0;
    clipdb_index_options opt;
    clipdb_db *db = NULL;
    int ivf = 0, i, rc = CLIPDB_OK, target_given = 0, built = 0, t;
    long long v;

    clipdb_index_options_init(&opt);
    for (i = 1; i < argc; i++) {
        const char *s = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(s, "--ivf")) ivf = 1;
        else if (!strcmp(s, "--compress") && has) {
            if (clipdb_compress_parse(argv[++i], &kind) != CLIPDB_OK || kind == CLIPDB_COMPRESS_NONE)
                return cli_usage("index", "--compress is sq8, bf16 or fp16, not '%s'", argv[i]);
            compress = 1;
        } else if (!strcmp(s, "--drop")) {
            kind = CLIPDB_COMPRESS_NONE;
            compress = 2;
        } else if (!strcmp(s, "--space") && has) space = argv[++i];
        else if (!strcmp(s, "--faiss") && has) faiss = argv[++i];
        else if (!strcmp(s, "--nlist") && has) {
            if ((rc = cli_parse_int("index", s, argv[++i], 1, CLIPDB_MAX_NLIST, &v))) return rc;
            opt.nlist = (int)v;
        } else if (!strcmp(s, "--seed") && has) {
            if ((rc = cli_parse_int("index", s, argv[++i], 0, INT64_MAX, &v))) return rc;
            opt.seed = (uint64_t)v;
        } else if (!strcmp(s, "--target") && has) {
            target_given = 1;
            if ((rc = cli_parse_target("index", argv[++i], &opt.target))) return rc;
        } else if (!strcmp(s, "--metric") && has) {
            clipdb_metric m;
            if (clipdb_metric_parse(argv[++i], &m) != CLIPDB_OK)
                return cli_usage("index", "--metric is cosine, dot or l2, not '%s'", argv[i]);
            opt.metric = m;
        } else if (s[0] == '-' && s[1]) return cli_usage("index", "unknown option or missing value '%s'", s);
        else if (!path) path = s;
        else return cli_usage("index", "unexpected argument '%s'", s);
    }
    if (!path) return cli_usage("index", "no database file given");
    if (ivf + !!faiss + !!compress != 1)
        return cli_usage("index", "say which index to build (--ivf, --faiss SPEC, --compress KIND "
                                  "or --drop)");
    if (space && !compress)
        return cli_usage("index", "--space goes with --compress or --drop (stored indexes serve "
                                  "the base set)");
    if (cli_open_db("index", path, NULL, &db) != CLI_OK) return CLI_FAIL;
    if (compress) {
        for (t = CLIPDB_ITEM_IMAGE; t <= CLIPDB_ITEM_TEXT && rc == CLIPDB_OK; t++) {
            clipdb_db_stats st;
            int64_t n = 0;
            int j;
            if (target_given && t != opt.target) continue;
            if (!target_given) {
                /* both targets: those with vectors in the set (or, for --drop, a copy) */
                if ((rc = clipdb_db_get_stats(db, &st)) != CLIPDB_OK) break;
                n = -1; /* an unknown set: the call below says so */
                for (j = 0; j < st.n_sets; j++)
                    if (!strcmp(st.sets[j].name, space ? space : CLIPDB_VECTOR_SET_BASE))
                        n = t == CLIPDB_ITEM_IMAGE ? st.sets[j].images : st.sets[j].texts;
                if (compress == 2)
                    for (j = 0, n = 0; j < st.n_compressed; j++)
                        n += st.compressed[j].target == t &&
                             !strcmp(st.compressed[j].space, space ? space : CLIPDB_VECTOR_SET_BASE);
                clipdb_db_stats_free(&st);
                if (n == 0) continue;
            }
            if ((rc = clipdb_db_set_compressed(db, space, t, kind)) != CLIPDB_OK) break;
            if (compress == 2)
                printf("dropped the compressed copy of the %s vectors (set %s)\n",
                       t == CLIPDB_ITEM_TEXT ? "text" : "image", space ? space : CLIPDB_VECTOR_SET_BASE);
            else
                printf("made a %s compressed copy of the %s vectors (set %s)\n",
                       clipdb_compress_name(kind), t == CLIPDB_ITEM_TEXT ? "text" : "image",
                       space ? space : CLIPDB_VECTOR_SET_BASE);
            built++;
        }
        if (rc == CLIPDB_OK && !built) {
            cli_fail("index", compress == 2 ? "%s: no compressed copy to drop" : "%s: no vectors to compress",
                     path);
            clipdb_db_close(db);
            return CLI_FAIL;
        }
    } else if (faiss) {
        rc = clipdb_db_build_faiss(db, &opt, faiss);
        built = rc == CLIPDB_OK;
    } else {
        /* --ivf: the target given, or both */
        for (t = CLIPDB_ITEM_IMAGE; t <= CLIPDB_ITEM_TEXT && rc == CLIPDB_OK; t++) {
            clipdb_db_stats st;
            int64_t n;
            if (target_given && t != opt.target) continue;
            if (!target_given) {
                /* skip a target without vectors (a text-only database) */
                if ((rc = clipdb_db_get_stats(db, &st)) != CLIPDB_OK) break;
                n = t == CLIPDB_ITEM_IMAGE ? st.images : st.texts;
                clipdb_db_stats_free(&st);
                if (n == 0) continue;
            }
            opt.target = t;
            if ((rc = clipdb_db_build_ivf(db, &opt)) != CLIPDB_OK) break;
            printf("built an IVF index on %s vectors (metric %s)\n",
                   t == CLIPDB_ITEM_TEXT ? "text" : "image", clipdb_metric_name(opt.metric));
            built++;
        }
        if (rc == CLIPDB_OK && !built) {
            cli_fail("index", "%s: no vectors to index", path);
            clipdb_db_close(db);
            return CLI_FAIL;
        }
    }
    if (rc != CLIPDB_OK) {
        cli_fail("index", "%s", clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return CLI_FAIL;
    }
    if (faiss)
        printf("built a Faiss \"%s\" index on %s vectors (metric %s)\n", faiss,
               opt.target == CLIPDB_ITEM_TEXT ? "text" : "image", clipdb_metric_name(opt.metric));
    clipdb_db_close(db);
    return CLI_OK;
}
