/* Unit tests of src/model/ctx.c: the one batched encoder, clipdb_encode_batch:
** the same vectors as one input at a time, across group boundaries, and
** per-input failures (the callee's status code, a message naming the input,
** a zero row) that do not stop the batch. */
#include <unistd.h>

#include "model/model.h"
#include "model/transformer.h"
#include "models.h"
#include "test.h"

static const char *write_file(const char *name, const char *data)
{
    static char paths[4][600];
    static int next;
    char *p = paths[next++ % 4];
    FILE *f;
    snprintf(p, 600, "%s/%s", test_tmpdir(), name);
    f = fopen(p, "wb");
    if (!f) return NULL;
    fputs(data, f);
    fclose(f);
    return p;
}

static int row_is_zero(const float *v, int d)
{
    for (int i = 0; i < d; i++)
        if (v[i] != 0.0f) return 0;
    return 1;
}

static double max_abs_diff(const float *a, const float *b, int d)
{
    double m = 0;
    for (int i = 0; i < d; i++) {
        double x = fabs((double)a[i] - (double)b[i]);
        if (x > m) m = x;
    }
    return m;
}

TEST(ctx_batch_images_skip_bad_files_and_keep_their_codes)
{
    const char *dir = test_tiny_clip_model();
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    clipdb_model_info info;
    char good[2][1100], missing[700];
    const char *bad;
    enum { N = CDB_VISION_CHUNK + 3 };
    const char *paths[N];
    clipdb_item_status st[N];
    float *out = NULL, *one = NULL, *pix = NULL;
    int n_failed = -1, i, d;
    if (!dir) SKIP("../shared (the tokenizer and photos) absent");
    snprintf(good[0], sizeof good[0], "%s/data/coco-subset/images/000000000139.jpg",
             test_shared_dir());
    snprintf(good[1], sizeof good[1], "%s/data/coco-subset/images/000000000790.jpg",
             test_shared_dir());
    if (!cdb_file_exists(good[0]) || !cdb_file_exists(good[1])) SKIP("COCO photos absent");
    bad = write_file("notes.jpg", "this is a text file, not a JPEG\n");
    snprintf(missing, sizeof missing, "%s/no-such-file.jpg", test_tmpdir());
    REQUIRE(bad);
    REQUIRE(clipdb_model_open(&m, dir) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c, m) == CLIPDB_OK);
    clipdb_model_get_info(m, &info);
    d = info.embed_dim;
    /* more inputs than one group: two bad ones inside (a group's files are
    ** decoded on several threads at once), one in the second group */
    for (i = 0; i < N; i++) paths[i] = good[i % 2];
    paths[3] = bad;
    paths[5] = NULL;
    paths[N - 1] = missing;
    out = malloc((size_t)N * d * sizeof *out);
    one = malloc((size_t)d * sizeof *one);
    pix = malloc(clipdb_image_floats(m) * sizeof *pix);
    REQUIRE(out && one && pix);
    REQUIRE(clipdb_encode_batch(c, CLIPDB_INPUT_IMAGE_FILE, paths, N, out, st, &n_failed) ==
            CLIPDB_OK);
    CHECK(n_failed == 3);
    CHECK(st[3].code == CLIPDB_EFORMAT);
    CHECK(st[5].code == CLIPDB_EINVAL && strstr(st[5].msg, "no image path") != NULL);
    CHECK(!strncmp(st[3].msg, bad, strlen(bad)) && strlen(st[3].msg) > strlen(bad) + 2);
    CHECK(st[N - 1].code == CLIPDB_EIO || st[N - 1].code == CLIPDB_ENOTFOUND);
    CHECK(!strncmp(st[N - 1].msg, missing, strlen(missing)));
    CHECK(row_is_zero(out + 3 * d, d) && row_is_zero(out + 5 * d, d) &&
          row_is_zero(out + (size_t)(N - 1) * d, d));
    for (i = 0; i < N; i++) {
        if (i == 3 || i == 5 || i == N - 1) continue;
        CHECK(st[i].code == CLIPDB_OK && st[i].msg[0] == '\0');
        /* the same vector as the image alone */
        REQUIRE(clipdb_image_load(c, paths[i], pix) == CLIPDB_OK);
        REQUIRE(clipdb_encode_images(c, pix, 1, one) == CLIPDB_OK);
        CHECK(max_abs_diff(out + (size_t)i * d, one, d) < 1e-5);
    }
    CHECK(max_abs_diff(out, out + d, d) > 1e-4); /* two photos, two vectors */
    /* without a status array the first bad input in input order fails the
    ** call, named (not the NULL path after it in the same group) */
    CHECK(clipdb_encode_batch(c, CLIPDB_INPUT_IMAGE_FILE, paths, N, out, NULL, &n_failed) ==
          CLIPDB_EFORMAT);
    CHECK(strstr(clipdb_ctx_errmsg(c), bad) != NULL);
    /* bad arguments */
    CHECK(clipdb_encode_batch(c, (clipdb_input_kind)9, paths, 1, out, NULL, NULL) ==
          CLIPDB_EINVAL);
    CHECK(clipdb_encode_batch(c, CLIPDB_INPUT_TEXT, NULL, 1, out, NULL, NULL) == CLIPDB_EINVAL);
    CHECK(clipdb_encode_batch(c, CLIPDB_INPUT_TEXT, paths, 0, out, NULL, &n_failed) == CLIPDB_OK);
    free(out), free(one), free(pix);
    clipdb_ctx_free(c);
    clipdb_model_close(m);
}

