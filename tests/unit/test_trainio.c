/*
** Unit tests of the training commands' internals (src/train: arch.c,
** data.c, ckpt.c): architecture specs, CLIP's initialisation written as a
** loadable model, the seeded data order and draws, checkpoints that restore
** a trainer exactly (and refuse another configuration), and a trained model
** written to disk that embeds exactly as the engine's weights do.
*/
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/transformer.h"
#include "model/writer.h"
#include "test.h"
#include "train/loop.h"

static const char *bpe_dir(void)
{
    static char dir[600];
    const char *s = test_shared_dir();
    char path[700];
    if (!s) return NULL;
    snprintf(dir, sizeof dir, "%s/models/clip-vit-b-32", s);
    snprintf(path, sizeof path, "%s/bpe_simple_vocab_16e6.txt.gz", dir);
    return access(path, R_OK) == 0 ? dir : NULL;
}

TEST(trainio_arch_parse_and_errors)
{
    cdb_arch a;
    cdb_err e;
    CHECK(cdb_arch_parse("vit:image=64,patch=8,width=192,layers=6,heads=3;"
                         "text:width=256,layers=4,heads=4;embed=256",
                         &a, &e) == CLIPDB_OK);
    CHECK(a.image == 64 && a.patch == 8 && a.vwidth == 192 && a.vlayers == 6);
    CHECK(a.twidth == 256 && a.tlayers == 4 && a.context == 77 && a.embed == 256);
    CHECK(cdb_arch_parse("text:width=64,layers=1,context=16;embed=8;vit:image=32,patch=16,"
                         "width=64,layers=1",
                         &a, &e) == CLIPDB_OK && a.context == 16);
    CHECK(cdb_arch_parse("rn:image=96,width=48,layers=1.2.12.1;text:width=64,layers=1;embed=8",
                         &a, &e) == CLIPDB_OK);
    CHECK(a.image == 96 && a.rwidth == 48 && a.patch == 0 && a.rlayers[0] == 1 &&
          a.rlayers[1] == 2 && a.rlayers[2] == 12 && a.rlayers[3] == 1);
#define BAD(spec, needle)                                                   \
    do {                                                                    \
        cdb_err_clear(&e);                                                  \
        CHECK(cdb_arch_parse(spec, &a, &e) == CLIPDB_EINVAL);               \
        if (!strstr(e.msg, needle)) {                                       \
            fprintf(stderr, "    %s -> %s\n", spec, e.msg);                 \
            test_fail_at(__FILE__, __LINE__, "message lacks: " needle);     \
        }                                                                   \
    } while (0)
    BAD("", "empty");
    BAD("vit:image=64,patch=8,width=192,layers=6;text:width=256,layers=4", "embed=E");
    BAD("vit:image=64,patch=8,width=192;text:width=256,layers=4;embed=8", "vit:image=S");
    BAD("vit:image=64,patch=8,width=100,layers=1;text:width=64,layers=1;embed=8",
        "not a multiple of 64");
    BAD("vit:image=64,patch=7,width=64,layers=1;text:width=64,layers=1;embed=8",
        "not a multiple of patch");
    BAD("vit:image=64,patch=8,width=64,layers=1;text:width=128,layers=1,heads=4;embed=8",
        "heads=4");
    BAD("vit:image=64,patch=8,width=64,layers=1;text:width=64,layers=1;embed=8;cnn:x=1",
        "not a part");
    /* CLIP's ModifiedResNet in place of the ViT */
    BAD("rn:image=48,width=4,layers=1.1.1.1;text:width=64,layers=1;embed=8", "multiple of 32");
    BAD("rn:image=64,width=5,layers=1.1.1.1;text:width=64,layers=1;embed=8", "not even");
    BAD("rn:image=64,width=4,layers=1.1.1;text:width=64,layers=1;embed=8", "4 integers");
    BAD("rn:image=64,width=4,layers=1.1.1.1.1;text:width=64,layers=1;embed=8", "4 integers");
    BAD("rn:image=64,width=4,layers=1..1.1;text:width=64,layers=1;embed=8", "4 integers");
    BAD("rn:image=64,width=4,layers=1.1.1.99;text:width=64,layers=1;embed=8", "4 integers");
    BAD("rn:image=64,width=4;text:width=64,layers=1;embed=8", "layers=A.B.C.D");
    BAD("rn:image=64,width=4,layers=1.1.1.1;vit:image=64,patch=8,width=64,layers=1;"
        "text:width=64,layers=1;embed=8", "one image tower");
    BAD("vit:image=64,patch=8,width=64,layers=1,depth=2;text:width=64,layers=1;embed=8",
        "unknown key 'depth'");
    BAD("vit:image=64,patch=8,width=64,layers=99999999999;text:width=64,layers=1;embed=8",
        "layers=");
    BAD("vit:image=64,patch=8,width=64,layers=-1;text:width=64,layers=1;embed=8", "layers=");
    BAD("vit:image=64,patch=8,width=64,layers;text:width=64,layers=1;embed=8", "key=value");
#undef BAD
}

