/*
** Unit tests of src/model/writer.c and cdb_weights_layout: fp32 -> F16/BF16
** rounding, model directories written in both key conventions and all three
** dtypes that bind back to the same weights (and equal, tensor by tensor, the
** files tools/gen_model.py writes in that convention), NaN refused with the
** tensor's name, an existing --out refused without force, and a write that
** fails half-way (file-size limit) leaving the previous file intact.
*/
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model/writer.h"
#include "models.h"
#include "test.h"

float cdb_f16_to_f32(uint16_t h);

static void put_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) abort();
    fputs(text, f);
    fclose(f);
}

TEST(writer_f16_round_trips_every_finite_half)
{
    uint32_t h;
    int bad = 0;
    for (h = 0; h < 65536; h++) {
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) continue; /* NaN */
        if (cdb_f32_to_f16(cdb_f16_to_f32((uint16_t)h)) != h) bad++;
    }
    CHECK(bad == 0);
    /* round to nearest, ties to even; overflow to inf; underflow to zero */
    CHECK(cdb_f32_to_f16(1.0f) == 0x3c00);
    CHECK(cdb_f32_to_f16(65504.0f) == 0x7bff);
    CHECK(cdb_f32_to_f16(65520.0f) == 0x7c00);
    CHECK(cdb_f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00);       /* tie -> even */
    CHECK(cdb_f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02);       /* tie -> even (up) */
    CHECK(cdb_f32_to_f16(1.0f + 1.0f / 2048 + 1e-7f) == 0x3c01);
    CHECK(cdb_f32_to_f16(ldexpf(1, -24)) == 0x0001);
    CHECK(cdb_f32_to_f16(ldexpf(1, -25)) == 0x0000);            /* tie -> even (zero) */
    CHECK(cdb_f32_to_f16(ldexpf(3, -25)) == 0x0002);
    CHECK(cdb_f32_to_f16(-2.0f) == 0xc000);
    CHECK(cdb_f32_to_f16(ldexpf(1023, -24) + ldexpf(1, -25)) == 0x0400); /* carry to normal */
}

TEST(writer_bf16_round_trips_and_rounds_to_even)
{
    uint32_t h;
    int bad = 0;
    for (h = 0; h < 65536; h++) {
        if ((h & 0x7f80u) == 0x7f80u && (h & 0x7fu)) continue;
        if (cdb_f32_to_bf16(cdb_bf16_to_f32((uint16_t)h)) != h) bad++;
    }
    CHECK(bad == 0);
    CHECK(cdb_f32_to_bf16(1.0f + ldexpf(1, -8)) == 0x3f80);
    CHECK(cdb_f32_to_bf16(1.0f + ldexpf(3, -8)) == 0x3f82);
    CHECK(cdb_f32_to_bf16(1.0f + ldexpf(1, -8) + ldexpf(1, -20)) == 0x3f81);
    CHECK(isnan(cdb_bf16_to_f32(cdb_f32_to_bf16(NAN))));
}

/* Element i (file order) of a laid-out tensor, as the writer reads it. */
static float lay_elem(const cdb_wtensor *t, size_t i)
{
    int p;
    if (t->transpose) {
        size_t r = i / (size_t)t->shape[1], c = i % (size_t)t->shape[1];
        return t->part[0][c * (size_t)t->shape[0] + r];
    }
    for (p = 0; p < t->n_parts; p++) {
        if (i < t->part_n[p]) return t->part[p][i];
        i -= t->part_n[p];
    }
    return NAN;
}

