/*
** Unit tests of src/model/weights.c: binding tiny generated models
** (tools/gen_model.py) in both key conventions and all three dtypes, the
** error messages, the exact F16/BF16 conversions, and the model identity.
*/
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"
#include "train/train.h"
#include "models.h"
#include "test.h"

#define GEN_OR_SKIP(var, name, args)                                  \
    const char *var = test_gen_model(name, args);                     \
    if (!var) SKIP("/usr/bin/python3 with numpy needed to generate models")

TEST(weights_tiny_openai_f32_binds_in_place)
{
    clipdb_model *m = NULL;
    GEN_OR_SKIP(dir, "o32", "--keys openai --dtype F32 --seed 7");
    REQUIRE(test_load_model(dir, &m) == CLIPDB_OK);
    CHECK(!strcmp(m->key_style, "openai"));
    CHECK(!strcmp(m->dtype, "F32"));
    CHECK(m->embed_dim == 32);
    CHECK(m->vision.t.width == 64 && m->vision.t.layers == 2 && m->vision.t.heads == 1);
    CHECK(m->vision.t.mlp == 256);
    CHECK(m->vision.patch == 32 && m->vision.image_size == 224 && m->vision.grid == 7);
    CHECK(m->vision.n_pos == 50);
    CHECK(m->text.t.width == 64 && m->text.t.layers == 2 && m->text.t.heads == 1);
    CHECK(m->text.t.mlp == 256);
    CHECK(m->text.context == 77 && m->text.vocab == 49408);
    CHECK(!m->vision.t.proj_transposed && !m->text.t.proj_transposed);
    CHECK_NEAR(m->logit_scale, log(100.0), 1e-6);
    /* aligned F32: every view points into the mapping, nothing copied */
    CHECK(m->n_owned == 0);
    CHECK((const uint8_t *)m->text.tok_emb > m->st->map.data &&
          (const uint8_t *)m->text.tok_emb < m->st->map.data + m->st->map.size);
    /* q, k, v are consecutive row blocks of in_proj_weight (3d, d) */
    CHECK(m->vision.t.blocks[1].wk == m->vision.t.blocks[1].wq + 64 * 64);
    CHECK(m->vision.t.blocks[1].bv == m->vision.t.blocks[1].bq + 128);
    CHECK(m->vision.t.blocks[0].ln1_w[0] > 0.5f && m->vision.t.blocks[0].ln1_w[0] < 1.5f);
    cdb_weights_release(m);
    cdb_weights_release(m); /* idempotent */
    CHECK(m->vision.t.blocks == NULL);
    test_unload_model(m);
}

/* Every fp32 view of a equals b's, element by element; projections may be transposed. */
static void check_tower_equal(const cdb_tower *a, const cdb_tower *b, int e, double tol)
{
    int d = a->width, f = a->mlp, i;
    size_t j, r, c;
    REQUIRE(a->width == b->width && a->layers == b->layers && a->mlp == b->mlp);
#define SAME(x, y, n)                                                       \
    do {                                                                    \
        for (j = 0; j < (size_t)(n); j++)                                   \
            if (!(fabs((double)(x)[j] - (double)(y)[j]) <= tol)) {          \
                CHECK_NEAR((x)[j], (y)[j], tol);                            \
                break;                                                      \
            }                                                               \
    } while (0)
    for (i = 0; i < a->layers; i++) {
        const cdb_block *p = &a->blocks[i], *q = &b->blocks[i];
        SAME(p->ln1_w, q->ln1_w, d);
        SAME(p->ln1_b, q->ln1_b, d);
        SAME(p->wq, q->wq, d * d);
        SAME(p->wk, q->wk, d * d);
        SAME(p->wv, q->wv, d * d);
        SAME(p->bq, q->bq, d);
        SAME(p->bk, q->bk, d);
        SAME(p->bv, q->bv, d);
        SAME(p->wo, q->wo, d * d);
        SAME(p->bo, q->bo, d);
        SAME(p->ln2_w, q->ln2_w, d);
        SAME(p->ln2_b, q->ln2_b, d);
        SAME(p->fc1_w, q->fc1_w, f * d);
        SAME(p->fc1_b, q->fc1_b, f);
        SAME(p->fc2_w, q->fc2_w, d * f);
        SAME(p->fc2_b, q->fc2_b, d);
    }
    SAME(a->ln_post_w, b->ln_post_w, d);
    SAME(a->ln_post_b, b->ln_post_b, d);
    /* proj as (d, e): element (r, c) */
    for (r = 0; r < (size_t)d; r++)
        for (c = 0; c < (size_t)e; c++) {
            float x = a->proj_transposed ? a->proj[c * d + r] : a->proj[r * e + c];
            float y = b->proj_transposed ? b->proj[c * d + r] : b->proj[r * e + c];
            if (!(fabs((double)x - (double)y) <= tol)) {
                CHECK_NEAR(x, y, tol);
                return;
            }
        }
}