TEST(trainio_order_is_a_seeded_permutation)
{
    int64_t a[100], b[100], c[100];
    int seen[100] = {0}, i, same = 1, moved = 0;
    cdb_tdata_order(7, 3, 100, a);
    cdb_tdata_order(7, 3, 100, b);
    cdb_tdata_order(7, 4, 100, c);
    for (i = 0; i < 100; i++) {
        REQUIRE(a[i] >= 0 && a[i] < 100);
        seen[a[i]]++;
        same &= a[i] == b[i];
        moved += a[i] != c[i];
    }
    for (i = 0; i < 100; i++) CHECK(seen[i] == 1);
    CHECK(same);
    CHECK(moved > 50); /* another epoch, another order */
    CHECK(cdb_tdraw(1, 2, 3, 4) == cdb_tdraw(1, 2, 3, 4));
    CHECK(cdb_tdraw(1, 2, 3, 4) != cdb_tdraw(1, 2, 3, 5));
    CHECK(cdb_tdraw(1, 2, 3, 4) != cdb_tdraw(2, 2, 3, 4));
    CHECK(cdb_tdraw(1, 2, 3, 4) != cdb_tdraw(1, 3, 3, 4));
}

/* A batch of several captions per image (--captions-per-image): bounds,
** rows, and cdb_batch_load_text's checks, tokens and seeded token drop. */
TEST(trainio_batch_of_several_captions)
{
    char p0[] = "/nonexistent/a.jpg", p1[] = "/nonexistent/b.jpg";
    char c0[] = "a brown dog runs on the green grass near a small red ball",
         c1[] = "two dogs", c2[] = "a red bus";
    char *caps0[] = {c0, c1}, *caps1[] = {c2};
    cdb_pair_image im[2] = {{1, p0, caps0, 2, 2}, {2, p1, caps1, 1, 1}};
    cdb_pairs pp = {im, 2, 3};
    cdb_tokenizer *tok = NULL;
    cdb_batch b;
    cdb_err e = {0};
    int32_t first[16];
    int i, n_first, moved = 0;

    CHECK(cdb_batch_init(&b, 2, 0, 32, 16, 0, &e) == CLIPDB_EINVAL);
    CHECK(cdb_batch_init(&b, 2, CDB_MAX_TEXTS_PER_IMAGE + 1, 32, 16, 0, &e) == CLIPDB_EINVAL);
    REQUIRE(cdb_batch_init(&b, 2, 3, 32, 16, 0, &e) == CLIPDB_OK);
    CHECK(b.cap == 2 && b.texts == 3);
    for (i = 0; i < 6; i++) CHECK(b.ids[i] == b.ids_buf + (size_t)i * 16);
    CHECK(cdb_batch_load_text(&b, 6, &pp, 0, 0, NULL, 0, 1, &e) == CLIPDB_EINVAL);
    CHECK(cdb_batch_load_text(&b, -1, &pp, 0, 0, NULL, 0, 1, &e) == CLIPDB_EINVAL);
    CHECK(cdb_batch_load_text(&b, 0, &pp, 2, 0, NULL, 0, 1, &e) == CLIPDB_EINVAL);
    CHECK(cdb_batch_load_text(&b, 0, &pp, 1, 1, NULL, 0, 1, &e) == CLIPDB_EINVAL);
    if (!bpe_dir() || cdb_tok_load_dir(bpe_dir(), &tok, &e) != CLIPDB_OK) {
        printf("  (tokens not checked: CLIP's vocabulary is not in ../shared)\n");
        cdb_batch_free(&b);
        return;
    }
    REQUIRE(cdb_batch_load_text(&b, 5, &pp, 0, 1, tok, 0, 1, &e) == CLIPDB_OK);
    CHECK(b.lens[5] == 4 && b.ids[5][0] == cdb_tok_sot(tok) && b.ids[5][3] == cdb_tok_eot(tok));
    /* the token drop: the same state drops the same tokens, another state others */
    REQUIRE(cdb_batch_load_text(&b, 4, &pp, 0, 0, tok, 0.5f, 77, &e) == CLIPDB_OK);
    n_first = b.lens[4];
    memcpy(first, b.ids[4], sizeof first);
    REQUIRE(cdb_batch_load_text(&b, 4, &pp, 0, 0, tok, 0.5f, 77, &e) == CLIPDB_OK);
    CHECK(b.lens[4] == n_first && !memcmp(first, b.ids[4], sizeof first));
    REQUIRE(cdb_batch_load_text(&b, 2, &pp, 0, 0, tok, 0.0f, 77, &e) == CLIPDB_OK);
    CHECK(b.lens[2] == 15 && n_first < 15 && n_first >= 3); /* 13 words; about half dropped */
    for (i = 1; i < 40 && !moved; i++) {
        REQUIRE(cdb_batch_load_text(&b, 3, &pp, 0, 0, tok, 0.5f, 77 + (uint64_t)i, &e) ==
                CLIPDB_OK);
        moved = b.lens[3] != n_first || memcmp(first, b.ids[3], (size_t)n_first * 4);
    }
    CHECK(moved);
    cdb_tok_free(tok);
    cdb_batch_free(&b);
}

