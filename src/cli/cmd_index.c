/*
** cmd_index.c: clipdb index DB --ivf [--nlist N] [--target image|text]
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

const char cli_index_help[] =
    "usage: clipdb index DB --ivf [--nlist N] [--target image|text]\n"
    "                    [--metric cosine|dot|l2] [--seed S]\n"
    "\n"
    "Trains an IVF index (k-means, seeded) on the stored vectors of the target\n"
    "type and stores its centroids and the list of every vector in the\n"
    "database, replacing an earlier one for the same target and metric. Then\n"
    "'clipdb search DB --index ivf --nprobe N' uses it. Items added later go to\n"
    "their nearest list; deleted ones leave it. Retrain after large changes.\n"
    "\n"
    "options:\n"
    "  --ivf           build the IVF index (the only kind stored)\n"
    "  --nlist N       number of lists (default: about sqrt(number of vectors))\n"
    "  --target T      image (default) or text\n"
    "  --metric M      the metric it serves: cosine (default), dot or l2\n"
    "  --seed S        k-means seed (default 1234)\n"
    "\n"
    "example:\n"
    "  clipdb index photos.db --ivf --nlist 64\n";

int cli_cmd_index(int argc, char **argv)
{
    const char *path = NULL;
    clipdb_index_options opt;
    clipdb_db *db = NULL;
    int ivf = 0, i, rc;
    char *end;
    long long v;

    clipdb_index_options_init(&opt);
    for (i = 1; i < argc; i++) {
        const char *s = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(s, "--ivf")) ivf = 1;
        else if (!strcmp(s, "--nlist") && has) {
            errno = 0;
            v = strtoll(argv[++i], &end, 10);
            if (errno || *end || v < 1 || v > (1 << 20))
                return cli_usage("index", "--nlist needs a number from 1 to %d", 1 << 20);
            opt.nlist = (int)v;
        } else if (!strcmp(s, "--seed") && has) {
            errno = 0;
            v = strtoll(argv[++i], &end, 10);
            if (errno || *end || v < 0) return cli_usage("index", "--seed needs a number >= 0");
            opt.seed = (uint64_t)v;
        } else if (!strcmp(s, "--target") && has) {
            i++;
            if (!strcmp(argv[i], "image")) opt.target = CLIPDB_ITEM_IMAGE;
            else if (!strcmp(argv[i], "text")) opt.target = CLIPDB_ITEM_TEXT;
            else return cli_usage("index", "--target is image or text, not '%s'", argv[i]);
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
    if (!ivf) return cli_usage("index", "say which index to build (--ivf)");
    rc = clipdb_db_open(&db, path, NULL);
    if (rc == CLIPDB_OK) rc = clipdb_db_build_ivf(db, &opt);
    if (rc != CLIPDB_OK) {
        cli_fail("index", "%s", clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return CLI_FAIL;
    }
    printf("built an IVF index on %s vectors (metric %s)\n",
           opt.target == CLIPDB_ITEM_TEXT ? "text" : "image",
           clipdb_metric_name(opt.metric));
    clipdb_db_close(db);
    return CLI_OK;
}
