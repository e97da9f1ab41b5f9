/* Unit tests of src/store/vsets.c without a model: refusals that must not
** create the tables of sets (a file without sets stays as it is), and a named
** set written straight into the tables (as clipdb_db_reembed leaves them)
** read back by search, stats, rm and the eval export, with a dimension other
** than the base set's. The encoding half (reembed) is tested through the CLI
** in tests/cli/test_vsets.py. */
#include <math.h>
#include <sqlite3.h>
#include <stdint.h>

#include "store/store.h"
#include "test.h"

#define D 8   /* base set */
#define D2 4  /* the named set */
#define N 6   /* images (and as many texts) */

static clipdb_db *make_db(const char *name)
{
    char path[512];
    clipdb_db *db = NULL;
    float v[D];
    int64_t id;
    int i, j;
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), name);
    remove(path);
    if (cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) != CLIPDB_OK) return NULL;
    if (cdb_db_begin(db) != CLIPDB_OK) return NULL;
    for (i = 0; i < N; i++) {
        char p[64];
        for (j = 0; j < D; j++) v[j] = (float)((i * 5 + j * 3) % 7) - 3.0f + 0.1f * (float)j;
        snprintf(p, sizeof p, "/abs/%d.jpg", i);
        if (cdb_db_insert_image(db, p + 5, p, 1, "aa", v, &id) != CLIPDB_OK) return NULL;
        if (cdb_db_insert_text(db, p, -1, v, &id) != CLIPDB_OK) return NULL;
    }
    if (cdb_db_commit(db) != CLIPDB_OK) return NULL;
    return db;
}

/* The named set's vector of image i: D2 floats, distinct directions. */
static void set_vec(int i, float *v)
{
    int j;
    for (j = 0; j < D2; j++) v[j] = (float)(j == i % D2) * (1.0f + 0.1f * (float)i) + 0.01f * (float)j;
}

/* Writes set "ft" holding the first n images (ids 1, 3, 5, ... as made by
** make_db: image, text, image, text ...). */
static int write_set(clipdb_db *db, int n)
{
    sqlite3_stmt *st = NULL;
    float v[D2];
    int i, rc = SQLITE_OK;
    if (sqlite3_exec(db->sql,
                     "CREATE TABLE vector_sets(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
                     " model_dir TEXT NOT NULL, model_identity TEXT NOT NULL, precision TEXT NOT "
                     "NULL, dim INTEGER NOT NULL, created_at INTEGER NOT NULL);"
                     "CREATE TABLE set_vectors(set_id INTEGER NOT NULL, type INTEGER NOT NULL,"
                     " id INTEGER NOT NULL, norm REAL NOT NULL, vec BLOB NOT NULL,"
                     " UNIQUE(set_id, type, id));"
                     "CREATE INDEX set_vectors_id ON set_vectors(id);"
                     "INSERT INTO vector_sets VALUES(7, 'ft', '/nowhere', 'clip-test-2', 'fp32', 4, 1);",
                     NULL, NULL, NULL) != SQLITE_OK)
        return 1;
    if (sqlite3_prepare_v2(db->sql, "INSERT INTO set_vectors VALUES(7, 1, ?, ?, ?)", -1, &st,
                           NULL) != SQLITE_OK)
        return 1;
    for (i = 0; i < n && rc == SQLITE_OK; i++) {
        set_vec(i, v);
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, 1 + 2 * i);
        sqlite3_bind_double(st, 2, (double)cdb_norm(v, D2));
        sqlite3_bind_blob(st, 3, v, sizeof v, SQLITE_TRANSIENT);
        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
    }
    sqlite3_finalize(st);
    db->local_changes++;
    return rc != SQLITE_OK;
}

TEST(vsets_refusals_create_nothing)
{
    clipdb_db *db = make_db("vs-refuse.db");
    clipdb_reembed_options o;
    clipdb_db_stats st;
    static const char *const bad[] = {"", "base", "a b", "x/y", "é",
                                      "12345678901234567890123456789012345678901234567890123456789012345"};
    size_t i;
    REQUIRE(db);
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        clipdb_reembed_options_init(&o);
        o.name = bad[i];
        o.model_dir = "/nowhere";
        CHECK(clipdb_db_reembed(db, &o, NULL) == CLIPDB_EINVAL);
        CHECK(strstr(clipdb_db_errmsg(db), i == 1 ? "'base'" : "bad vector set name") != NULL);
    }
    CHECK(clipdb_db_reembed(db, NULL, NULL) == CLIPDB_EINVAL);
    clipdb_reembed_options_init(&o);
    o.name = "ok";
    CHECK(clipdb_db_reembed(db, &o, NULL) == CLIPDB_EINVAL); /* no model */
    o.model_dir = "/nowhere";
    o.batch_size = 2000;
    CHECK(clipdb_db_reembed(db, &o, NULL) == CLIPDB_EINVAL);
    o.batch_size = 0;
    CHECK(clipdb_db_reembed(db, &o, NULL) != CLIPDB_OK); /* the model does not open */
    CHECK(clipdb_db_drop_set(db, "ft") == CLIPDB_ENOTFOUND);
    CHECK(clipdb_db_drop_set(db, CLIPDB_VECTOR_SET_BASE) == CLIPDB_EINVAL);
    CHECK(!cdb_vsets_present(db));
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.format_version == CDB_DB_VERSION_PLAIN);
    REQUIRE(st.n_sets == 1);
    CHECK(!strcmp(st.sets[0].name, CLIPDB_VECTOR_SET_BASE) && st.sets[0].dim == D);
    CHECK(st.sets[0].images == N && st.sets[0].texts == N);
    clipdb_db_stats_free(&st);
    CHECK(st.sets == NULL && st.n_sets == 0);
    clipdb_db_stats_free(&st);
    clipdb_db_close(db);
}