/* Patch dropout's draws: increasing, in range, seeded by (seed, step, image),
** uniform over the patches; the kept count as open_clip's. */
TEST(trainio_patch_draws)
{
    int32_t a[32], b[32];
    int hits[64] = {0}, i, k, same = 1, differ = 0;
    CHECK(cdb_tdata_patch_count(64, 0.5f) == 32);
    CHECK(cdb_tdata_patch_count(49, 0.5f) == 24);
    CHECK(cdb_tdata_patch_count(64, 0.0f) == 64);
    CHECK(cdb_tdata_patch_count(64, 0.999f) == 1);
    CHECK(cdb_tdata_patch_count(64, 0.25f) == 48);
    cdb_tdata_patches(9, 4, 17, 64, 32, a);
    cdb_tdata_patches(9, 4, 17, 64, 32, b);
    for (k = 0; k < 32; k++) {
        CHECK(a[k] >= 0 && a[k] < 64);
        if (k) CHECK(a[k] > a[k - 1]);
        same &= a[k] == b[k];
    }
    CHECK(same);
    cdb_tdata_patches(9, 5, 17, 64, 32, b); /* another step */
    for (k = 0; k < 32; k++) differ += a[k] != b[k];
    CHECK(differ > 0);
    cdb_tdata_patches(9, 4, 18, 64, 32, b); /* another image */
    for (differ = 0, k = 0; k < 32; k++) differ += a[k] != b[k];
    CHECK(differ > 0);
    /* 4000 draws of 16 of 64: each patch kept 1000 times on average (sd ~27) */
    for (i = 0; i < 4000; i++) {
        cdb_tdata_patches(1, i, 0, 64, 16, a);
        for (k = 0; k < 16; k++) hits[a[k]]++;
    }
    for (k = 0; k < 64; k++) CHECK(hits[k] > 850 && hits[k] < 1150);
    cdb_tdata_patches(1, 0, 0, 8, 8, a); /* all kept */
    for (k = 0; k < 8; k++) CHECK(a[k] == k);
}

/* A tiny model from an arch spec, written with CLIP's init and opened. */
static clipdb_model *tiny(const char *name, uint64_t seed)
{
    char dir[600];
    cdb_arch a;
    cdb_err e;
    clipdb_model *m = NULL;
    const char *bpe = bpe_dir();
    if (!bpe) return NULL;
    snprintf(dir, sizeof dir, "%s/%s", test_tmpdir(), name);
    if (cdb_arch_parse("vit:image=32,patch=16,width=64,layers=2;text:width=64,layers=1,"
                       "context=8;embed=16",
                       &a, &e) ||
        cdb_arch_init_dir(&a, seed, bpe, dir, &e)) {
        fprintf(stderr, "    %s\n", e.msg);
        return NULL;
    }
    if (clipdb_model_open(&m, dir) != CLIPDB_OK) {
        fprintf(stderr, "    %s\n", clipdb_model_errmsg(m));
        clipdb_model_close(m);
        return NULL;
    }
    return m;
}

