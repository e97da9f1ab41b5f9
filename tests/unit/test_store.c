/* Unit tests of src/store: the database file, items, deletion, captions
** parsers, hashing. Model-free: databases are created with
** cdb_db_create_raw and filled with synthetic vectors. */
#include <pthread.h>
#include <sqlite3.h>
#include <stdint.h>

#include "store/captions.h"
#include "store/sindex.h"
#include "store/store.h"
#include "test.h"

#define D 8

static void db_path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", test_tmpdir(), name);
    remove(buf);
}

static void fill_vec(float *v, int seed)
{
    int i;
    for (i = 0; i < D; i++) v[i] = (float)((seed * 7 + i * 3) % 11) - 5.0f + 0.25f * (float)i;
}

TEST(store_create_insert_reopen)
{
    char path[512];
    clipdb_db *db = NULL;
    clipdb_db_stats st;
    const cdb_vecset *vs;
    float v[D];
    int64_t img = -1, cap = -1, txt = -1;
    double n2 = 0;
    int i;

    db_path(path, sizeof path, "a.db");
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    REQUIRE(cdb_db_begin(db) == CLIPDB_OK);
    fill_vec(v, 1);
    REQUIRE(cdb_db_insert_image(db, "x/a.jpg", "/abs/x/a.jpg", 123, "00ff", v, &img) == CLIPDB_OK);
    REQUIRE(cdb_db_set_meta_json(db, img, "{\"split\":\"val\",\"image_id\":139}") == CLIPDB_OK);
    fill_vec(v, 2);
    REQUIRE(cdb_db_insert_text(db, "a cat", img, v, &cap) == CLIPDB_OK);
    fill_vec(v, 3);
    REQUIRE(cdb_db_insert_text(db, "a dog", -1, v, &txt) == CLIPDB_OK);
    REQUIRE(cdb_db_commit(db) == CLIPDB_OK);
    clipdb_db_close(db);

    REQUIRE(clipdb_db_open(&db, path, NULL) == CLIPDB_OK);
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.images == 1 && st.texts == 2 && st.captions == 1 && st.vectors == 3);
    CHECK(!strcmp(st.model, "clip-test-1"));
    CHECK(st.embed_dim == D);
    clipdb_db_stats_free(&st); /* the caller frees (the list of vector sets) */
    REQUIRE(cdb_db_vectors(db, CLIPDB_ITEM_TEXT, &vs) == CLIPDB_OK);
    REQUIRE(vs->n == 2);
    CHECK(vs->ids[0] == cap && vs->ids[1] == txt);
    fill_vec(v, 3);
    for (i = 0; i < D; i++) {
        CHECK(vs->vecs[D + i] == v[i]); /* stored raw, not normalised */
        n2 += (double)v[i] * v[i];
    }
    CHECK_NEAR(vs->norms[1], sqrt(n2), 1e-5);
    clipdb_db_close(db);
}

static int count_tables(clipdb_db *db, const char *like)
{
    sqlite3_stmt *st = NULL;
    int n = -1;
    if (sqlite3_prepare_v2(db->sql, "SELECT count(*) FROM sqlite_schema WHERE name LIKE ?", -1,
                           &st, NULL) != SQLITE_OK)
        return -1;
    sqlite3_bind_text(st, 1, like, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return n;
}

/* The stored-index types make their own tables (db.c names none): a new
** file has them; a read-only handle refuses to make any; on a read-write
** one, making them again changes nothing. */
TEST(store_index_types_own_their_tables)
{
    char path[512];
    clipdb_db *db = NULL;
    clipdb_db_options o;
    db_path(path, sizeof path, "tables.db");
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    CHECK(count_tables(db, "ivf%") == 3 && count_tables(db, "faiss%") == 3);
    REQUIRE(cdb_db_begin(db) == CLIPDB_OK);
    CHECK(cdb_sindex_ensure_tables(db) == CLIPDB_OK);
    REQUIRE(cdb_db_commit(db) == CLIPDB_OK);
    CHECK(count_tables(db, "ivf%") == 3 && count_tables(db, "faiss%") == 3);
    REQUIRE(cdb_db_exec(db, "DROP TABLE faiss_ids") == CLIPDB_OK);
    clipdb_db_close(db);
    clipdb_db_options_init(&o);
    o.readonly = 1;
    REQUIRE(clipdb_db_open(&db, path, &o) == CLIPDB_OK);
    CHECK(cdb_sindex_ensure_tables(db) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_db_errmsg(db), "read-only") != NULL);
    CHECK(count_tables(db, "faiss%") == 1); /* faiss_ids went with its index */
    clipdb_db_close(db);
}

