/* test_eval.c: the eval module's ranks, ties, curves and baseline on
** hand-made vectors whose answers are known, and clipdb_eval_run on a
** database filled with them (splits, an image with no caption, a caption of
** an image outside the split, k larger than the gallery, unknown sets). */
#include <stdint.h>

#include "eval/eval.h"
#include "index/index.h"
#include "store/store.h"
#include "test.h"

/* gallery (1,0) (0,1) (-1,0), ids 10 20 30, labels 0 1 2 */
static const float G3[] = {1, 0, 0, 1, -1, 0};
static const int64_t GID3[] = {10, 20, 30}, GLAB3[] = {0, 1, 2};

TEST(eval_ranks_known)
{
    /* (1,.1) of image 0: rank 1; (.1,1) of image 0: image 1 first, rank 2;
    ** (-1,-.1) of image 0: last, rank 3 */
    const float q[] = {1, 0.1f, 0.1f, 1, -1, -0.1f};
    const int64_t qlab[] = {0, 0, 0};
    int64_t r[3];
    int m;
    for (m = 0; m < 3; m++) {
        REQUIRE(cdb_eval_ranks((clipdb_metric)m, 2, q, 3, qlab, G3, 3, GID3, GLAB3, r, NULL) ==
                CLIPDB_OK);
        CHECK(r[0] == 1);
        CHECK(r[1] == 2);
        CHECK(r[2] == 3);
    }
}

TEST(eval_ranks_ties_go_to_the_smaller_id)
{
    /* (1,1) scores (1,0) and (0,1) equally: the smaller id (10, image 0)
    ** ranks first, so image 0 is at rank 1 and image 1 at rank 2 */
    const float q[] = {1, 1, 1, 1};
    const int64_t qlab[] = {0, 1}, gid_swapped[] = {20, 10, 30};
    int64_t r[2];
    REQUIRE(cdb_eval_ranks(CLIPDB_METRIC_COSINE, 2, q, 2, qlab, G3, 3, GID3, GLAB3, r, NULL) ==
            CLIPDB_OK);
    CHECK(r[0] == 1 && r[1] == 2);
    /* the ids swapped: image 1 (id 10) first */
    REQUIRE(cdb_eval_ranks(CLIPDB_METRIC_DOT, 2, q, 2, qlab, G3, 3, gid_swapped, GLAB3, r, NULL) ==
            CLIPDB_OK);
    CHECK(r[0] == 2 && r[1] == 1);
}

TEST(eval_ranks_metrics_differ)
{
    /* gallery (1,0) label 0, (3,3) label 1; query (1,.2) of image 0: cosine
    ** and L2 put (1,0) first, dot product puts (3,3) first */
    const float g[] = {1, 0, 3, 3}, q[] = {1, 0.2f};
    const int64_t gid[] = {1, 2}, glab[] = {0, 1}, qlab[] = {0};
    int64_t r;
    REQUIRE(cdb_eval_ranks(CLIPDB_METRIC_COSINE, 2, q, 1, qlab, g, 2, gid, glab, &r, NULL) == 0);
    CHECK(r == 1);
    REQUIRE(cdb_eval_ranks(CLIPDB_METRIC_DOT, 2, q, 1, qlab, g, 2, gid, glab, &r, NULL) == 0);
    CHECK(r == 2);
    REQUIRE(cdb_eval_ranks(CLIPDB_METRIC_L2, 2, q, 1, qlab, g, 2, gid, glab, &r, NULL) == 0);
    CHECK(r == 1);
}

TEST(eval_ranks_several_right_items_and_none)
{
    /* image->text: image (1,0) with captions labelled 0 at gallery rows 1
    ** and 2; the best of them, row 2 = (.9,.1), ranks 2nd behind row 0.
    ** A query whose label no gallery item has (an image with no caption, or
    ** a caption of an image outside the split) gets rank 0. */
    const float g[] = {1, 0.01f, 0, 1, 0.9f, 0.1f, -1, 0};
    const int64_t gid[] = {1, 2, 3, 4}, glab[] = {7, 0, 0, 8};
    const float q[] = {1, 0, 0, 1};
    const int64_t qlab[] = {0, 5};
    int64_t r[2];
    REQUIRE(cdb_eval_ranks(CLIPDB_METRIC_COSINE, 2, q, 2, qlab, g, 4, gid, glab, r, NULL) == 0);
    CHECK(r[0] == 2);
    CHECK(r[1] == 0);
}