/* Mean and standard deviation of n floats. */
static void moments(const float *x, size_t n, double *mean, double *std)
{
    double s = 0, s2 = 0;
    size_t i;
    for (i = 0; i < n; i++) s += x[i];
    *mean = s / (double)n;
    for (i = 0; i < n; i++) s2 += (x[i] - *mean) * (x[i] - *mean);
    *std = sqrt(s2 / (double)n);
}

TEST(trainio_clip_initialisation)
{
    clipdb_model *m = tiny("init_a", 5), *m2;
    double mean, sd;
    if (!bpe_dir()) SKIP("shared BPE vocabulary not found");
    REQUIRE(m);
    CHECK(m->vision.image_size == 32 && m->vision.patch == 16 && m->vision.t.layers == 2);
    CHECK(m->text.context == 8 && m->text.vocab == 49408 && m->embed_dim == 16);
    CHECK_NEAR(m->logit_scale, log(1 / 0.07), 1e-6);
    /* token_embedding std 0.02, positional std 0.01 (OpenAI initialize_parameters) */
    moments(m->text.tok_emb, (size_t)49408 * 64, &mean, &sd);
    CHECK_NEAR(mean, 0, 1e-3);
    CHECK_NEAR(sd, 0.02, 2e-4);
    moments(m->text.pos_emb, 8 * 64, &mean, &sd);
    CHECK_NEAR(sd, 0.01, 2e-3);
    /* text attention std d^-0.5 = 0.125; fc std (2d)^-0.5 */
    moments(m->text.t.blocks[0].wq, 3 * 64 * 64, &mean, &sd);
    CHECK_NEAR(sd, 0.125, 4e-3);
    moments(m->text.t.blocks[0].fc1_w, 4 * 64 * 64, &mean, &sd);
    CHECK_NEAR(sd, pow(128, -0.5), 3e-3);
    /* vision in_proj xavier_uniform: bound sqrt(6 / (d + 3d)), std bound / sqrt 3 */
    moments(m->vision.t.blocks[1].wq, 3 * 64 * 64, &mean, &sd);
    CHECK_NEAR(sd, sqrt(6.0 / 256) / sqrt(3.0), 3e-3);
    /* gains 1, biases 0 */
    CHECK(m->vision.t.blocks[0].ln1_w[3] == 1.0f && m->vision.t.blocks[0].ln1_b[3] == 0.0f);
    CHECK(m->text.t.ln_post_w[0] == 1.0f && m->vision.t.blocks[0].bq[0] == 0.0f);
    /* the same seed gives the same weights, another seed others */
    m2 = tiny("init_b", 5);
    REQUIRE(m2);
    CHECK(!memcmp(m->text.tok_emb, m2->text.tok_emb, sizeof(float) * 49408 * 64));
    clipdb_model_close(m2);
    m2 = tiny("init_c", 6);
    REQUIRE(m2);
    CHECK(memcmp(m->text.tok_emb, m2->text.tok_emb, sizeof(float) * 64) != 0);
    clipdb_model_close(m2);
    clipdb_model_close(m);
}

/* A batch of n random images and short texts for the engine. */
typedef struct toy_batch {
    float *px;
    int32_t ids_buf[8][8];
    const int32_t *ids[8];
    int lens[8];
} toy_batch;

static void toy(toy_batch *b, const clipdb_model *m, int n, uint64_t seed)
{
    cdb_rng r = {seed};
    size_t i, np = (size_t)n * 3 * m->vision.image_size * m->vision.image_size;
    int j, k;
    b->px = malloc(np * sizeof *b->px);
    for (i = 0; i < np; i++) b->px[i] = (float)(cdb_rng_unif(&r) * 2 - 1);
    for (j = 0; j < n; j++) {
        int len = 3 + j % 5;
        /* the start and end tokens are the vocabulary's last two ids, as in
        ** CLIP's (49406, 49407); the end token is the largest id of a text */
        b->ids_buf[j][0] = m->text.vocab - 2;
        for (k = 1; k < len - 1; k++) b->ids_buf[j][k] = (int32_t)(1000 + cdb_rng_below(&r, 3000));
        b->ids_buf[j][len - 1] = m->text.vocab - 1;
        b->ids[j] = b->ids_buf[j];
        b->lens[j] = len;
    }
}