static void check_models_equal(const clipdb_model *a, const clipdb_model *b, double tol)
{
    const cdb_vision *va = &a->vision, *vb = &b->vision;
    const cdb_text *ta = &a->text, *tb = &b->text;
    size_t j;
    int d = va->t.width, P = va->patch;
    REQUIRE(a->embed_dim == b->embed_dim && va->patch == vb->patch && va->n_pos == vb->n_pos);
    REQUIRE(ta->vocab == tb->vocab && ta->context == tb->context);
    SAME(va->patch_w, vb->patch_w, d * 3 * P * P);
    SAME(va->class_emb, vb->class_emb, d);
    SAME(va->pos_emb, vb->pos_emb, va->n_pos * d);
    SAME(va->ln_pre_w, vb->ln_pre_w, d);
    SAME(va->ln_pre_b, vb->ln_pre_b, d);
    SAME(ta->tok_emb, tb->tok_emb, (size_t)ta->vocab * (size_t)ta->t.width);
    SAME(ta->pos_emb, tb->pos_emb, ta->context * ta->t.width);
    CHECK_NEAR(a->logit_scale, b->logit_scale, tol);
    check_tower_equal(&va->t, &vb->t, a->embed_dim, tol);
    check_tower_equal(&ta->t, &tb->t, a->embed_dim, tol);
}

TEST(weights_openai_and_hf_same_seed_bind_identically)
{
    static const char *const dts[] = {"F32", "F16", "BF16"};
    int i;
    for (i = 0; i < 3; i++) {
        char on[16], hn[16], oa[128], ha[128];
        clipdb_model *o = NULL, *h = NULL;
        const char *od, *hd;
        snprintf(on, sizeof on, "o%s", dts[i]);
        snprintf(hn, sizeof hn, "h%s", dts[i]);
        snprintf(oa, sizeof oa, "--keys openai --dtype %s --seed 7", dts[i]);
        snprintf(ha, sizeof ha, "--keys hf --dtype %s --seed 7", dts[i]);
        GEN_OR_SKIP(odir, on, oa);
        od = cdb_strdup(odir);
        GEN_OR_SKIP(hdir, hn, ha);
        hd = hdir;
        CHECK(test_load_model(od, &o) == CLIPDB_OK);
        CHECK(test_load_model(hd, &h) == CLIPDB_OK);
        if (o->st && h->st && o->dtype && h->dtype) {
            CHECK(!strcmp(h->key_style, "hf"));
            CHECK(h->vision.t.proj_transposed && h->text.t.proj_transposed);
            CHECK(!strcmp(o->dtype, dts[i]) && !strcmp(h->dtype, dts[i]));
            CHECK(i == 0 ? h->n_owned == 0 : h->n_owned > 0);
            check_models_equal(o, h, 0.0);
        } else {
            fprintf(stderr, "    %s / %s\n", o->err.msg, h->err.msg);
        }
        test_unload_model(o);
        test_unload_model(h);
        free((void *)od);
    }
}