/* The image-caption pairs of a split (training): the images of the split
** that have captions, in id order, each with its captions in id order;
** read through the split reader evaluation uses (cdb_db_split). */
TEST(store_pairs_group_a_split_by_image)
{
    char path[512];
    clipdb_db *db = NULL;
    cdb_pairs *p = NULL;
    float v[D];
    int64_t a = -1, b = -1, c = -1, t = -1;
    fill_vec(v, 1);
    db_path(path, sizeof path, "pairs.db");
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    REQUIRE(cdb_db_begin(db) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_image(db, "a.jpg", "/abs/a.jpg", 1, "aa", v, &a) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_image(db, "b.jpg", "/abs/b.jpg", 1, "bb", v, &b) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_image(db, "c.jpg", "/abs/c.jpg", 1, "cc", v, &c) == CLIPDB_OK);
    REQUIRE(cdb_db_set_meta_json(db, a, "{\"split\":\"train\"}") == CLIPDB_OK);
    REQUIRE(cdb_db_set_meta_json(db, b, "{\"split\":\"train\"}") == CLIPDB_OK); /* no caption */
    REQUIRE(cdb_db_set_meta_json(db, c, "{\"split\":\"val\"}") == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "a one", a, v, &t) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "c one", c, v, &t) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "a two", a, v, &t) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "no image", -1, v, &t) == CLIPDB_OK);
    REQUIRE(cdb_db_commit(db) == CLIPDB_OK);

    REQUIRE(cdb_db_pairs(db, "train", &p) == CLIPDB_OK);
    REQUIRE(p->n == 1 && p->n_captions == 2);
    CHECK(p->img[0].id == a && !strcmp(p->img[0].path, "/abs/a.jpg"));
    REQUIRE(p->img[0].n_captions == 2);
    CHECK(!strcmp(p->img[0].captions[0], "a one") && !strcmp(p->img[0].captions[1], "a two"));
    cdb_pairs_free(p);
    REQUIRE(cdb_db_pairs(db, NULL, &p) == CLIPDB_OK);
    REQUIRE(p->n == 2 && p->n_captions == 3);
    CHECK(p->img[0].id == a && p->img[1].id == c && p->img[1].n_captions == 1 &&
          !strcmp(p->img[1].captions[0], "c one"));
    cdb_pairs_free(p);
    REQUIRE(cdb_db_pairs(db, "test", &p) == CLIPDB_OK);
    CHECK(p->n == 0 && p->n_captions == 0);
    cdb_pairs_free(p);
    clipdb_db_close(db);
}

TEST(store_refuses_other_files_and_newer_versions)
{
    char path[512];
    clipdb_db *db = NULL;
    sqlite3 *s = NULL;
    FILE *f;

    /* missing */
    db_path(path, sizeof path, "missing.db");
    CHECK(clipdb_db_open(&db, path, NULL) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_db_errmsg(db), "no such database") != NULL);
    clipdb_db_close(db);

    /* not SQLite */
    db_path(path, sizeof path, "garbage.db");
    f = fopen(path, "wb");
    REQUIRE(f);
    for (int i = 0; i < 4096; i++) fputc('x', f);
    fclose(f);
    CHECK(clipdb_db_open(&db, path, NULL) == CLIPDB_EFORMAT);
    CHECK(strstr(clipdb_db_errmsg(db), "not a clipdb database") != NULL);
    clipdb_db_close(db);

    /* SQLite, another application */
    db_path(path, sizeof path, "other.db");
    REQUIRE(sqlite3_open(path, &s) == SQLITE_OK);
    REQUIRE(sqlite3_exec(s, "CREATE TABLE t(x); PRAGMA application_id=7;", 0, 0, 0) == SQLITE_OK);
    sqlite3_close(s);
    CHECK(clipdb_db_open(&db, path, NULL) == CLIPDB_EFORMAT);
    CHECK(strstr(clipdb_db_errmsg(db), "not a clipdb database") != NULL);
    clipdb_db_close(db);

    /* newer format version */
    db_path(path, sizeof path, "newer.db");
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    clipdb_db_close(db);
    REQUIRE(sqlite3_open(path, &s) == SQLITE_OK);
    {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version=%d;", CLIPDB_DB_VERSION + 1);
        REQUIRE(sqlite3_exec(s, sql, 0, 0, 0) == SQLITE_OK);
    }
    sqlite3_close(s);
    CHECK(clipdb_db_open(&db, path, NULL) == CLIPDB_EFORMAT);
    CHECK(strstr(clipdb_db_errmsg(db), "newer") != NULL);
    clipdb_db_close(db);

    /* create refuses to overwrite */
    CHECK(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_db_errmsg(db), "already exists") != NULL);
    clipdb_db_close(db);

    /* an image limit above the library's */
    {
        clipdb_db_options o;
        clipdb_db_options_init(&o);
        o.max_image_pixels = (unsigned long long)CLIPDB_MAX_IMAGE_PIXELS + 1;
        db_path(path, sizeof path, "limit.db");
        REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
        clipdb_db_close(db);
        CHECK(clipdb_db_open(&db, path, &o) == CLIPDB_EINVAL);
        CHECK(strstr(clipdb_db_errmsg(db), "above the largest") != NULL);
        clipdb_db_close(db);
    }
}