static size_t lay_numel(const cdb_wtensor *t)
{
    size_t n = 1;
    int i;
    for (i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

/* Every weight of a equals b's after rounding a's to dtype. */
static int same_weights(const clipdb_model *a, const clipdb_model *b, int dtype)
{
    cdb_wtensor *ta = NULL, *tb = NULL;
    size_t na = 0, nb = 0, i, j;
    cdb_err e;
    int bad = 0;
    if (cdb_weights_layout(a, "openai", &ta, &na, &e) ||
        cdb_weights_layout(b, "openai", &tb, &nb, &e) || na != nb) {
        free(ta);
        free(tb);
        return 0;
    }
    for (i = 0; i < na && !bad; i++) {
        size_t n = lay_numel(&ta[i]);
        if (strcmp(ta[i].name, tb[i].name) || n != lay_numel(&tb[i])) bad = 1;
        for (j = 0; j < n && !bad; j++) {
            float x = lay_elem(&ta[i], j), y = lay_elem(&tb[i], j);
            if (dtype == CDB_DT_F16) x = cdb_f16_to_f32(cdb_f32_to_f16(x));
            if (dtype == CDB_DT_BF16) x = cdb_bf16_to_f32(cdb_f32_to_bf16(x));
            if (memcmp(&x, &y, sizeof x)) {
                fprintf(stderr, "    %s[%zu]: %.9g vs %.9g\n", ta[i].name, j, x, y);
                bad = 1;
            }
        }
    }
    free(ta);
    free(tb);
    return !bad;
}

/* The tensors of two safetensors files with the same names hold the same bytes. */
static int same_file_tensors(const char *pa, const char *pb)
{
    cdb_safetensors *a = NULL, *b = NULL;
    cdb_err e;
    size_t i, matched = 0;
    int ok = cdb_st_open(pa, &a, &e) == CLIPDB_OK && cdb_st_open(pb, &b, &e) == CLIPDB_OK;
    for (i = 0; ok && i < a->n; i++) {
        const cdb_tensor *x = &a->tensors[i], *y = cdb_st_find(b, x->name);
        if (!y) continue; /* e.g. HF's position_ids, which clipdb does not write */
        matched++;
        ok = x->dtype == y->dtype && x->nbytes == y->nbytes && x->ndim == y->ndim &&
             !memcmp(x->shape, y->shape, sizeof(int64_t) * (size_t)x->ndim) &&
             !memcmp(x->data, y->data, x->nbytes);
        if (!ok) fprintf(stderr, "    tensor %s differs\n", x->name);
    }
    if (ok && matched != b->n) {
        fprintf(stderr, "    %zu of %zu written tensors matched\n", matched, b->n);
        ok = 0;
    }
    cdb_st_close(a);
    cdb_st_close(b);
    return ok;
}

TEST(writer_model_dir_both_conventions_all_dtypes)
{
    static const char *const styles[] = {"openai", "hf"};
    static const struct { int dt; const char *name; } dts[] = {
        {CDB_DT_F32, "F32"}, {CDB_DT_F16, "F16"}, {CDB_DT_BF16, "BF16"}};
    char src_dir[600], out[700], ref[700], tok[800], ref_path[800], out_path[800];
    clipdb_model *src = NULL;
    const char *d;
    int s, k;

    d = test_gen_model("wr_src", "--keys openai --dtype F32 --seed 7");
    if (!d) SKIP("python3 not available");
    snprintf(src_dir, sizeof src_dir, "%s", d);
    snprintf(tok, sizeof tok, "%s/merges.txt", src_dir);
    put_file(tok, "#version: test\n");
    REQUIRE(test_load_model(src_dir, &src) == CLIPDB_OK);
    for (s = 0; s < 2; s++) {
        for (k = 0; k < 3; k++) {
            cdb_model_write_opts o = {0};
            clipdb_model *back = NULL;
            cdb_err e;
            char args[128], refname[64], *copied = NULL;
            size_t clen = 0;
            o.style = styles[s];
            o.dtype = dts[k].dt;
            o.made_json = "{\"command\": \"test\"}";
            snprintf(out, sizeof out, "%s/wr_out_%s_%s", test_tmpdir(), styles[s], dts[k].name);
            cdb_err_clear(&e);
            CHECK(cdb_model_write_dir(src, out, &o, &e) == CLIPDB_OK);
            if (e.code) fprintf(stderr, "    %s\n", e.msg);
            REQUIRE(test_load_model(out, &back) == CLIPDB_OK);
            CHECK(!strcmp(back->key_style, styles[s]));
            CHECK(!strcmp(back->dtype, dts[k].name));
            CHECK(same_weights(src, back, dts[k].dt));
            test_unload_model(back);
            /* the tokenizer file was copied, the JSON written */
            snprintf(tok, sizeof tok, "%s/merges.txt", out);
            CHECK(cdb_read_file(tok, 1024, &copied, &clen, &e) == CLIPDB_OK &&
                  !strcmp(copied, "#version: test\n"));
            free(copied);
            snprintf(tok, sizeof tok, "%s/%s", out, CDB_MADE_FILE);
            CHECK(cdb_file_exists(tok));
            /* the same bytes, tensor by tensor, as gen_model.py writes in this convention */
            snprintf(refname, sizeof refname, "wr_ref_%s_%s", styles[s], dts[k].name);
            snprintf(args, sizeof args, "--keys %s --dtype %s --seed 7", styles[s], dts[k].name);
            d = test_gen_model(refname, args);
            REQUIRE(d);
            snprintf(ref, sizeof ref, "%s", d);
            snprintf(ref_path, sizeof ref_path, "%s/model.safetensors", ref);
            snprintf(out_path, sizeof out_path, "%s/model.safetensors", out);
            CHECK(same_file_tensors(ref_path, out_path));
        }
    }
    test_unload_model(src);
}

TEST(writer_refuses_nan_and_existing_out)
{
    char out[600], probe[700];
    clipdb_model *m = NULL;
    cdb_model_write_opts o = {0};
    cdb_err e;
    float *cls;
    const float *saved;
    const char *d = test_gen_model("wr_nan", "--keys openai --dtype F32 --seed 3");
    if (!d) SKIP("python3 not available");
    snprintf(probe, sizeof probe, "%s/merges.txt", d);
    put_file(probe, "#version: test\n");
    REQUIRE(test_load_model(d, &m) == CLIPDB_OK);
    snprintf(out, sizeof out, "%s/wr_nan_out", test_tmpdir());

    cls = malloc(sizeof(float) * (size_t)m->vision.t.width);
    REQUIRE(cls);
    memcpy(cls, m->vision.class_emb, sizeof(float) * (size_t)m->vision.t.width);
    cls[5] = NAN;
    saved = m->vision.class_emb;
    m->vision.class_emb = cls;
    cdb_err_clear(&e);
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "visual.class_embedding") && strstr(e.msg, "NaN"));
    CHECK(access(out, F_OK) != 0);
    cls[5] = INFINITY;
    o.style = "hf";
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "vision_model.embeddings.class_embedding") && strstr(e.msg, "infinity"));
    /* finite in F32 but not in F16 */
    cls[5] = 1e6f;
    o.dtype = CDB_DT_F16;
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "overflows F16"));
    CHECK(access(out, F_OK) != 0);
    m->vision.class_emb = saved;
    free(cls);

    o.style = NULL;
    o.dtype = 0;
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_OK);
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_EINVAL);
    CHECK(strstr(e.msg, "already exists") && strstr(e.msg, "--force"));
    snprintf(probe, sizeof probe, "%s/stray", out);
    put_file(probe, "x");
    o.force = 1;
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_OK);
    CHECK(access(probe, F_OK) != 0); /* replaced whole, not merged */
    snprintf(probe, sizeof probe, "%s/model.safetensors", out);
    CHECK(cdb_file_exists(probe));
    /* a parent that does not exist: a clear error */
    snprintf(out, sizeof out, "%s/no/such/dir/out", test_tmpdir());
    CHECK(cdb_model_write_dir(m, out, &o, &e) == CLIPDB_EIO);
    CHECK(strstr(e.msg, "cannot create") && strstr(e.msg, "No such file"));
    test_unload_model(m);
}