TEST(weights_f16_bf16_are_the_f32_model_rounded)
{
    clipdb_model *a = NULL, *h = NULL, *bf = NULL;
    GEN_OR_SKIP(d32, "o32", "--keys openai --dtype F32 --seed 7");
    REQUIRE(test_load_model(d32, &a) == CLIPDB_OK);
    {
        GEN_OR_SKIP(d16, "oF16", "--keys openai --dtype F16 --seed 7");
        CHECK(test_load_model(d16, &h) == CLIPDB_OK);
    }
    {
        GEN_OR_SKIP(db16, "oBF16", "--keys openai --dtype BF16 --seed 7");
        CHECK(test_load_model(db16, &bf) == CLIPDB_OK);
    }
    /* weights are below ~4 in magnitude: F16 keeps 11 bits, BF16 8 */
    if (h->dtype) check_models_equal(a, h, 4.0 / 2048);
    if (bf->dtype) check_models_equal(a, bf, 4.0 / 256);
    /* and not bit-identical, or the conversion was not exercised */
    if (h->dtype) CHECK(memcmp(a->vision.t.blocks[0].wq, h->vision.t.blocks[0].wq, 64 * 4) != 0);
    test_unload_model(a);
    test_unload_model(h);
    test_unload_model(bf);
}

/* Independent definition of binary16: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024. */
TEST(weights_f16_conversion_exact_for_all_65536)
{
    unsigned h;
    int bad = 0;
    for (h = 0; h < 65536; h++) {
        unsigned s = h >> 15, e = (h >> 10) & 31, mant = h & 1023;
        float got = cdb_f16_to_f32((uint16_t)h);
        double want;
        if (e == 31) {
            if (mant == 0) {
                if (!(isinf(got) && (signbit(got) != 0) == (s != 0))) bad++;
            } else if (!isnan(got)) {
                bad++;
            }
            continue;
        }
        want = e == 0 ? ldexp((double)mant, -24) : ldexp(1.0 + mant / 1024.0, (int)e - 15);
        if (s) want = -want;
        if ((double)got != want || (signbit(got) != 0) != (s != 0)) bad++;
    }
    CHECK(bad == 0);
}

TEST(weights_bf16_conversion)
{
    CHECK(cdb_bf16_to_f32(0x3f80) == 1.0f);
    CHECK(cdb_bf16_to_f32(0xc000) == -2.0f);
    CHECK(cdb_bf16_to_f32(0x0000) == 0.0f && !signbit(cdb_bf16_to_f32(0x0000)));
    CHECK(signbit(cdb_bf16_to_f32(0x8000)));
    CHECK(isinf(cdb_bf16_to_f32(0x7f80)) && cdb_bf16_to_f32(0x7f80) > 0);
    CHECK(isnan(cdb_bf16_to_f32(0x7fc0)));
    CHECK(cdb_bf16_to_f32(0x0001) == ldexpf(1.0f, -133)); /* smallest subnormal */
    CHECK(cdb_bf16_to_f32(0x3fc0) == 1.5f);
}

/* Loading must fail with a message containing want. */
static void check_fails(const char *dir, const char *want)
{
    clipdb_model *m = NULL;
    CHECK(test_load_model(dir, &m) == CLIPDB_EFORMAT);
    if (!strstr(m->err.msg, want)) {
        fprintf(stderr, "    message was: %s\n    wanted: %s\n", m->err.msg, want);
        test_fail_at(__FILE__, __LINE__, "error message");
    }
    CHECK(m->vision.t.blocks == NULL && m->vision.rn == NULL && m->n_owned == 0); /* released */
    test_unload_model(m);
}