TEST(vsets_named_set_searched_listed_and_rm)
{
    clipdb_db *db = make_db("vs-named.db");
    clipdb_search_options so;
    clipdb_query q;
    clipdb_results *res = NULL;
    clipdb_db_stats st;
    float got[2 * D2], want[D2];
    int64_t ids[2] = {1, 3}, rm_id = 3;
    char **names = NULL;
    int n = 0, dim = 0;
    const char *model = NULL;
    REQUIRE(db);
    REQUIRE(write_set(db, N - 1) == 0); /* the last image is missing */
    CHECK(cdb_vsets_present(db));

    /* the list, the shapes and the export */
    REQUIRE(cdb_db_vector_sets(db, &names, &n) == CLIPDB_OK);
    CHECK(n == 2 && !strcmp(names[0], "base") && !strcmp(names[1], "ft"));
    cdb_db_vector_sets_free(names, n);
    CHECK(cdb_db_set_shape(db, "ft", &dim, &model) == CLIPDB_OK && dim == D2 &&
          !strcmp(model, "clip-test-2"));
    CHECK(cdb_db_set_shape(db, "nope", &dim, &model) == CLIPDB_ENOTFOUND);
    REQUIRE(cdb_db_set_vectors(db, "ft", CLIPDB_ITEM_IMAGE, ids, 2, got) == CLIPDB_OK);
    set_vec(1, want);
    CHECK(!memcmp(got + D2, want, sizeof want));
    ids[1] = 2 * N - 1; /* the image not in the set */
    CHECK(cdb_db_set_vectors(db, "ft", CLIPDB_ITEM_IMAGE, ids, 2, got) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_db_errmsg(db), "reembed") != NULL);

    /* search: an item query reads the set's vector; the gap is noted */
    clipdb_search_options_init(&so);
    so.vector_set = "ft";
    so.k = N;
    memset(&q, 0, sizeof q);
    q.kind = CLIPDB_QUERY_ITEM;
    q.item = 3;
    REQUIRE(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_OK);
    CHECK(res->offsets[1] == N - 1);
    CHECK(res->results[0].id == 3 && fabsf(res->results[0].score - 1.0f) < 1e-6f);
    CHECK(res->note && strstr(res->note, "lacks 1 of 6 images"));
    clipdb_results_free(res);
    res = NULL;
    so.index = CLIPDB_INDEX_IVF;
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_EINVAL && !res);
    so.index = CLIPDB_INDEX_EXACT;
    so.target = CLIPDB_ITEM_TEXT; /* the set holds no texts: nothing found, said so */
    REQUIRE(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_OK);
    CHECK(res->offsets[1] == 0 && res->note && strstr(res->note, "lacks 6 of 6 texts"));
    clipdb_results_free(res);
    res = NULL;
    so.vector_set = "nope";
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_db_errmsg(db), "(it has: base, ft)") != NULL);

    /* stats: both sets with their counts */
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    REQUIRE(st.n_sets == 2);
    CHECK(!strcmp(st.sets[1].name, "ft") && st.sets[1].dim == D2 && st.sets[1].images == N - 1 &&
          st.sets[1].texts == 0 && !strcmp(st.sets[1].precision, "fp32") &&
          !strcmp(st.sets[1].model, "clip-test-2"));
    clipdb_db_stats_free(&st);

    /* rm deletes the item from every set; the loaded set is reloaded */
    REQUIRE(clipdb_db_rm(db, &rm_id, 1, NULL, NULL) == CLIPDB_OK);
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.sets[0].images == N - 1 && st.sets[1].images == N - 2);
    clipdb_db_stats_free(&st);
    so.vector_set = "ft";
    so.target = CLIPDB_ITEM_IMAGE;
    q.item = 1;
    REQUIRE(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_OK);
    CHECK(res->offsets[1] == N - 2);
    clipdb_results_free(res);

    /* drop: the set and its vectors go, nothing else */
    REQUIRE(clipdb_db_drop_set(db, "ft") == CLIPDB_OK);
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.n_sets == 1 && st.images == N - 1);
    clipdb_db_stats_free(&st);
    CHECK(clipdb_db_drop_set(db, "ft") == CLIPDB_ENOTFOUND);
    clipdb_db_close(db);
}