TEST(store_rm_deletes_captions_and_is_atomic)
{
    char path[512];
    clipdb_db *db = NULL;
    clipdb_db_stats st;
    const cdb_vecset *vs;
    float v[D];
    int64_t img, c1, c2, txt, ids[2], n_items, n_caps;

    db_path(path, sizeof path, "rm.db");
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    REQUIRE(cdb_db_begin(db) == CLIPDB_OK);
    fill_vec(v, 1);
    REQUIRE(cdb_db_insert_image(db, "a.jpg", "/abs/a.jpg", 1, "aa", v, &img) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "one", img, v, &c1) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "two", img, v, &c2) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_text(db, "alone", -1, v, &txt) == CLIPDB_OK);
    REQUIRE(cdb_db_commit(db) == CLIPDB_OK);
    REQUIRE(cdb_db_vectors(db, CLIPDB_ITEM_TEXT, &vs) == CLIPDB_OK);
    CHECK(vs->n == 3);

    /* an unknown id: nothing deleted */
    ids[0] = img;
    ids[1] = 9999;
    CHECK(clipdb_db_rm(db, ids, 2, &n_items, &n_caps) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_db_errmsg(db), "9999") != NULL);
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.images == 1 && st.texts == 3);
    clipdb_db_stats_free(&st);

    REQUIRE(clipdb_db_rm(db, ids, 1, &n_items, &n_caps) == CLIPDB_OK);
    CHECK(n_items == 1 && n_caps == 2);
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.images == 0 && st.texts == 1 && st.vectors == 1);
    clipdb_db_stats_free(&st);
    /* the cached vectors are reloaded after the change */
    REQUIRE(cdb_db_vectors(db, CLIPDB_ITEM_TEXT, &vs) == CLIPDB_OK);
    CHECK(vs->n == 1 && vs->ids[0] == txt);
    clipdb_db_close(db);
}

TEST(store_vectors_reload_after_another_writer)
{
    char path[512];
    clipdb_db *a = NULL, *b = NULL;
    const cdb_vecset *vs;
    float v[D];
    int64_t id;

    db_path(path, sizeof path, "two.db");
    REQUIRE(cdb_db_create_raw(&a, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    REQUIRE(clipdb_db_open(&b, path, NULL) == CLIPDB_OK);
    REQUIRE(cdb_db_vectors(b, CLIPDB_ITEM_IMAGE, &vs) == CLIPDB_OK);
    CHECK(vs->n == 0);
    fill_vec(v, 4);
    REQUIRE(cdb_db_begin(a) == CLIPDB_OK);
    REQUIRE(cdb_db_insert_image(a, "b.png", "/abs/b.png", 1, "bb", v, &id) == CLIPDB_OK);
    REQUIRE(cdb_db_commit(a) == CLIPDB_OK);
    REQUIRE(cdb_db_vectors(b, CLIPDB_ITEM_IMAGE, &vs) == CLIPDB_OK);
    CHECK(vs->n == 1);
    clipdb_db_close(a);
    clipdb_db_close(b);
}

TEST(store_rejects_bad_vectors_and_metadata)
{
    char path[512];
    clipdb_db *db = NULL;
    float v[D];
    int64_t id;

    db_path(path, sizeof path, "bad.db");
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) == CLIPDB_OK);
    REQUIRE(cdb_db_begin(db) == CLIPDB_OK);
    fill_vec(v, 1);
    v[3] = NAN;
    CHECK(cdb_db_insert_text(db, "nan", -1, v, &id) == CLIPDB_EINVAL);
    fill_vec(v, 1);
    REQUIRE(cdb_db_insert_text(db, "ok", -1, v, &id) == CLIPDB_OK);
    CHECK(cdb_db_set_meta_json(db, id, "[1,2]") == CLIPDB_EFORMAT);
    CHECK(cdb_db_set_meta_json(db, id, "{\"a\":") == CLIPDB_EFORMAT);
    cdb_db_rollback(db);
    clipdb_db_close(db);
}