TEST(weights_missing_tensor_is_named)
{
    {
        GEN_OR_SKIP(d, "drop_o", "--keys openai --seed 1 --drop transformer.resblocks.1.mlp.c_fc.bias");
        check_fails(d, "missing tensor 'transformer.resblocks.1.mlp.c_fc.bias'");
    }
    {
        GEN_OR_SKIP(d, "drop_h", "--keys hf --dtype F16 --seed 1 "
                                 "--drop vision_model.encoder.layers.0.self_attn.k_proj.weight");
        check_fails(d, "missing tensor 'vision_model.encoder.layers.0.self_attn.k_proj.weight'");
    }
    {
        GEN_OR_SKIP(d, "drop_ls", "--keys openai --seed 1 --drop logit_scale");
        check_fails(d, "missing tensor 'logit_scale'");
    }
    {
        GEN_OR_SKIP(d, "drop_pre", "--keys hf --seed 1 --drop vision_model.pre_layrnorm.bias");
        check_fails(d, "missing tensor 'vision_model.pre_layrnorm.bias'");
    }
}

TEST(weights_misshaped_tensor_is_named)
{
    {
        GEN_OR_SKIP(d, "bad_tp", "--keys openai --seed 1 --bad-shape text_projection");
        check_fails(d, "tensor 'text_projection' has shape [64, 31], expected [64, 32]");
    }
    {
        GEN_OR_SKIP(d, "bad_inproj",
                    "--keys openai --seed 1 --bad-shape transformer.resblocks.1.attn.in_proj_weight");
        check_fails(d, "tensor 'transformer.resblocks.1.attn.in_proj_weight' has shape [192, 63], "
                       "expected [192, 64]");
    }
    {
        GEN_OR_SKIP(d, "bad_hfproj", "--keys hf --seed 1 --bad-shape text_projection.weight");
        check_fails(d, "tensor 'text_projection.weight' has shape [32, 63], expected [32, 64]");
    }
    {
        GEN_OR_SKIP(d, "bad_lnpost", "--keys openai --seed 1 --bad-shape visual.ln_post.weight");
        check_fails(d, "tensor 'visual.ln_post.weight' has shape [63], expected [64]");
    }
}

/* Rewrites `from` to `to` (same length) inside dir/model.safetensors. */
static int patch_file(const char *dir, const char *from, const char *to)
{
    char path[600];
    char *buf = NULL;
    size_t len, n = strlen(from);
    cdb_err e;
    FILE *f;
    char *at;
    int ok = 0;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (cdb_read_file(path, (size_t)1 << 26, &buf, &len, &e) != CLIPDB_OK) return 0;
    at = memmem(buf, len, from, n);
    if (at && strlen(to) == n && (f = fopen(path, "wb"))) {
        memcpy(at, to, n);
        ok = fwrite(buf, 1, len, f) == len;
        ok = (fclose(f) == 0) && ok;
    }
    free(buf);
    return ok;
}