/* clipdb_encode_images (the pixel form, which the ingest pipeline uses) runs
** the same image groups as the files of clipdb_encode_batch: across two group
** boundaries, every row is the vector of that image alone (distinct
** pixels per row, so a group read at the wrong offset shows). */
TEST(ctx_encode_images_groups_match_one_at_a_time)
{
    const char *dir = test_tiny_clip_model();
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    clipdb_model_info info;
    enum { N = 2 * CDB_VISION_CHUNK + 5 };
    float *pix = NULL, *out = NULL, *one = NULL;
    size_t px, j;
    int i, d;
    if (!dir) SKIP("../shared (the tokenizer) absent");
    REQUIRE(clipdb_model_open(&m, dir) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c, m) == CLIPDB_OK);
    clipdb_model_get_info(m, &info);
    d = info.embed_dim;
    px = clipdb_image_floats(m);
    pix = malloc((size_t)N * px * sizeof *pix);
    out = malloc((size_t)N * d * sizeof *out);
    one = malloc((size_t)d * sizeof *one);
    REQUIRE(pix && out && one);
    for (i = 0; i < N; i++)
        for (j = 0; j < px; j++) pix[(size_t)i * px + j] = sinf(0.37f * (float)(i + 1) + 0.011f * (float)j);
    REQUIRE(clipdb_encode_images(c, pix, N, out) == CLIPDB_OK);
    for (i = 0; i < N; i++) {
        REQUIRE(clipdb_encode_images(c, pix + (size_t)i * px, 1, one) == CLIPDB_OK);
        CHECK(max_abs_diff(out + (size_t)i * d, one, d) < 1e-5);
    }
    CHECK(max_abs_diff(out, out + d, d) > 1e-4);
    CHECK(max_abs_diff(out + (size_t)CDB_VISION_CHUNK * d, out + (size_t)(N - 1) * d, d) > 1e-4);
    /* bad arguments; n = 0 encodes nothing */
    CHECK(clipdb_encode_images(c, NULL, 1, out) == CLIPDB_EINVAL);
    CHECK(clipdb_encode_images(c, pix, -1, out) == CLIPDB_EINVAL);
    CHECK(clipdb_encode_images(c, pix, 0, out) == CLIPDB_OK);
    free(pix), free(out), free(one);
    clipdb_ctx_free(c);
    clipdb_model_close(m);
}