static cdb_trainer *new_trainer(clipdb_model *m)
{
    cdb_train_opts o;
    cdb_trainer *t = NULL;
    cdb_err e;
    cdb_train_opts_init(&o);
    o.lr = 1e-3f;
    o.wd = 0.1f;
    if (cdb_trainer_new(&t, m, &o, &e) != CLIPDB_OK) {
        fprintf(stderr, "    %s\n", e.msg);
        return NULL;
    }
    return t;
}

TEST(trainio_checkpoint_restores_exactly)
{
    clipdb_model *m = tiny("ck", 9);
    cdb_trainer *a, *b;
    cdb_train_state sa, sb;
    toy_batch tb;
    cdb_err e;
    char path[600];
    int64_t order[5] = {4, 2, 0, 1, 3}, back[5] = {0};
    cdb_ckpt_extra x = {9, order, 5, "config A", NULL};
    int s;
    if (!bpe_dir()) SKIP("shared BPE vocabulary not found");
    REQUIRE(m);
    toy(&tb, m, 6, 1);
    a = new_trainer(m);
    b = new_trainer(m);
    REQUIRE(a && b);
    /* two steps on a, checkpoint, restore into b, then one more step on each */
    for (s = 0; s < 2; s++)
        REQUIRE(cdb_train_step(a, tb.px, tb.ids, tb.lens, 6, NULL) == CLIPDB_OK);
    snprintf(path, sizeof path, "%s/ck.safetensors", test_tmpdir());
    REQUIRE(cdb_ckpt_write(path, a, &x, &e) == CLIPDB_OK);
    CHECK(cdb_ckpt_read(path, b, "config B", back, 5, NULL, &e) == CLIPDB_EMISMATCH);
    CHECK(strstr(e.msg, "other options or data"));
    CHECK(cdb_ckpt_read(path, b, "config A", back, 4, NULL, &e) == CLIPDB_EFORMAT); /* order size */
    REQUIRE(cdb_ckpt_read(path, b, "config A", back, 5, NULL, &e) == CLIPDB_OK);
    CHECK(!memcmp(order, back, sizeof order));
    REQUIRE(cdb_train_step(a, tb.px, tb.ids, tb.lens, 6, NULL) == CLIPDB_OK);
    REQUIRE(cdb_train_step(b, tb.px, tb.ids, tb.lens, 6, NULL) == CLIPDB_OK);
    cdb_trainer_state(a, &sa);
    cdb_trainer_state(b, &sb);
    CHECK(sa.step == 3 && sb.step == 3);
    CHECK(!memcmp(sa.params, sb.params, sa.numel * sizeof(float)));
    CHECK(!memcmp(sa.m, sb.m, sa.numel * sizeof(float)));
    CHECK(!memcmp(sa.v, sb.v, sa.numel * sizeof(float)));
    /* a checkpoint of another shape is refused */
    {
        clipdb_model *other = tiny("ck_other", 9);
        cdb_trainer *c;
        cdb_arch arch;
        char dir[600];
        clipdb_model_close(other);
        snprintf(dir, sizeof dir, "%s/ck_wide", test_tmpdir());
        REQUIRE(cdb_arch_parse("vit:image=32,patch=16,width=128,layers=2;text:width=64,"
                               "layers=1,context=8;embed=16",
                               &arch, &e) == CLIPDB_OK);
        REQUIRE(cdb_arch_init_dir(&arch, 1, bpe_dir(), dir, &e) == CLIPDB_OK);
        REQUIRE(clipdb_model_open(&other, dir) == CLIPDB_OK);
        c = new_trainer(other);
        REQUIRE(c);
        CHECK(cdb_ckpt_read(path, c, "config A", back, 5, NULL, &e) == CLIPDB_EMISMATCH);
        CHECK(strstr(e.msg, "another model shape"));
        cdb_trainer_free(c);
        clipdb_model_close(other);
    }
    cdb_trainer_free(a);
    cdb_trainer_free(b);
    free(tb.px);
    clipdb_model_close(m);
}