/* CLIP's ModifiedResNet tower (OpenAI names): its shape from the tensors,
** batch norm folded, model info, the precisions and training it refuses. */
TEST(weights_resnet_binds)
{
    clipdb_model *m = NULL;
    clipdb_model_info mi;
    cdb_trainer *t = NULL;
    cdb_train_opts o;
    cdb_err e = {0};
    const cdb_resnet *rn;
    GEN_OR_SKIP(dir, "rn_tiny", "--size rn-tiny --seed 4");
    REQUIRE(test_load_model(dir, &m) == CLIPDB_OK);
    REQUIRE((rn = m->vision.rn) != NULL);
    CHECK(rn->width == 16 && rn->layers[0] == 1 && rn->layers[1] == 2 && rn->layers[2] == 1 &&
          rn->layers[3] == 1 && rn->n_blocks == 5);
    CHECK(rn->dim == 512 && rn->heads == 8 && rn->grid == 4 && m->vision.image_size == 128);
    CHECK(m->embed_dim == 32 && !strcmp(m->key_style, "openai"));
    /* stage 1 block 0 widens 16 -> 64 (a downsample, stride 1); stage 2 block 1 keeps 128 */
    CHECK(rn->blocks[0].down.w && rn->blocks[0].stride == 1);
    CHECK(rn->blocks[1].down.w && rn->blocks[1].stride == 2);
    CHECK(!rn->blocks[2].down.w && rn->blocks[2].stride == 1 && rn->blocks[2].c1.cin == 128);
    CHECK(rn->stem[0].cout == 8 && rn->stem[0].cin == 3 && rn->stem[2].cout == 16);
    /* the folded batch norm of the stem's first conv, recomputed in double */
    for (int c = 0; c < 8; c++) {
        const cdb_conv *cv = &rn->stem[0];
        const double s = cv->bn_w[c] / sqrt((double)cv->bn_var[c] + 1e-5);
        CHECK_NEAR(cv->scale[c], s, 1e-6 * fabs(s) + 1e-12);
        CHECK_NEAR(cv->shift[c], cv->bn_b[c] - cv->bn_mean[c] * s, 1e-6);
    }
    REQUIRE(clipdb_model_get_info(m, &mi) == CLIPDB_OK);
    CHECK(!strcmp(mi.vision_kind, "resnet") && mi.patch_size == 0 && mi.vision_width == 16);
    CHECK(mi.vision_layers == 5 && mi.vision_stages[1] == 2 && mi.vision_heads == 8);
    CHECK(strstr(clipdb_model_identity(m), "clip-rn-w16-1.2.1.1-s128-") == clipdb_model_identity(m));
    /* the trainer lays it out under the file's names; the running statistics
    ** are buffers (never trained, no decay), the conv weights decay */
    cdb_train_opts_init(&o);
    REQUIRE(cdb_trainer_new(&t, m, &o, &e) == CLIPDB_OK);
    {
        const cdb_ptensor *rv = cdb_trainer_find(t, "visual.layer2.0.downsample.1.running_var");
        const cdb_ptensor *cw = cdb_trainer_find(t, "visual.layer2.0.downsample.0.weight");
        const cdb_ptensor *bw = cdb_trainer_find(t, "visual.layer2.0.bn3.weight");
        REQUIRE(rv && cw && bw);
        CHECK(!rv->trainable && !rv->decay && rv->numel == 128);
        CHECK(cw->trainable && cw->decay && cw->ndim == 4 && cw->shape[0] == 128);
        CHECK(bw->trainable && !bw->decay);
        CHECK(cdb_trainer_find(t, "visual.attnpool.c_proj.weight") != NULL);
        CHECK(cdb_trainer_find(t, "visual.layer2.1.downsample.0.weight") == NULL);
    }
    cdb_trainer_free(t);
    t = NULL;
    test_unload_model(m);
    m = NULL;
    CHECK(clipdb_model_open_precision(&m, dir, CLIPDB_PRECISION_BF16) == CLIPDB_EINVAL);
    CHECK(strstr(clipdb_model_errmsg(m), "fp32 only") != NULL);
    clipdb_model_close(m);
}

TEST(weights_resnet_errors_are_named)
{
    {
        GEN_OR_SKIP(d, "rn_drop", "--size rn-tiny --seed 1 "
                                  "--drop visual.layer2.0.downsample.1.running_var");
        check_fails(d, "missing tensor 'visual.layer2.0.downsample.1.running_var'");
    }
    {
        GEN_OR_SKIP(d, "rn_bad", "--size rn-tiny --seed 1 --bad-shape visual.layer3.0.conv2.weight");
        check_fails(d, "tensor 'visual.layer3.0.conv2.weight' has shape [64, 64, 3, 2], "
                       "expected [64, 64, 3, 3]");
    }
    {
        GEN_OR_SKIP(d, "rn_pool", "--size rn-tiny --seed 1 --bad-shape visual.attnpool.k_proj.bias");
        check_fails(d, "tensor 'visual.attnpool.k_proj.bias' has shape [511], expected [512]");
    }
    {
        GEN_OR_SKIP(d, "rn_pos", "--size rn-tiny --seed 1 "
                                 "--bad-shape visual.attnpool.positional_embedding");
        check_fails(d, "tensor 'visual.attnpool.positional_embedding' has shape [17, 511], "
                       "expected [17, 512]");
    }
}