TEST(writer_failed_write_keeps_previous_file)
{
    char path[600];
    float big[4096];
    cdb_wtensor t;
    cdb_err e;
    char *before = NULL, *after = NULL;
    size_t lb = 0, la = 0, i;
    pid_t pid;
    int status = 0;

    for (i = 0; i < 4096; i++) big[i] = (float)i;
    memset(&t, 0, sizeof t);
    snprintf(t.name, sizeof t.name, "w");
    t.ndim = 1;
    t.shape[0] = 16;
    t.part[0] = big;
    t.part_n[0] = 16;
    t.n_parts = 1;
    snprintf(path, sizeof path, "%s/wr_atomic.safetensors", test_tmpdir());
    REQUIRE(cdb_st_write(path, &t, 1, CDB_DT_F32, NULL, NULL, 0, &e) == CLIPDB_OK);
    REQUIRE(cdb_read_file(path, 1 << 20, &before, &lb, &e) == CLIPDB_OK);

    /* A child writes a 16 KB tensor under a 4 KB file-size limit. */
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        struct rlimit rl = {4096, 4096};
        signal(SIGXFSZ, SIG_IGN);
        setrlimit(RLIMIT_FSIZE, &rl);
        t.shape[0] = 4096;
        t.part_n[0] = 4096;
        _exit(cdb_st_write(path, &t, 1, CDB_DT_F32, NULL, NULL, 0, &e) == CLIPDB_EIO &&
                      strstr(e.msg, "File too large")
                  ? 0
                  : 1);
    }
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    REQUIRE(cdb_read_file(path, 1 << 20, &after, &la, &e) == CLIPDB_OK);
    CHECK(la == lb && !memcmp(before, after, lb));
    {
        char tmp[700];
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)pid);
        CHECK(access(tmp, F_OK) != 0); /* the partial file was removed */
    }
    free(before);
    free(after);
}