/* Integer vectors make every score exact in float, so ties are frequent and
** the tie rule is checked against a scalar brute force; 1500 queries cross
** the 1024-query block of the batched computation. */
TEST(eval_ranks_blocked_against_brute_force)
{
    enum { NQ = 1500, NG = 300, D = 5 };
    float *q = malloc(sizeof(float) * NQ * D), *g = malloc(sizeof(float) * NG * D);
    int64_t *qlab = malloc(sizeof(int64_t) * NQ), *glab = malloc(sizeof(int64_t) * NG);
    int64_t *gid = malloc(sizeof(int64_t) * NG), *r = malloc(sizeof(int64_t) * NQ);
    cdb_rng rng = {42};
    size_t i, j;
    int m, t, bad = 0;
    REQUIRE(q && g && qlab && glab && gid && r);
    for (i = 0; i < (size_t)NQ * D; i++) q[i] = (float)((int)cdb_rng_below(&rng, 5) - 2);
    for (i = 0; i < (size_t)NG * D; i++) g[i] = (float)((int)cdb_rng_below(&rng, 5) - 2);
    for (i = 0; i < NG; i++) {
        glab[i] = (int64_t)cdb_rng_below(&rng, 100);
        gid[i] = (int64_t)(1000 - 3 * i); /* ids descending: the tie rule is by id, not row */
    }
    for (i = 0; i < NQ; i++) qlab[i] = (int64_t)cdb_rng_below(&rng, 110);
    for (m = CLIPDB_METRIC_DOT; m <= CLIPDB_METRIC_L2; m++) {
        REQUIRE(cdb_eval_ranks((clipdb_metric)m, D, q, NQ, qlab, g, NG, gid, glab, r, NULL) == 0);
        for (i = 0; i < NQ; i++) {
            double s[NG];
            int64_t want = 0;
            size_t best = NG;
            for (j = 0; j < NG; j++) {
                double dot = 0, dist = 0;
                for (t = 0; t < D; t++) {
                    double a = q[i * D + t], b = g[j * D + t];
                    dot += a * b;
                    dist += (a - b) * (a - b);
                }
                s[j] = m == CLIPDB_METRIC_DOT ? dot : -dist;
            }
            for (j = 0; j < NG; j++)
                if (glab[j] == qlab[i] &&
                    (best == NG || s[j] > s[best] || (s[j] == s[best] && gid[j] < gid[best])))
                    best = j;
            if (best < NG) {
                want = 1;
                for (j = 0; j < NG; j++)
                    if (j != best && (s[j] > s[best] || (s[j] == s[best] && gid[j] < gid[best])))
                        want++;
            }
            bad += r[i] != want;
        }
    }
    CHECK(bad == 0);
    free(q);
    free(g);
    free(qlab);
    free(glab);
    free(gid);
    free(r);
}

TEST(eval_rank_stats_and_curve)
{
    /* ranks 1 3 0 2 2 (0 = no right item, skipped): n 4, median (lower) 2,
    ** mean 2; curve with kmax 5 beyond the gallery of 3 stays at 1 */
    const int64_t r[] = {1, 3, 0, 2, 2};
    double c[5];
    cdb_rank_stats st;
    REQUIRE(cdb_eval_rank_stats(r, 5, 5, c, &st, NULL) == CLIPDB_OK);
    CHECK(st.n == 4);
    CHECK(st.median == 2);
    CHECK(st.mean == 2);
    CHECK(c[0] == 0.25 && c[1] == 0.75 && c[2] == 1.0 && c[3] == 1.0 && c[4] == 1.0);
    {
        const int64_t r2[] = {4, 1};
        REQUIRE(cdb_eval_rank_stats(r2, 2, 4, c, &st, NULL) == CLIPDB_OK);
        CHECK(st.median == 1); /* the lower median of {1, 4} */
        CHECK(st.mean == 2.5);
    }
}