TEST(weights_wrong_dtype_for_needed_tensor)
{
    GEN_OR_SKIP(d, "dt_i32", "--keys openai --seed 2");
    /* I32 has the same item size, so the file stays consistent */
    REQUIRE(patch_file(d, "\"logit_scale\":{\"dtype\":\"F32\"", "\"logit_scale\":{\"dtype\":\"I32\""));
    check_fails(d, "tensor 'logit_scale' has dtype I32; weights must be F32, F16 or BF16");
}

TEST(weights_width_must_be_multiple_of_64)
{
    GEN_OR_SKIP(d, "w63", "--keys openai --seed 2");
    /* conv1 (64,3,32,32) -> (63,3,32,32) leaves its byte count wrong: the reader catches it */
    REQUIRE(patch_file(d, "\"shape\":[64,3,32,32]", "\"shape\":[32,6,32,32]"));
    check_fails(d, "vision width 32 is not a multiple of 64");
}

TEST(weights_not_clip_or_mixed_names)
{
    static const char *const hdrs[] = {
        "{\"foo.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"visual.conv1.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"text_model.x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
        "{\"visual.conv1.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
    };
    static const char *const want[] = {"not a CLIP checkpoint", "mixes OpenAI",
                                       "missing tensor 'visual.proj'"};
    int i;
    for (i = 0; i < 3; i++) {
        size_t hl = strlen(hdrs[i]), len = 8 + hl + 8, k;
        uint8_t *b = calloc(1, len);
        clipdb_model m;
        REQUIRE(b);
        for (k = 0; k < 8; k++) b[k] = (uint8_t)((uint64_t)hl >> (8 * k));
        memcpy(b + 8, hdrs[i], hl);
        memset(&m, 0, sizeof m);
        if (cdb_st_parse(b, len, &m.st, &m.err) == CLIPDB_OK) {
            CHECK(cdb_weights_bind(&m) == CLIPDB_EFORMAT);
            if (!strstr(m.err.msg, want[i])) {
                fprintf(stderr, "    message was: %s\n", m.err.msg);
                test_fail_at(__FILE__, __LINE__, want[i]);
            }
        } else {
            test_fail_at(__FILE__, __LINE__, m.err.msg);
        }
        cdb_weights_release(&m);
        cdb_st_close(m.st);
        free(b);
    }
}

