/* Unit tests of clipdb_db_search's query encoding (src/store/search.c):
** image queries given as bytes in memory (an HTTP upload) are all decoded
** first and then encoded in one call of the batched encoder; the vectors
** are those of each query alone, and a bad image among good ones fails the
** search with its own status code, naming its query index. */
#include "model/transformer.h"
#include "models.h"
#include "store/store.h"
#include "test.h"

enum { N_ITEMS = 8 };

/* A database bound to the tiny model dir with N_ITEMS image vectors of
** distinct directions (no image files: the searches read only vectors). */
static clipdb_db *make_db(const char *dir, const char *name, int *d_out)
{
    char path[600];
    clipdb_db *db = NULL;
    clipdb_db_options o;
    clipdb_model *m = NULL;
    clipdb_model_info info;
    float *v;
    int64_t id;
    int i, j, ok = 1;
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), name);
    remove(path);
    clipdb_db_options_init(&o);
    o.create = 1;
    o.model_dir = dir;
    if (clipdb_db_open(&db, path, &o) != CLIPDB_OK || clipdb_db_model(db, &m) != CLIPDB_OK) {
        test_fail_at(__FILE__, __LINE__, clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return NULL;
    }
    clipdb_model_get_info(m, &info);
    *d_out = info.embed_dim;
    if (!(v = malloc((size_t)info.embed_dim * sizeof *v))) abort();
    ok = cdb_db_begin(db) == CLIPDB_OK;
    for (i = 0; ok && i < N_ITEMS; i++) {
        char p[64];
        for (j = 0; j < info.embed_dim; j++) v[j] = sinf(0.9f * (float)(i + 1) * (float)(j + 1));
        snprintf(p, sizeof p, "/abs/img%d.jpg", i);
        ok = cdb_db_insert_image(db, p + 5, p, 1, "aa", v, &id) == CLIPDB_OK;
    }
    ok = ok && cdb_db_commit(db) == CLIPDB_OK;
    free(v);
    if (!ok) {
        test_fail_at(__FILE__, __LINE__, clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return NULL;
    }
    return db;
}

static int same_results(const clipdb_results *all, size_t qi, const clipdb_results *one)
{
    size_t a = all->offsets[qi], n = all->offsets[qi + 1] - a, i;
    if (one->nq != 1 || one->offsets[1] != n || n == 0) return 0;
    for (i = 0; i < n; i++)
        if (all->results[a + i].id != one->results[i].id ||
            fabsf(all->results[a + i].score - one->results[i].score) > 1e-5f)
            return 0;
    return 1;
}

TEST(search_memory_images_batched_match_one_at_a_time)
{
    const char *dir = test_tiny_clip_model();
    enum { NQ = CDB_VISION_CHUNK + 4, ITEM_Q = 5 };
    static const char *const names[3] = {"000000000139.jpg", "000000000790.jpg",
                                         "000000000802.jpg"};
    static const char junk[] = "this is a text file, not a JPEG\n";
    char *bytes[3] = {NULL, NULL, NULL}, path[1100];
    size_t len[3];
    clipdb_query q[NQ];
    clipdb_search_options so;
    clipdb_results *all = NULL, *one = NULL;
    clipdb_db *db = NULL;
    cdb_err e = {0};
    const char *msg;
    size_t i;
    int d = 0;
    if (!dir) SKIP("../shared (the tokenizer and photos) absent");
    for (i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/data/coco-subset/images/%s", test_shared_dir(), names[i]);
        if (!cdb_file_exists(path)) SKIP("COCO photos absent");
        REQUIRE(cdb_read_file(path, (size_t)64 << 20, &bytes[i], &len[i], &e) == CLIPDB_OK);
    }
    db = make_db(dir, "search-mem.db", &d);
    if (!db) goto cleanup;

    /* more image queries than one encoder group, and an item query among
    ** them: every row goes back to its query */
    memset(q, 0, sizeof q);
    for (i = 0; i < NQ; i++) {
        q[i].kind = CLIPDB_QUERY_IMAGE;
        q[i].data = bytes[i % 3];
        q[i].len = len[i % 3];
    }
    q[ITEM_Q].kind = CLIPDB_QUERY_ITEM;
    q[ITEM_Q].data = NULL;
    q[ITEM_Q].item = 4;
    clipdb_search_options_init(&so);
    so.k = N_ITEMS;
    if (clipdb_db_search(db, q, NQ, &so, &all) != CLIPDB_OK) {
        test_fail_at(__FILE__, __LINE__, clipdb_db_errmsg(db));
        goto cleanup;
    }
    CHECK(all->nq == NQ);
    for (i = 0; i < NQ; i++) {
        REQUIRE(clipdb_db_search(db, &q[i], 1, &so, &one) == CLIPDB_OK);
        CHECK(same_results(all, i, one));
        clipdb_results_free(one);
        one = NULL;
    }
    /* three photos, three different rankings' scores (the rows are not one
    ** vector copied) */
    CHECK(fabsf(all->results[all->offsets[0]].score - all->results[all->offsets[1]].score) >
              1e-4f ||
          all->results[all->offsets[0]].id != all->results[all->offsets[1]].id);
    CHECK(all->results[all->offsets[ITEM_Q]].id == 4);

    /* bad images among good ones: the first one's own status, its index */
    q[2].data = junk;
    q[2].len = sizeof junk - 1;
    q[NQ - 1].data = junk;
    q[NQ - 1].len = 10;
    CHECK(clipdb_db_search(db, q, NQ, &so, &one) == CLIPDB_EFORMAT && !one);
    CHECK(clipdb_db_errcode(db) == CLIPDB_EFORMAT);
    msg = clipdb_db_errmsg(db);
    CHECK(!strncmp(msg, "query 2: ", 9) && strlen(msg) > 12);
    CHECK(strstr(msg, "(and 1 more image queries that did not decode)") != NULL);
    /* alone, the bad one names itself as query 0 */
    CHECK(clipdb_db_search(db, &q[2], 1, &so, &one) == CLIPDB_EFORMAT && !one);
    CHECK(!strncmp(clipdb_db_errmsg(db), "query 0: ", 9));
    CHECK(strstr(clipdb_db_errmsg(db), "more image queries") == NULL);
    /* empty bytes: refused, not read */
    q[2].len = 0;
    q[NQ - 1].data = bytes[0];
    q[NQ - 1].len = len[0];
    CHECK(clipdb_db_search(db, q, NQ, &so, &one) != CLIPDB_OK && !one);
    CHECK(!strncmp(clipdb_db_errmsg(db), "query 2: ", 9));
cleanup:
    clipdb_results_free(all);
    clipdb_results_free(one);
    clipdb_db_close(db);
    for (i = 0; i < 3; i++) free(bytes[i]);
}
