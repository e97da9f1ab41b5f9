/*
** bench_serve_lib.c: the baseline of the server's load benchmark
** (bench/serve_load.py): the same searches the load sends (text searches
** with encoding and item searches, k 10, cosine, exact), run one at a time
** through the public library API on one thread.
**
** usage: bench_serve_lib DB QUERIES SECONDS
**   QUERIES: one per line, "text:..." or "item:ID", used round-robin.
** Prints "RESULT searches=N seconds=S per_s=R p50_ms=A p99_ms=B".
*/
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clipdb.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    clipdb_db *db = NULL;
    clipdb_db_options dopt;
    clipdb_search_options opt;
    clipdb_query *qs = NULL;
    char line[4096], **texts = NULL;
    double *lat = NULL, t0, secs;
    size_t nq = 0, cap = 0, n = 0, lcap = 0, i;
    FILE *f;
    int rc = 1;

    if (argc != 4) {
        fprintf(stderr, "usage: bench_serve_lib DB QUERIES SECONDS\n");
        return 2;
    }
    secs = atof(argv[3]);
    if (!(f = fopen(argv[2], "r"))) {
        perror(argv[2]);
        return 1;
    }
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (nq == cap) {
            cap = cap ? 2 * cap : 64;
            qs = realloc(qs, cap * sizeof *qs);
            texts = realloc(texts, cap * sizeof *texts);
            if (!qs || !texts) return 1;
        }
        memset(&qs[nq], 0, sizeof qs[nq]);
        texts[nq] = NULL;
        if (!strncmp(line, "text:", 5)) {
            texts[nq] = strdup(line + 5);
            qs[nq].kind = CLIPDB_QUERY_TEXT;
            qs[nq].text = texts[nq];
        } else if (!strncmp(line, "item:", 5)) {
            qs[nq].kind = CLIPDB_QUERY_ITEM;
            qs[nq].item = atoll(line + 5);
        } else {
            continue;
        }
        nq++;
    }
    fclose(f);
    if (nq == 0) return 1;
    clipdb_db_options_init(&dopt);
    dopt.readonly = 1;
    if (clipdb_db_open(&db, argv[1], &dopt) != CLIPDB_OK) {
        fprintf(stderr, "%s\n", clipdb_db_errmsg(db));
        goto cleanup;
    }
    clipdb_search_options_init(&opt);
    opt.k = 10;
    /* warm-up: the model, the vectors, a few of each query */
    for (i = 0; i < nq && i < 8; i++) {
        clipdb_results *res = NULL;
        if (clipdb_db_search(db, &qs[i], 1, &opt, &res) != CLIPDB_OK) {
            fprintf(stderr, "%s\n", clipdb_db_errmsg(db));
            goto cleanup;
        }
        clipdb_results_free(res);
    }
    t0 = now();
    while (now() - t0 < secs) {
        clipdb_results *res = NULL;
        double a = now();
        if (clipdb_db_search(db, &qs[n % nq], 1, &opt, &res) != CLIPDB_OK) {
            fprintf(stderr, "%s\n", clipdb_db_errmsg(db));
            goto cleanup;
        }
        clipdb_results_free(res);
        if (n == lcap) {
            lcap = lcap ? 2 * lcap : 1024;
            if (!(lat = realloc(lat, lcap * sizeof *lat))) goto cleanup;
        }
        lat[n++] = now() - a;
    }
    secs = now() - t0;
    qsort(lat, n, sizeof *lat, cmp_d);
    printf("RESULT searches=%zu seconds=%.3f per_s=%.2f p50_ms=%.3f p99_ms=%.3f\n", n, secs,
           (double)n / secs, lat[n / 2] * 1e3, lat[(size_t)((double)n * 0.99)] * 1e3);
    rc = 0;
cleanup:
    clipdb_db_close(db);
    for (i = 0; i < nq; i++) free(texts[i]);
    free(texts);
    free(qs);
    free(lat);
    return rc;
}