TEST(ctx_batch_texts_skip_refused_texts)
{
    const char *dir = test_tiny_clip_model();
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    clipdb_model_info info;
    const char *texts[] = {"a dog on a beach", "", "two horses", "caf\xe9"};
    clipdb_item_status st[4];
    float *out = NULL, *one = NULL;
    int n_failed = -1, i, d;
    if (!dir) SKIP("../shared (the tokenizer) absent");
    REQUIRE(clipdb_model_open(&m, dir) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c, m) == CLIPDB_OK);
    clipdb_model_get_info(m, &info);
    d = info.embed_dim;
    out = malloc((size_t)4 * d * sizeof *out);
    one = malloc((size_t)d * sizeof *one);
    REQUIRE(out && one);
    REQUIRE(clipdb_encode_batch(c, CLIPDB_INPUT_TEXT, texts, 4, out, st, &n_failed) == CLIPDB_OK);
    CHECK(n_failed == 2);
    CHECK(st[1].code == CLIPDB_EINVAL && strstr(st[1].msg, "text 1: empty text") == st[1].msg);
    CHECK(st[3].code == CLIPDB_EINVAL && strstr(st[3].msg, "text 3: ") == st[3].msg &&
          strstr(st[3].msg, "UTF-8") != NULL);
    CHECK(row_is_zero(out + d, d) && row_is_zero(out + 3 * d, d));
    for (i = 0; i < 4; i += 2) {
        CHECK(st[i].code == CLIPDB_OK);
        REQUIRE(clipdb_encode_texts(c, texts + i, 1, one) == CLIPDB_OK);
        CHECK(max_abs_diff(out + (size_t)i * d, one, d) < 1e-5);
    }
    /* with status: the call succeeded, so the ctx holds no error */
    CHECK(clipdb_ctx_errcode(c) == CLIPDB_OK && !strcmp(clipdb_ctx_errmsg(c), ""));
    CHECK(clipdb_encode_batch(c, CLIPDB_INPUT_TEXT, texts, 4, out, NULL, NULL) == CLIPDB_EINVAL);
    CHECK(clipdb_ctx_errcode(c) == CLIPDB_EINVAL);
    CHECK(!strcmp(clipdb_ctx_errmsg(c), "text 1: empty text"));
    CHECK(clipdb_encode_texts(c, texts, 1, out) == CLIPDB_OK);
    CHECK(clipdb_ctx_errcode(c) == CLIPDB_OK && !strcmp(clipdb_ctx_errmsg(c), ""));
    free(out), free(one);
    clipdb_ctx_free(c);
    clipdb_model_close(m);
}

TEST(ctx_and_model_errcode_errmsg)
{
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    char dir[600];
    snprintf(dir, sizeof dir, "%s/no-such-model", test_tmpdir());
    CHECK(clipdb_model_open(&m, dir) == CLIPDB_ENOTFOUND);
    REQUIRE(m);
    CHECK(clipdb_model_errcode(m) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_model_errmsg(m), dir) != NULL);
    clipdb_model_close(m);
    /* a NULL handle is what a constructor leaves when memory ran out */
    CHECK(clipdb_model_errcode(NULL) == CLIPDB_ENOMEM);
    CHECK(!strcmp(clipdb_model_errmsg(NULL), "out of memory"));
    CHECK(clipdb_ctx_errcode(NULL) == CLIPDB_ENOMEM);
    CHECK(!strcmp(clipdb_ctx_errmsg(NULL), "out of memory"));
    CHECK(clipdb_ctx_new(&c, NULL) == CLIPDB_EINVAL);
    REQUIRE(c);
    CHECK(clipdb_ctx_errcode(c) == CLIPDB_EINVAL && !strcmp(clipdb_ctx_errmsg(c), "no model given"));
    clipdb_ctx_free(c);
}