TEST(trainio_ema_decay_update_and_checkpoint)
{
    clipdb_model *m = tiny("ema", 9);
    cdb_trainer *a, *b;
    cdb_train_state sa;
    toy_batch tb;
    cdb_err e;
    char path[600];
    int64_t order[3] = {2, 0, 1}, back[3];
    float avg[4] = {1, 2, -3, 0}, w[4] = {3, 2, 1, 8}, *ema, *ema_back;
    cdb_ckpt_extra x = {9, order, 3, "config E", NULL};
    size_t i;
    /* warm-up (1 + t) / (10 + t) until it reaches the decay */
    CHECK_NEAR(cdb_ema_decay(0.999f, 1), 2.0f / 11.0f, 1e-7);
    CHECK_NEAR(cdb_ema_decay(0.999f, 90), 91.0f / 100.0f, 1e-7);
    CHECK_NEAR(cdb_ema_decay(0.9f, 90), 0.9f, 1e-7);
    CHECK_NEAR(cdb_ema_decay(0.0f, 5), 0.0f, 0);
    cdb_ema_update(avg, w, 4, 0.75f);
    CHECK_NEAR(avg[0], 1.5f, 1e-7);
    CHECK_NEAR(avg[1], 2.0f, 1e-7);
    CHECK_NEAR(avg[2], -2.0f, 1e-7);
    CHECK_NEAR(avg[3], 2.0f, 1e-7);
    cdb_ema_update(avg, w, 4, 0.0f); /* decay 0: the weights themselves */
    CHECK(!memcmp(avg, w, sizeof w));
    { /* across the pool's pieces (2^16 floats each) and the last, short one */
        const size_t n = 3 * ((size_t)1 << 16) + 7;
        float *xa = malloc(n * sizeof *xa), *y = malloc(n * sizeof *y);
        int same = 1;
        REQUIRE(xa && y);
        for (i = 0; i < n; i++) {
            xa[i] = (float)(i % 1000) * 0.001f;
            y[i] = (float)(i % 777) * -0.01f;
        }
        cdb_ema_update(xa, y, n, 0.9f);
        for (i = 0; i < n; i++) {
            const float want = 0.9f * ((float)(i % 1000) * 0.001f) + (1.0f - 0.9f) * y[i];
            same &= xa[i] == want;
        }
        CHECK(same);
        free(xa);
        free(y);
    }
    if (!bpe_dir()) SKIP("shared BPE vocabulary not found");
    REQUIRE(m);
    toy(&tb, m, 6, 1);
    a = new_trainer(m);
    b = new_trainer(m);
    REQUIRE(a && b);
    REQUIRE(cdb_train_step(a, tb.px, tb.ids, tb.lens, 6, NULL) == CLIPDB_OK);
    cdb_trainer_state(a, &sa);
    ema = malloc(sa.numel * sizeof *ema);
    ema_back = calloc(sa.numel, sizeof *ema_back);
    REQUIRE(ema && ema_back);
    for (i = 0; i < sa.numel; i++) ema[i] = (float)i * 0.25f - 7.0f;
    snprintf(path, sizeof path, "%s/ck_ema.safetensors", test_tmpdir());
    /* a checkpoint without an average does not resume a run that keeps one */
    REQUIRE(cdb_ckpt_write(path, a, &x, &e) == CLIPDB_OK);
    CHECK(cdb_ckpt_read(path, b, "config E", back, 3, ema_back, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "'ema'"));
    /* with one, the average comes back bit for bit */
    x.ema = ema;
    REQUIRE(cdb_ckpt_write(path, a, &x, &e) == CLIPDB_OK);
    REQUIRE(cdb_ckpt_read(path, b, "config E", back, 3, ema_back, &e) == CLIPDB_OK);
    CHECK(!memcmp(ema, ema_back, sa.numel * sizeof *ema));
    CHECK(!memcmp(order, back, sizeof order));
    /* and the encoders follow the weights synced, not the trainer's own */
    {
        float v1[16], v2[16];
        clipdb_ctx *c = NULL;
        const char *texts[1] = {"a dog on a sofa"};
        REQUIRE(clipdb_ctx_new(&c, m) == CLIPDB_OK);
        REQUIRE(cdb_trainer_sync(a, m) == CLIPDB_OK);
        REQUIRE(clipdb_encode_texts(c, texts, 1, v1) == CLIPDB_OK);
        for (i = 0; i < sa.numel; i++) ema_back[i] = sa.params[i] * 0.5f;
        REQUIRE(cdb_trainer_sync_params(a, m, ema_back) == CLIPDB_OK);
        REQUIRE(clipdb_encode_texts(c, texts, 1, v2) == CLIPDB_OK);
        CHECK(memcmp(v1, v2, sizeof v1) != 0);
        CHECK_NEAR(m->logit_scale, ema_back[cdb_trainer_find(a, "logit_scale")->offset], 0);
        REQUIRE(cdb_trainer_sync(a, m) == CLIPDB_OK);
        REQUIRE(clipdb_encode_texts(c, texts, 1, v2) == CLIPDB_OK);
        CHECK(!memcmp(v1, v2, sizeof v1));
        clipdb_ctx_free(c);
    }
    free(ema);
    free(ema_back);
    cdb_trainer_free(a);
    cdb_trainer_free(b);
    free(tb.px);
    clipdb_model_close(m);
}