TEST(eval_random_baseline)
{
    const int64_t one[] = {1, 1, 0}, two[] = {2};
    double c[4];
    cdb_eval_random_curve(one, 3, 4, 4, c);
    CHECK(c[0] == 0.25 && c[1] == 0.5 && c[2] == 0.75 && c[3] == 1.0);
    /* 2 right among 4: within 1, 1/2; within 2, 1 - C(2,2)/C(4,2) = 5/6 */
    cdb_eval_random_curve(two, 1, 4, 4, c);
    CHECK_NEAR(c[0], 0.5, 1e-12);
    CHECK_NEAR(c[1], 5.0 / 6.0, 1e-12);
    CHECK(c[2] == 1.0 && c[3] == 1.0);
}

/* A database: images A (1,0) test, B (0,1) test, C (-1,0) test without a
** caption, D (.7,.7) train; captions: a1 (1,.1) and a2 (.2,1) of A, b1
** (.1,1) of B, d1 (1,0) of D. */
static clipdb_db *small_db(const char *name)
{
    char path[512];
    clipdb_db *db = NULL;
    int64_t a, b, c, dd, t;
    const float va[] = {1, 0}, vb[] = {0, 1}, vc[] = {-1, 0}, vd[] = {0.7f, 0.7f};
    const float a1[] = {1, 0.1f}, a2[] = {0.2f, 1}, b1[] = {0.1f, 1}, d1[] = {1, 0};
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), name);
    if (cdb_db_create_raw(&db, path, "clip-test-eval", 2, NULL) != CLIPDB_OK) return db;
    if (cdb_db_begin(db) || cdb_db_insert_image(db, "a.jpg", "/x/a.jpg", 1, "00", va, &a) ||
        cdb_db_set_meta_json(db, a, "{\"split\":\"test\"}") ||
        cdb_db_insert_image(db, "b.jpg", "/x/b.jpg", 1, "00", vb, &b) ||
        cdb_db_set_meta_json(db, b, "{\"split\":\"test\"}") ||
        cdb_db_insert_image(db, "c.jpg", "/x/c.jpg", 1, "00", vc, &c) ||
        cdb_db_set_meta_json(db, c, "{\"split\":\"test\"}") ||
        cdb_db_insert_image(db, "d.jpg", "/x/d.jpg", 1, "00", vd, &dd) ||
        cdb_db_set_meta_json(db, dd, "{\"split\":\"train\"}") ||
        cdb_db_insert_text(db, "a one", a, a1, &t) || cdb_db_set_meta_json(db, t, "{\"split\":\"test\"}") ||
        cdb_db_insert_text(db, "a two", a, a2, &t) || cdb_db_set_meta_json(db, t, "{\"split\":\"test\"}") ||
        cdb_db_insert_text(db, "b one", b, b1, &t) || cdb_db_set_meta_json(db, t, "{\"split\":\"test\"}") ||
        /* a caption marked test whose image is train: outside the split */
        cdb_db_insert_text(db, "d one", dd, d1, &t) || cdb_db_set_meta_json(db, t, "{\"split\":\"test\"}") ||
        cdb_db_insert_text(db, "standalone", -1, d1, &t) || cdb_db_commit(db)) {
        clipdb_db_close(db);
        return NULL;
    }
    return db;
}