TEST(weights_identity_digest_and_disk_cache)
{
    clipdb_model *m = NULL;
    char cmd[700], line[256], want[17], cache[800];
    const char *id;
    FILE *p;
    GEN_OR_SKIP(d, "ident", "--keys hf --seed 3");
    snprintf(cmd, sizeof cmd, "sha256sum '%s/model.safetensors'", d);
    p = popen(cmd, "r");
    REQUIRE(p);
    REQUIRE(fgets(line, sizeof line, p) != NULL);
    pclose(p);
    memcpy(want, line, 16);
    want[16] = '\0';
    /* the cache lives under $XDG_CACHE_HOME/clipdb/identity, named by the
    ** SHA-256 of the weights' real path, never beside the weights */
    {
        char xdg[600], weights[600], *real, key[65];
        snprintf(xdg, sizeof xdg, "%s/xdg-cache", test_tmpdir());
        REQUIRE(setenv("XDG_CACHE_HOME", xdg, 1) == 0);
        snprintf(weights, sizeof weights, "%s/model.safetensors", d);
        real = realpath(weights, NULL);
        REQUIRE(real);
        REQUIRE(cdb_sha256_hex(real, strlen(real), key, NULL) == CLIPDB_OK);
        free(real);
        snprintf(cache, sizeof cache, "%s/clipdb/identity/%s", xdg, key);
    }
    unlink(cache);

    REQUIRE(test_load_model(d, &m) == CLIPDB_OK);
    id = clipdb_model_identity(m);
    REQUIRE(id);
    snprintf(line, sizeof line, "clip-w64-p32-%s", want);
    CHECK(!strcmp(id, line));
    CHECK(clipdb_model_identity(m) == id); /* cached in memory */
    test_unload_model(m);
    CHECK(access(cache, R_OK) == 0);
    {
        char beside[600];
        snprintf(beside, sizeof beside, "%s/model.safetensors.sha256", d);
        CHECK(access(beside, F_OK) != 0);
    }

    /* a cache with matching size and mtime is trusted (so a planted digest shows) */
    {
        char *text = NULL;
        size_t len;
        cdb_err e;
        unsigned long long size, mt;
        FILE *f;
        REQUIRE(cdb_read_file(cache, 256, &text, &len, &e) == CLIPDB_OK);
        REQUIRE(sscanf(text, "%llu %llu", &size, &mt) == 2);
        free(text);
        f = fopen(cache, "w");
        REQUIRE(f);
        fprintf(f, "%llu %llu %064d\n", size, mt, 0);
        fclose(f);
    }
    REQUIRE(test_load_model(d, &m) == CLIPDB_OK);
    CHECK(!strcmp(clipdb_model_identity(m), "clip-w64-p32-0000000000000000"));
    test_unload_model(m);

    /* once the file's mtime changes, the cache is stale and the digest is computed again */
    {
        char path[600];
        struct timespec ts[2] = {{1000000, 5}, {1000000, 5}};
        snprintf(path, sizeof path, "%s/model.safetensors", d);
        REQUIRE(utimensat(AT_FDCWD, path, ts, 0) == 0);
    }
    REQUIRE(test_load_model(d, &m) == CLIPDB_OK);
    CHECK(!strcmp(clipdb_model_identity(m), line));
    test_unload_model(m);

    /* no usable cache directory: the identity is still right, just not cached */
    {
        char nodir[600];
        snprintf(nodir, sizeof nodir, "%s/model.safetensors", d); /* a file, not a dir */
        REQUIRE(setenv("XDG_CACHE_HOME", nodir, 1) == 0);
        REQUIRE(test_load_model(d, &m) == CLIPDB_OK);
        CHECK(!strcmp(clipdb_model_identity(m), line));
        test_unload_model(m);
    }
    unsetenv("XDG_CACHE_HOME");

    /* a model with no weights has no identity */
    {
        clipdb_model z;
        memset(&z, 0, sizeof z);
        CHECK(clipdb_model_identity(&z) == NULL);
    }
}

TEST(weights_minimal_fuzz_seed_binds)
{
    /* the fuzz seed that reaches the binder must itself bind (no python needed) */
    clipdb_model m;
    memset(&m, 0, sizeof m);
    REQUIRE(cdb_st_open("tests/fuzz/seeds/safetensors/mini_clip_openai_bf16.safetensors", &m.st,
                        &m.err) == CLIPDB_OK);
    CHECK(cdb_weights_bind(&m) == CLIPDB_OK);
    CHECK(m.dtype && !strcmp(m.dtype, "BF16") && !strcmp(m.key_style, "openai"));
    CHECK(m.vision.t.width == 64 && m.vision.t.layers == 1 && m.vision.t.mlp == 1);
    CHECK(m.vision.patch == 1 && m.vision.grid == 1 && m.vision.image_size == 1);
    CHECK(m.text.vocab == 1 && m.text.context == 1 && m.embed_dim == 1);
    CHECK(m.n_owned > 0);
    cdb_weights_release(&m);
    cdb_st_close(m.st);
    /* and the ResNet one: width 2, one bottleneck a stage, a 1 x 1 grid */
    memset(&m, 0, sizeof m);
    REQUIRE(cdb_st_open("tests/fuzz/seeds/safetensors/mini_clip_resnet_bf16.safetensors", &m.st,
                        &m.err) == CLIPDB_OK);
    CHECK(cdb_weights_bind(&m) == CLIPDB_OK);
    REQUIRE(m.vision.rn != NULL);
    CHECK(m.vision.rn->width == 2 && m.vision.rn->n_blocks == 4 && m.vision.rn->grid == 1);
    CHECK(m.vision.rn->heads == 1 && m.vision.image_size == 32 && m.embed_dim == 1);
    cdb_weights_release(&m);
    CHECK(m.vision.rn == NULL);
    cdb_st_close(m.st);
}