TEST(trainio_written_model_embeds_as_the_engine)
{
    clipdb_model *m = tiny("wm", 4), *back = NULL;
    cdb_trainer *t;
    toy_batch tb;
    cdb_err e;
    clipdb_ctx *c1 = NULL, *c2 = NULL;
    float a[2 * 16], b[2 * 16], ta[16], tb2[16];
    const char *texts[1] = {"a dog on a sofa"};
    char out[600];
    cdb_model_write_opts wo = {0};
    int s;
    if (!bpe_dir()) SKIP("shared BPE vocabulary not found");
    REQUIRE(m);
    toy(&tb, m, 4, 3);
    t = new_trainer(m);
    REQUIRE(t);
    for (s = 0; s < 3; s++)
        REQUIRE(cdb_train_step(t, tb.px, tb.ids, tb.lens, 4, NULL) == CLIPDB_OK);
    /* the engine's weights, in the model's encoders */
    REQUIRE(cdb_trainer_sync(t, m) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c1, m) == CLIPDB_OK);
    REQUIRE(clipdb_encode_images(c1, tb.px, 2, a) == CLIPDB_OK);
    REQUIRE(clipdb_encode_texts(c1, texts, 1, ta) == CLIPDB_OK);
    /* written F32 in the other convention, opened from disk */
    snprintf(out, sizeof out, "%s/wm_out", test_tmpdir());
    wo.style = "hf";
    wo.dtype = CDB_DT_F32;
    REQUIRE(cdb_model_write_dir(m, out, &wo, &e) == CLIPDB_OK);
    REQUIRE(clipdb_model_open(&back, out) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c2, back) == CLIPDB_OK);
    REQUIRE(clipdb_encode_images(c2, tb.px, 2, b) == CLIPDB_OK);
    REQUIRE(clipdb_encode_texts(c2, texts, 1, tb2) == CLIPDB_OK);
    /* Equal to rounding: the two conventions store the projections transposed
    ** to each other, so oneDNN may run them through different kernels (on
    ** OpenBLAS they are bit-identical). */
    for (s = 0; s < 2 * 16; s++) CHECK(fabsf(a[s] - b[s]) <= 1e-5f * (1.0f + fabsf(a[s])));
    for (s = 0; s < 16; s++) CHECK(fabsf(ta[s] - tb2[s]) <= 1e-5f * (1.0f + fabsf(ta[s])));
    if (getenv("CLIPDB_GEMM") && !strcmp(getenv("CLIPDB_GEMM"), "openblas")) {
        CHECK(!memcmp(a, b, sizeof a));
        CHECK(!memcmp(ta, tb2, sizeof ta));
    }
    CHECK(!strcmp(back->key_style, "hf"));
    clipdb_ctx_free(c1);
    clipdb_ctx_free(c2);
    clipdb_model_close(back);
    cdb_trainer_free(t);
    free(tb.px);
    clipdb_model_close(m);
}