TEST(eval_run_split_known_figures)
{
    clipdb_db *db = small_db("eval1.db");
    clipdb_eval_options o;
    clipdb_eval *ev = NULL;
    clipdb_eval_summary s;
    char *json = NULL;
    REQUIRE(db);
    clipdb_eval_options_init(&o);
    o.split = "test";
    o.ks[0] = 1;
    o.ks[1] = 2;
    o.n_ks = 2;
    o.nlist = 2;
    o.faiss = 0;
    o.n_samples = 2;
    REQUIRE(clipdb_eval_run(db, &o, &ev) == CLIPDB_OK);
    REQUIRE(clipdb_eval_n_sets(ev) == 1);
    REQUIRE(clipdb_eval_get_summary(ev, 0, &s) == CLIPDB_OK);
    CHECK(!strcmp(s.set, "base") && !strcmp(s.model, "clip-test-eval"));
    CHECK(s.images == 3 && s.captions == 3);
    CHECK(s.images_without_captions == 1 && s.captions_outside == 1);
    /* text->image (cosine), gallery A B C: a1 -> A rank 1; a2 (.2,1) -> B
    ** first, A 2nd; b1 -> B rank 1 */
    CHECK(s.t2i.queries == 3 && s.t2i.gallery == 3);
    CHECK_NEAR(s.t2i.recall[0], 2.0 / 3.0, 1e-15);
    CHECK(s.t2i.recall[1] == 1.0);
    CHECK(s.t2i.median_rank == 1);
    CHECK_NEAR(s.t2i.mean_rank, 4.0 / 3.0, 1e-15);
    /* image->text, gallery a1 a2 b1: A -> a1 rank 1; B -> b1 rank 1
    ** (b1 .995 > a2 .98); C has no caption: not a query */
    CHECK(s.i2t.queries == 2 && s.i2t.gallery == 3);
    CHECK(s.i2t.recall[0] == 1.0 && s.i2t.mean_rank == 1.0);
    REQUIRE(clipdb_eval_json(ev, &json) == CLIPDB_OK);
    CHECK(strstr(json, "\"images\":3") && strstr(json, "\"R@1\":"));
    CHECK(strstr(json, "\"gpu\":{\"measured\":false"));
    clipdb_free(json);
    {
        /* the report in memory: plots inline; the images' files do not exist
        ** here, so the samples say so instead of failing */
        char *html = NULL;
        size_t len = 0;
        REQUIRE(clipdb_eval_html(ev, &html, &len) == CLIPDB_OK);
        CHECK(len == strlen(html) && !strncmp(html, "<!DOCTYPE html>", 15));
        CHECK(strstr(html, "data:image/png;base64,iVBORw0KGgo"));
        CHECK(strstr(html, "image not readable") && strstr(html, "/x/a.jpg"));
        clipdb_free(html);
    }
    clipdb_eval_free(ev);

    /* --pairs first: a2 goes, A keeps a1 */
    o.pairs_first = 1;
    REQUIRE(clipdb_eval_run(db, &o, &ev) == CLIPDB_OK);
    REQUIRE(clipdb_eval_get_summary(ev, 0, &s) == CLIPDB_OK);
    CHECK(s.captions == 2 && s.t2i.recall[0] == 1.0);
    clipdb_eval_free(ev);
    clipdb_db_close(db);
}

TEST(eval_run_bad_input)
{
    clipdb_db *db = small_db("eval2.db");
    clipdb_eval_options o;
    clipdb_eval *ev = NULL;
    REQUIRE(db);
    clipdb_eval_options_init(&o);
    o.compare_indexes = 0;
    o.split = "nope"; /* a split with no images */
    CHECK(clipdb_eval_run(db, &o, &ev) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_eval_errmsg(ev), "no images in the split"));
    clipdb_eval_free(ev);
    o.split = "test";
    o.ks[0] = 4; /* larger than the gallery of 3 */
    o.n_ks = 1;
    CHECK(clipdb_eval_run(db, &o, &ev) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_eval_errmsg(ev), "larger than the gallery"));
    clipdb_eval_free(ev);
    o.ks[0] = 1;
    o.vector_set = "finetuned";
    CHECK(clipdb_eval_run(db, &o, &ev) == CLIPDB_ENOTFOUND);
    CHECK(strstr(clipdb_eval_errmsg(ev), "no vector set 'finetuned'"));
    clipdb_eval_free(ev);
    o.vector_set = NULL;
    o.n_ks = 0;
    CHECK(clipdb_eval_run(db, &o, &ev) == CLIPDB_EINVAL);
    clipdb_eval_free(ev);
    clipdb_db_close(db);
}