TEST(store_sha256_known_answer)
{
    char hex[65];
    cdb_err e;
    cdb_err_clear(&e);
    REQUIRE(cdb_sha256_hex("abc", 3, hex, &e) == CLIPDB_OK);
    CHECK(!strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
}

/* ---- captions ---- */

static int parse(const char *text, const char *name, cdb_captions **c, cdb_err *e)
{
    cdb_err_clear(e);
    return cdb_captions_parse(text, strlen(text), name, c, e);
}

TEST(store_captions_jsonl)
{
    cdb_captions *c = NULL;
    cdb_caption_entry *x;
    cdb_err e;
    const char *t =
        "{\"image\": \"b.jpg\", \"image_id\": 2, \"split\": \"val\", \"captions\": [\"b1\", \"b2\"]}\n"
        "\n"
        "{\"image\": \"a.jpg\", \"captions\": [\"a1\"]}\r\n"
        "{\"image\": \"b.jpg\", \"captions\": [\"b3\"]}\n";
    REQUIRE(parse(t, "c.jsonl", &c, &e) == CLIPDB_OK);
    CHECK(!strcmp(c->format, "jsonl"));
    CHECK(c->n == 2 && c->n_captions == 4);
    x = cdb_captions_find(c, "b.jpg");
    REQUIRE(x);
    REQUIRE(x->n_captions == 3);
    CHECK(!strcmp(x->captions[0], "b1") && !strcmp(x->captions[2], "b3"));
    REQUIRE(x->meta_json);
    CHECK(strstr(x->meta_json, "\"split\":\"val\"") && strstr(x->meta_json, "\"image_id\":2"));
    CHECK(!strstr(x->meta_json, "captions"));
    x = cdb_captions_find(c, "a.jpg");
    REQUIRE(x);
    CHECK(x->meta_json == NULL && x->n_captions == 1);
    CHECK(cdb_captions_find(c, "z.jpg") == NULL);
    cdb_captions_free(c);
}

TEST(store_captions_jsonl_errors_name_the_line)
{
    cdb_captions *c = NULL;
    cdb_err e;
    CHECK(parse("{\"image\":\"a\",\"captions\":[\"x\"]}\n{\"image\": \"b\", \"captions\": [\"y\"\n",
                "c.jsonl", &c, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "c.jsonl:2:") != NULL);
    CHECK(parse("{\"image\":\"a\",\"captions\":[\"x\"]}\n\n{\"captions\":[\"x\"]}\n", "c.jsonl", &c,
                &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "c.jsonl:3:") && strstr(e.msg, "image"));
    CHECK(parse("{\"image\":\"a\",\"captions\":[1]}\n", "c.jsonl", &c, &e) == CLIPDB_EFORMAT);
    CHECK(parse("{\"image\":\"a\",\"captions\":[\"x\"]} junk\n", "c.jsonl", &c, &e) ==
          CLIPDB_EFORMAT);
    CHECK(parse("{\"image\":\"\",\"captions\":[\"x\"]}\n", "c.jsonl", &c, &e) == CLIPDB_EFORMAT);
    CHECK(c == NULL);
}

TEST(store_captions_coco)
{
    cdb_captions *c = NULL;
    cdb_caption_entry *x;
    cdb_err e;
    const char *t = "{\"info\": {}, \"images\": [{\"id\": 139, \"file_name\": \"000139.jpg\"},"
                    " {\"id\": 5, \"file_name\": \"05.jpg\"}],"
                    " \"annotations\": [{\"image_id\": 139, \"id\": 1, \"caption\": \"p\"},"
                    " {\"image_id\": 5, \"caption\": \"q\"}, {\"image_id\": 139, \"caption\": \"r\"}]}";
    REQUIRE(parse(t, "captions_val2017.json", &c, &e) == CLIPDB_OK);
    CHECK(!strcmp(c->format, "coco"));
    CHECK(c->n == 2 && c->n_captions == 3);
    x = cdb_captions_find(c, "000139.jpg");
    REQUIRE(x && x->n_captions == 2);
    CHECK(!strcmp(x->captions[0], "p") && !strcmp(x->captions[1], "r"));
    CHECK(x->meta_json && !strcmp(x->meta_json, "{\"image_id\":139}"));
    cdb_captions_free(c);
    CHECK(parse("{\"images\": [{\"id\": 1, \"file_name\": \"a\"}], \"annotations\": "
                "[{\"image_id\": 2, \"caption\": \"x\"}]}",
                "c.json", &c, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "annotations[0]") != NULL);
    CHECK(parse("{\"images\": 3, \"annotations\": []}", "c.json", &c, &e) == CLIPDB_EFORMAT);
}

TEST(store_captions_csv_rfc4180)
{
    cdb_captions *c = NULL;
    cdb_caption_entry *x;
    cdb_err e;
    const char *t = "image,caption,split\r\n"
                    "a.jpg,\"a dog, running\",train\r\n"
                    "a.jpg,\"she said \"\"hi\"\"\nover two lines\",train\r\n"
                    "b.jpg,plain,val\n";
    REQUIRE(parse(t, "c.csv", &c, &e) == CLIPDB_OK);
    CHECK(c->n == 2 && c->n_captions == 3);
    x = cdb_captions_find(c, "a.jpg");
    REQUIRE(x && x->n_captions == 2);
    CHECK(!strcmp(x->captions[0], "a dog, running"));
    CHECK(!strcmp(x->captions[1], "she said \"hi\"\nover two lines"));
    CHECK(x->meta_json && !strcmp(x->meta_json, "{\"split\":\"train\"}"));
    cdb_captions_free(c);
    /* sniffed as CSV without the extension */
    REQUIRE(parse("caption,image\nx,y.png\n", "caps.txt", &c, &e) == CLIPDB_OK);
    CHECK(!strcmp(c->format, "csv") && c->n == 1 && !strcmp(c->e[0].image, "y.png"));
    cdb_captions_free(c);
    /* errors name the line */
    CHECK(parse("image,caption\na.jpg,x\nb.jpg,y,z\n", "c.csv", &c, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "c.csv:3:") != NULL);
    CHECK(parse("image,caption\na.jpg,\"open\n", "c.csv", &c, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "unterminated") != NULL);
    CHECK(parse("image,caption\na.jpg,\"x\"y\n", "c.csv", &c, &e) == CLIPDB_EFORMAT);
    CHECK(parse("file,text\na,b\n", "c.csv", &c, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "c.csv:1:") != NULL);
}

TEST(store_captions_shared_coco_subset)
{
    const char *sh = test_shared_dir();
    char path[1024];
    cdb_captions *c = NULL;
    cdb_err e;
    if (!sh) SKIP("shared data not found (../shared or $CLIPDB_SHARED)");
    snprintf(path, sizeof path, "%s/data/coco-subset/captions.jsonl", sh);
    cdb_err_clear(&e);
    REQUIRE(cdb_captions_load(path, &c, &e) == CLIPDB_OK);
    CHECK(c->n == 338);
    CHECK(c->n_captions == 1690);
    cdb_captions_free(c);
}

/* A database of n images and n texts with varied vectors. */
static clipdb_db *filled_db(const char *name, int n)
{
    char path[512];
    clipdb_db *db = NULL;
    float v[D];
    int64_t id;
    int i, j;
    db_path(path, sizeof path, name);
    if (cdb_db_create_raw(&db, path, "clip-test-1", D, NULL) != CLIPDB_OK) return NULL;
    if (cdb_db_begin(db) != CLIPDB_OK) return NULL;
    for (i = 0; i < n; i++) {
        char p[64];
        for (j = 0; j < D; j++) v[j] = (float)((i * 31 + j * 17) % 13) - 6.0f + 0.1f * (float)j;
        snprintf(p, sizeof p, "/abs/%d.jpg", i);
        if (cdb_db_insert_image(db, p + 5, p, 1, "aa", v, &id) != CLIPDB_OK) return NULL;
        v[0] += 1.0f;
        if (cdb_db_insert_text(db, p, -1, v, &id) != CLIPDB_OK) return NULL;
    }
    if (cdb_db_commit(db) != CLIPDB_OK) return NULL;
    return db;
}

/* The error rule on a fresh handle: errcode OK and errmsg "" (not a
** message) until a call fails; then the failing call's code and message;
** then "" again after a call that succeeds. */
TEST(store_errcode_errmsg_fresh_handle)
{
    clipdb_db *db = filled_db("err.db", 4);
    clipdb_db_stats st;
    int64_t bad = 999;
    REQUIRE(db);
    CHECK(clipdb_db_errcode(db) == CLIPDB_OK);
    CHECK(!strcmp(clipdb_db_errmsg(db), ""));
    CHECK(clipdb_db_rm(db, &bad, 1, NULL, NULL) == CLIPDB_ENOTFOUND);
    CHECK(clipdb_db_errcode(db) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_db_errmsg(db), "999") != NULL);
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    clipdb_db_stats_free(&st);
    CHECK(clipdb_db_errcode(db) == CLIPDB_OK);
    CHECK(!strcmp(clipdb_db_errmsg(db), ""));
    CHECK(clipdb_db_errcode(NULL) == CLIPDB_ENOMEM);
    clipdb_db_close(db);
}