TEST(eval_run_no_captions)
{
    char path[512];
    clipdb_db *db = NULL;
    clipdb_eval *ev = NULL;
    const float v[] = {1, 0};
    int64_t id;
    snprintf(path, sizeof path, "%s/eval3.db", test_tmpdir());
    REQUIRE(cdb_db_create_raw(&db, path, "clip-test-eval", 2, NULL) == CLIPDB_OK);
    REQUIRE(cdb_db_begin(db) == 0 && cdb_db_insert_image(db, "a.jpg", "/y/a.jpg", 1, "0", v, &id) == 0 &&
            cdb_db_commit(db) == 0);
    CHECK(clipdb_eval_run(db, NULL, &ev) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_eval_errmsg(ev), "no captions"));
    clipdb_eval_free(ev);
    clipdb_db_close(db);
}

/* The one-matrix computation of both directions gives the ranks of the two
** separate computations: integer vectors (exact scores, many ties), ids not
** in row order, images without captions, all three metrics. */
TEST(eval_ranks_pair_equals_separate)
{
    enum { NC = 700, NI = 150, D = 4 };
    float *c = malloc(sizeof(float) * NC * D), *im = malloc(sizeof(float) * NI * D);
    int64_t *cimg = malloc(sizeof(int64_t) * NC), *cid = malloc(sizeof(int64_t) * NC);
    int64_t *iid = malloc(sizeof(int64_t) * NI), *ilab = malloc(sizeof(int64_t) * NI);
    int64_t *a1 = malloc(sizeof(int64_t) * NC), *a2 = malloc(sizeof(int64_t) * NI);
    int64_t *b1 = malloc(sizeof(int64_t) * NC), *b2 = malloc(sizeof(int64_t) * NI);
    cdb_rng rng = {9};
    size_t i;
    int m, bad = 0, zero = 0;
    REQUIRE(c && im && cimg && cid && iid && ilab && a1 && a2 && b1 && b2);
    for (i = 0; i < (size_t)NC * D; i++) c[i] = (float)((int)cdb_rng_below(&rng, 5) - 2);
    for (i = 0; i < (size_t)NI * D; i++) im[i] = (float)((int)cdb_rng_below(&rng, 5) - 2);
    for (i = 0; i < NI; i++) {
        iid[i] = (int64_t)(5000 - 7 * i);
        ilab[i] = (int64_t)i;
    }
    for (i = 0; i < NC; i++) {
        cimg[i] = (int64_t)cdb_rng_below(&rng, NI - 10); /* the last 10 images: no caption */
        cid[i] = (int64_t)(100000 - 11 * i);
    }
    for (m = 0; m < 3; m++) {
        int64_t *t2i[3] = {0}, *i2t[3] = {0};
        t2i[m] = a1;
        i2t[m] = a2;
        REQUIRE(cdb_eval_ranks_pair(D, c, NC, cimg, cid, im, NI, iid, t2i, i2t, NULL) ==
                CLIPDB_OK);
        REQUIRE(cdb_eval_ranks((clipdb_metric)m, D, c, NC, cimg, im, NI, iid, ilab, b1, NULL) == 0);
        REQUIRE(cdb_eval_ranks((clipdb_metric)m, D, im, NI, ilab, c, NC, cid, cimg, b2, NULL) == 0);
        for (i = 0; i < NC; i++) bad += a1[i] != b1[i];
        for (i = 0; i < NI; i++) {
            bad += a2[i] != b2[i];
            zero += a2[i] == 0;
        }
    }
    CHECK(bad == 0);
    CHECK(zero >= 3 * 10);
    free(c);
    free(im);
    free(cimg);
    free(cid);
    free(iid);
    free(ilab);
    free(a1);
    free(a2);
    free(b1);
    free(b2);
}