/* More stored indexes than the old fixed array of 8 held: 6 IVF + 6 Faiss. */
TEST(store_stats_lists_every_index)
{
    clipdb_db *db = filled_db("stats12.db", 20);
    clipdb_index_options o;
    clipdb_db_stats st;
    int t, m, n_ivf = 0, n_faiss = 0, i;
    REQUIRE(db);
    for (t = CLIPDB_ITEM_IMAGE; t <= CLIPDB_ITEM_TEXT; t++)
        for (m = 0; m < 3; m++) {
            clipdb_index_options_init(&o);
            o.target = t;
            o.metric = (clipdb_metric)m;
            o.nlist = 2;
            REQUIRE(clipdb_db_build_ivf(db, &o) == CLIPDB_OK);
            REQUIRE(clipdb_db_build_faiss(db, &o, "Flat") == CLIPDB_OK);
        }
    REQUIRE(clipdb_db_get_stats(db, &st) == CLIPDB_OK);
    CHECK(st.n_indexes == 12);
    for (i = 0; i < st.n_indexes; i++) {
        if (!strcmp(st.indexes[i].kind, "ivf")) {
            n_ivf++;
            CHECK(st.indexes[i].nlist == 2 && st.indexes[i].n_vectors == 20);
        } else {
            n_faiss++;
            CHECK(st.indexes[i].factory && !strcmp(st.indexes[i].factory, "Flat"));
        }
    }
    CHECK(n_ivf == 6 && n_faiss == 6);
    clipdb_db_stats_free(&st);
    CHECK(st.indexes == NULL && st.n_indexes == 0);
    clipdb_db_stats_free(&st); /* twice is harmless */
    clipdb_db_close(db);
}

/* Index failures keep their codes through clipdb_db_search: no stored
** index is ENOTFOUND, a corrupt one EFORMAT, a Faiss spec that Faiss
** refuses the shim's code; and the stored IVF serves text searches after
** items are added and deleted (the write hook keeps its lists). */
TEST(store_index_errors_keep_codes)
{
    clipdb_db *db = filled_db("codes.db", 12);
    clipdb_search_options so;
    clipdb_index_options o;
    clipdb_results *res = NULL;
    clipdb_query q;
    sqlite3 *raw;
    char path[512];
    int64_t first;
    float v[D];
    REQUIRE(db);
    memset(&q, 0, sizeof q);
    q.kind = CLIPDB_QUERY_ITEM;
    q.item = 2; /* a text */
    clipdb_search_options_init(&so);
    so.target = CLIPDB_ITEM_TEXT;
    so.index = CLIPDB_INDEX_IVF;
    so.k = 3;
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_ENOTFOUND);
    CHECK(clipdb_db_errcode(db) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_db_errmsg(db), "no IVF index for text vectors") != NULL);
    CHECK(strstr(clipdb_db_errmsg(db), "clipdb ") == NULL); /* no CLI command */
    so.index = CLIPDB_INDEX_FAISS;
    so.faiss = "NoSuchIndex"; /* refused before Faiss sees it: a bad argument */
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_db_errmsg(db), "Faiss factory string 'NoSuchIndex' not accepted") != NULL);
    so.faiss = "PQ4x16"; /* accepted, but Faiss's own training fails: its error */
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_ERROR);
    CHECK(strstr(clipdb_db_errmsg(db), "Faiss") != NULL);
    so.faiss = NULL;
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_ENOTFOUND);

    clipdb_index_options_init(&o);
    o.target = CLIPDB_ITEM_TEXT;
    o.nlist = 3;
    REQUIRE(clipdb_db_build_ivf(db, &o) == CLIPDB_OK);
    so.index = CLIPDB_INDEX_IVF;
    so.nprobe = 3;
    REQUIRE(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_OK);
    CHECK(res->offsets[1] == 3 && res->results[0].id == 2);
    clipdb_results_free(res);
    res = NULL;
    /* a write after the build: the new text joins its list, the deleted
    ** one leaves it */
    REQUIRE(cdb_db_begin(db) == CLIPDB_OK);
    fill_vec(v, 5);
    REQUIRE(cdb_db_insert_text(db, "new", -1, v, &first) == CLIPDB_OK);
    REQUIRE(cdb_db_commit(db) == CLIPDB_OK);
    CHECK(clipdb_db_rm(db, &q.item, 1, NULL, NULL) == CLIPDB_OK);
    q.item = first;
    REQUIRE(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_OK);
    CHECK(res->results[0].id == first);
    CHECK(res->offsets[1] == 3 && res->results[1].id != 2 && res->results[2].id != 2);
    clipdb_results_free(res);
    res = NULL;

    /* corrupt centroids: EFORMAT, kept */
    snprintf(path, sizeof path, "%s/codes.db", test_tmpdir());
    REQUIRE(sqlite3_open(path, &raw) == SQLITE_OK);
    CHECK(sqlite3_exec(raw, "UPDATE ivf SET centroids = x'00'", NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(raw);
    CHECK(clipdb_db_search(db, &q, 1, &so, &res) == CLIPDB_EFORMAT);
    CHECK(strstr(clipdb_db_errmsg(db), "corrupt IVF index") != NULL);
    clipdb_db_close(db);
}

/* Concurrent searches: several threads, each with its own handle on one
** file (the documented way to search in parallel), exact and IVF, give the
** serial answers. The TSan build (make tsan) runs this. */
typedef struct search_job {
    const char *path;
    const int64_t *want;  /* 4 queries x 5 ids, exact then IVF */
    int bad;
} search_job;

static int search_ids(clipdb_db *db, clipdb_index_kind kind, int64_t *ids)
{
    clipdb_search_options so;
    clipdb_results *res = NULL;
    clipdb_query q[4];
    int i, j;
    memset(q, 0, sizeof q);
    for (i = 0; i < 4; i++) {
        q[i].kind = CLIPDB_QUERY_ITEM;
        q[i].item = 1 + 2 * i;
    }
    clipdb_search_options_init(&so);
    so.k = 5;
    so.index = kind;
    so.nprobe = 2;
    if (clipdb_db_search(db, q, 4, &so, &res) != CLIPDB_OK) return -1;
    for (i = 0; i < 4; i++)
        for (j = 0; j < 5; j++)
            ids[i * 5 + j] = res->offsets[i] + (size_t)j < res->offsets[i + 1]
                                 ? res->results[res->offsets[i] + (size_t)j].id
                                 : -1;
    clipdb_results_free(res);
    return 0;
}

static void *search_thread(void *arg)
{
    search_job *j = arg;
    clipdb_db_options o;
    clipdb_db *db = NULL;
    int64_t got[40];
    int r, i;
    clipdb_db_options_init(&o);
    o.readonly = 1;
    if (clipdb_db_open(&db, j->path, &o) != CLIPDB_OK) {
        j->bad++;
        clipdb_db_close(db);
        return NULL;
    }
    for (r = 0; r < 10; r++) {
        if (search_ids(db, CLIPDB_INDEX_EXACT, got) || search_ids(db, CLIPDB_INDEX_IVF, got + 20)) {
            j->bad++;
            break;
        }
        for (i = 0; i < 40; i++) j->bad += got[i] != j->want[i];
    }
    clipdb_db_close(db);
    return NULL;
}

TEST(store_concurrent_searches)
{
    clipdb_db *db = filled_db("conc.db", 60);
    clipdb_index_options o;
    search_job jobs[4];
    pthread_t th[4];
    int64_t want[40];
    char path[512];
    int i, started = 0;
    REQUIRE(db);
    clipdb_index_options_init(&o);
    o.nlist = 4;
    REQUIRE(clipdb_db_build_ivf(db, &o) == CLIPDB_OK);
    REQUIRE(search_ids(db, CLIPDB_INDEX_EXACT, want) == 0);
    REQUIRE(search_ids(db, CLIPDB_INDEX_IVF, want + 20) == 0);
    clipdb_db_close(db);
    snprintf(path, sizeof path, "%s/conc.db", test_tmpdir());
    for (i = 0; i < 4; i++) {
        jobs[i] = (search_job){path, want, 0};
        if (pthread_create(&th[i], NULL, search_thread, &jobs[i]) != 0) break;
        started++;
    }
    CHECK(started == 4);
    for (i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        CHECK(jobs[i].bad == 0);
    }
}

/* clipdb_db_check through the C API: a clean database (with IVF and Faiss
** indexes) has no problem; a NaN component and an orphan caption written
** behind the library's back are found and named by id; the report frees
** cleanly (twice is harmless). */
TEST(store_check_finds_damage_by_id)
{
    clipdb_db *db = filled_db("check.db", 10);
    clipdb_db_check_report r;
    clipdb_index_options o;
    sqlite3 *raw = NULL;
    char path[512];
    int i, nan_found = 0, orphan_found = 0;
    REQUIRE(db);
    clipdb_index_options_init(&o);
    o.nlist = 2;
    REQUIRE(clipdb_db_build_ivf(db, &o) == CLIPDB_OK);
    REQUIRE(clipdb_db_build_faiss(db, &o, "Flat") == CLIPDB_OK);
    REQUIRE(clipdb_db_check(db, 0, &r) == CLIPDB_OK);
    CHECK(r.n_problems == 0 && r.n_listed == 0);
    CHECK(r.items == 20 && r.vectors == 20 && r.indexes == 2);
    clipdb_db_check_free(&r);

    snprintf(path, sizeof path, "%s/check.db", test_tmpdir());
    REQUIRE(sqlite3_open(path, &raw) == SQLITE_OK);
    /* item 3 (an image): its first component NaN (0x7fc00000, little-endian) */
    CHECK(sqlite3_exec(raw, "UPDATE vectors_image SET vec = x'0000c07f' || substr(vec, 5) "
                            "WHERE id = 3", NULL, NULL, NULL) == SQLITE_OK);
    /* item 4 (a text): a caption of an image that does not exist */
    CHECK(sqlite3_exec(raw, "UPDATE items SET image = 777 WHERE id = 4", NULL, NULL, NULL) ==
          SQLITE_OK);
    sqlite3_close(raw);
    REQUIRE(clipdb_db_check(db, 1, &r) == CLIPDB_OK);
    CHECK(r.n_problems == 2 && r.n_listed == 2);
    for (i = 0; i < r.n_listed; i++) {
        if (!strcmp(r.problems[i].kind, "vector") && r.problems[i].item == 3 &&
            strstr(r.problems[i].message, "not finite"))
            nan_found = 1;
        if (!strcmp(r.problems[i].kind, "orphan_caption") && r.problems[i].item == 4 &&
            strstr(r.problems[i].message, "777"))
            orphan_found = 1;
    }
    CHECK(nan_found && orphan_found);
    clipdb_db_check_free(&r);
    CHECK(r.problems == NULL && r.n_listed == 0);
    clipdb_db_check_free(&r);
    clipdb_db_check_free(NULL);
    clipdb_db_close(db);
}

/* The --batch query-file parser (clipdb_queries_parse): kinds, CRLF, empty
** lines; each bad file refused with FILE:LINE and nothing left to free. */
TEST(store_queries_parse)
{
    static const char ok[] = "a dog\nitem:17\n\nimage:x/cat.jpg\r\n  spaced text \nlast";
    static const struct {
        const char *data;
        size_t len;
        int rc;
        const char *msg;
    } bad[] = {
        {"one\ntwo\0three\n", 14, CLIPDB_EFORMAT, "q.txt:2: NUL byte"},
        {"a\nitem:x\n", 9, CLIPDB_EFORMAT, "q.txt:2: item:"},
        {"item:-1\n", 8, CLIPDB_EFORMAT, "q.txt:1: item:"},
        {"item:9223372036854775808", 24, CLIPDB_EFORMAT, "q.txt:1: item:"},
        {"item:12 \n", 9, CLIPDB_EFORMAT, "q.txt:1: item:"},
        {"image:\n", 7, CLIPDB_EFORMAT, "q.txt:1: image:"},
        {"\n\r\n\n", 4, CLIPDB_EINVAL, "no queries"},
        {"", 0, CLIPDB_EINVAL, "no queries"},
    };
    clipdb_query_list l;
    char *err = NULL, *many;
    size_t i, n_many = (size_t)CLIPDB_MAX_BATCH_QUERIES + 1;
    REQUIRE(clipdb_queries_parse(ok, sizeof ok - 1, "q.txt", &l, &err) == CLIPDB_OK);
    CHECK(err == NULL && l.n == 5);
    CHECK(l.queries[0].kind == CLIPDB_QUERY_TEXT && !strcmp(l.queries[0].text, "a dog"));
    CHECK(l.queries[1].kind == CLIPDB_QUERY_ITEM && l.queries[1].item == 17);
    CHECK(l.queries[2].kind == CLIPDB_QUERY_IMAGE && !strcmp(l.queries[2].path, "x/cat.jpg"));
    CHECK(l.queries[3].kind == CLIPDB_QUERY_TEXT && !strcmp(l.queries[3].text, "  spaced text "));
    CHECK(l.queries[4].kind == CLIPDB_QUERY_TEXT && !strcmp(l.queries[4].text, "last"));
    clipdb_query_list_free(&l);
    CHECK(l.queries == NULL && l.storage == NULL && l.n == 0);
    clipdb_query_list_free(NULL);
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(clipdb_queries_parse(bad[i].data, bad[i].len, "q.txt", &l, &err) == bad[i].rc);
        CHECK(err && strstr(err, bad[i].msg));
        CHECK(l.n == 0 && l.queries == NULL && l.storage == NULL);
        clipdb_free(err);
        err = NULL;
    }
    /* one query too many: CLIPDB_ELIMIT naming the line */
    REQUIRE((many = malloc(2 * n_many)) != NULL);
    for (i = 0; i < n_many; i++) {
        many[2 * i] = 'a';
        many[2 * i + 1] = '\n';
    }
    CHECK(clipdb_queries_parse(many, 2 * n_many, "q.txt", &l, &err) == CLIPDB_ELIMIT);
    CHECK(err && strstr(err, "more than"));
    clipdb_free(err);
    err = NULL;
    CHECK(clipdb_queries_parse(many, 2 * n_many - 2, "q.txt", &l, &err) == CLIPDB_OK);
    CHECK(l.n == n_many - 1);
    clipdb_query_list_free(&l);
    free(many);
}
