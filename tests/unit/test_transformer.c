/*
** Unit tests of src/model/transformer.c: the elementwise kernels and the
** residual block against naive scalar (double) references, the text
** tower's length grouping and causal cut-off, the vision tower's chunking,
** and concurrent use of one model from two threads.
*/
#include <pthread.h>
#include <stdint.h>

#include "model/transformer.h"
#include "test.h"

/* ---- helpers ------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(float a) /* uniform in [-a, a) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return a * (2.0f * (float)((rng_state >> 40) & 0xFFFFFF) / 16777216.0f - 1.0f);
}
static float *rnd(size_t n, float a, float center)
{
    float *p = malloc(n * sizeof *p);
    size_t i;
    for (i = 0; i < n; i++) p[i] = center + frand(a);
    return p;
}

/* A block with random weights; packed: wq, wk, wv in one (3d, d) array as
** OpenAI's in_proj_weight, else three arrays as HF's q/k/v_proj. */
static void make_block(cdb_block *b, int d, int f, int packed)
{
    float ws = 1.0f / sqrtf((float)d), wf = 1.0f / sqrtf((float)f);
    memset(b, 0, sizeof *b); /* no packed forms: plain fp32 weights */
    b->ln1_w = rnd(d, 0.2f, 1.0f);
    b->ln1_b = rnd(d, 0.1f, 0.0f);
    if (packed) {
        float *w = rnd((size_t)3 * d * d, ws, 0.0f), *bb = rnd((size_t)3 * d, 0.1f, 0.0f);
        b->wq = w, b->wk = w + (size_t)d * d, b->wv = w + (size_t)2 * d * d;
        b->bq = bb, b->bk = bb + d, b->bv = bb + 2 * d;
    } else {
        b->wq = rnd((size_t)d * d, ws, 0.0f);
        b->wk = rnd((size_t)d * d, ws, 0.0f);
        b->wv = rnd((size_t)d * d, ws, 0.0f);
        b->bq = rnd(d, 0.1f, 0.0f);
        b->bk = rnd(d, 0.1f, 0.0f);
        b->bv = rnd(d, 0.1f, 0.0f);
    }
    b->wo = rnd((size_t)d * d, ws, 0.0f);
    b->bo = rnd(d, 0.1f, 0.0f);
    b->ln2_w = rnd(d, 0.2f, 1.0f);
    b->ln2_b = rnd(d, 0.1f, 0.0f);
    b->fc1_w = rnd((size_t)f * d, ws, 0.0f);
    b->fc1_b = rnd(f, 0.1f, 0.0f);
    b->fc2_w = rnd((size_t)d * f, wf, 0.0f);
    b->fc2_b = rnd(d, 0.1f, 0.0f);
}
static void free_block(cdb_block *b, int d)
{
    int packed = b->wk == b->wq + (size_t)d * d;
    free((void *)b->ln1_w), free((void *)b->ln1_b), free((void *)b->wq), free((void *)b->bq);
    if (!packed) free((void *)b->wk), free((void *)b->wv), free((void *)b->bk), free((void *)b->bv);
    free((void *)b->wo), free((void *)b->bo), free((void *)b->ln2_w), free((void *)b->ln2_b);
    free((void *)b->fc1_w), free((void *)b->fc1_b), free((void *)b->fc2_w), free((void *)b->fc2_b);
}

/* Naive scalar reference of the block for one sequence x (T, d), in double. */
static void ref_ln(const double *x, const float *w, const float *b, double *y, int d)
{
    double m = 0, v = 0;
    int i;
    for (i = 0; i < d; i++) m += x[i];
    m /= d;
    for (i = 0; i < d; i++) v += (x[i] - m) * (x[i] - m);
    v /= d;
    for (i = 0; i < d; i++) y[i] = (x[i] - m) / sqrt(v + 1e-5) * w[i] + b[i];
}
static void ref_block(const cdb_block *b, int d, int f, int T, int causal, double *x)
{
    double *h = calloc((size_t)T * d, sizeof *h), *q = calloc((size_t)T * d, sizeof *q);
    double *k = calloc((size_t)T * d, sizeof *k), *v = calloc((size_t)T * d, sizeof *v);
    double *o = calloc((size_t)T * d, sizeof *o), *m = calloc((size_t)f, sizeof *m);
    double *sc = calloc((size_t)T, sizeof *sc);
    int t, i, j, hh, c, nh = d / 64;
    for (t = 0; t < T; t++) ref_ln(x + t * d, b->ln1_w, b->ln1_b, h + t * d, d);
    for (t = 0; t < T; t++)
        for (i = 0; i < d; i++) {
            double aq = b->bq[i], ak = b->bk[i], av = b->bv[i];
            for (j = 0; j < d; j++) {
                aq += h[t * d + j] * b->wq[(size_t)i * d + j];
                ak += h[t * d + j] * b->wk[(size_t)i * d + j];
                av += h[t * d + j] * b->wv[(size_t)i * d + j];
            }
            q[t * d + i] = aq, k[t * d + i] = ak, v[t * d + i] = av;
        }
    for (hh = 0; hh < nh; hh++)
        for (t = 0; t < T; t++) {
            int nk = causal ? t + 1 : T;
            double mx = -1e300, sum = 0;
            for (j = 0; j < nk; j++) {
                double s = 0;
                for (c = 0; c < 64; c++) s += q[t * d + hh * 64 + c] * k[j * d + hh * 64 + c];
                sc[j] = s / 8.0;
                if (sc[j] > mx) mx = sc[j];
            }
            for (j = 0; j < nk; j++) sum += (sc[j] = exp(sc[j] - mx));
            for (c = 0; c < 64; c++) {
                double a = 0;
                for (j = 0; j < nk; j++) a += sc[j] / sum * v[j * d + hh * 64 + c];
                o[t * d + hh * 64 + c] = a;
            }
        }
    for (t = 0; t < T; t++)
        for (i = 0; i < d; i++) {
            double a = b->bo[i];
            for (j = 0; j < d; j++) a += o[t * d + j] * b->wo[(size_t)i * d + j];
            x[t * d + i] += a;
        }
    for (t = 0; t < T; t++) {
        ref_ln(x + t * d, b->ln2_w, b->ln2_b, h + t * d, d);
        for (i = 0; i < f; i++) {
            double a = b->fc1_b[i];
            for (j = 0; j < d; j++) a += h[t * d + j] * b->fc1_w[(size_t)i * d + j];
            m[i] = a / (1.0 + exp(-1.702 * a));
        }
        for (i = 0; i < d; i++) {
            double a = b->fc2_b[i];
            for (j = 0; j < f; j++) a += m[j] * b->fc2_w[(size_t)i * f + j];
            x[t * d + i] += a;
        }
    }
    free(h), free(q), free(k), free(v), free(o), free(m), free(sc);
}

/* ---- kernels --------------------------------------------------------------- */

static const size_t kernel_sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 50, 64, 77, 512, 768};

TEST(transformer_layernorm_matches_scalar)
{
    size_t si, i, n;
    for (si = 0; si < sizeof kernel_sizes / sizeof *kernel_sizes; si++) {
        n = kernel_sizes[si];
        float *x = rnd(2 * n, 3.0f, 0.5f), *w = rnd(n, 0.5f, 1.0f), *b = rnd(n, 0.5f, 0.0f);
        float *bias = rnd(n, 1.0f, 0.0f), *y = malloc(2 * n * sizeof *y);
        double *xd = malloc(2 * n * sizeof *xd), *yd = malloc(n * sizeof *yd);
        for (i = 0; i < 2 * n; i++) xd[i] = (double)x[i] + bias[i % n];
        cdb_layernorm(x, bias, w, b, y, 2, n);
        for (int r = 0; r < 2; r++) {
            ref_ln(xd + r * n, w, b, yd, (int)n);
            for (i = 0; i < n; i++) {
                CHECK_NEAR(y[r * n + i], yd[i], 2e-5);
                CHECK_NEAR(x[r * n + i], xd[r * n + i], 1e-6); /* bias folded into x */
            }
        }
        free(x), free(w), free(b), free(bias), free(y), free(xd), free(yd);
    }
}

TEST(transformer_quick_gelu_and_softmax_match_scalar)
{
    size_t si, i, n;
    for (si = 0; si < sizeof kernel_sizes / sizeof *kernel_sizes; si++) {
        n = kernel_sizes[si];
        float *x = rnd(n, 12.0f, 0.0f), *bias = rnd(n, 1.0f, 0.0f), *x0 = malloc(n * sizeof *x0);
        double sum = 0, mx = -1e300;
        memcpy(x0, x, n * sizeof *x0);
        cdb_quick_gelu(x, bias, 1, n);
        for (i = 0; i < n; i++) {
            double v = (double)x0[i] + bias[i], g = v / (1.0 + exp(-1.702 * v));
            CHECK_NEAR(x[i], g, 1e-6 * (1.0 + fabs(g)));
        }
        memcpy(x, x0, n * sizeof *x0);
        x[n / 2] = 95.0f; /* large logits must not overflow */
        x0[n / 2] = 95.0f;
        cdb_softmax(x, n, 0.125f);
        for (i = 0; i < n; i++) mx = fmax(mx, 0.125 * x0[i]);
        for (i = 0; i < n; i++) sum += exp(0.125 * x0[i] - mx);
        for (i = 0; i < n; i++) CHECK_NEAR(x[i], exp(0.125 * x0[i] - mx) / sum, 1e-6);
        free(x), free(bias), free(x0);
    }
    {
        float big[3] = {-200.0f, 0.0f, 200.0f};
        cdb_quick_gelu(big, NULL, 1, 3);
        CHECK_NEAR(big[0], 0.0, 1e-30);
        CHECK_NEAR(big[1], 0.0, 0.0);
        CHECK_NEAR(big[2], 200.0, 1e-4);
    }
}

/* ---- the block --------------------------------------------------------------- */

TEST(transformer_block_matches_scalar_reference)
{
    static const int widths[] = {64, 128}, tokens[] = {1, 2, 7, 50};
    struct cdb_run *r = cdb_run_new();
    cdb_err e;
    REQUIRE(r);
    for (int wi = 0; wi < 2; wi++)
        for (int ti = 0; ti < 4; ti++)
            for (int causal = 0; causal < 2; causal++) {
                const int d = widths[wi], f = 4 * d, T = tokens[ti], nseq = 3;
                const size_t n = (size_t)nseq * T * d;
                cdb_block b;
                float *x, *xq;
                double *xd = malloc(n * sizeof *xd), maxerr = 0;
                int qpos[3] = {0, T / 2, T - 1};
                size_t i;
                make_block(&b, d, f, (wi + ti + causal) % 2);
                x = rnd(n, 1.0f, 0.0f);
                xq = malloc(n * sizeof *xq);
                memcpy(xq, x, n * sizeof *x);
                for (i = 0; i < n; i++) xd[i] = x[i];
                REQUIRE(cdb_block_forward(r, &b, d, f, x, nseq, T, causal, NULL, &e) == CLIPDB_OK);
                for (int s = 0; s < nseq; s++) ref_block(&b, d, f, T, causal, xd + (size_t)s * T * d);
                for (i = 0; i < n; i++) maxerr = fmax(maxerr, fabs(x[i] - xd[i]));
                if (maxerr > 2e-4) {
                    char m[128];
                    snprintf(m, sizeof m, "d %d T %d causal %d: max error %g", d, T, causal, maxerr);
                    test_fail_at(__FILE__, __LINE__, m);
                }
                /* only the qpos rows: equal to those rows of the full computation */
                REQUIRE(cdb_block_forward(r, &b, d, f, xq, nseq, T, causal, qpos, &e) == CLIPDB_OK);
                for (int s = 0; s < nseq; s++)
                    for (int c = 0; c < d; c++)
                        CHECK_NEAR(xq[(size_t)s * d + c], x[((size_t)s * T + qpos[s]) * d + c], 1e-5);
                free_block(&b, d);
                free(x), free(xq), free(xd);
            }
    cdb_run_free(r);
}

/* ---- towers ------------------------------------------------------------------ */

#define TV 300  /* vocabulary of the test text tower; id TV-1 is the end token */
#define TE 32   /* embedding size */

typedef struct towers {
    cdb_text text;
    cdb_vision vision;
} towers;

static void make_tower(cdb_tower *t, int d, int layers, int packed, int transposed)
{
    t->width = d, t->layers = layers, t->heads = d / 64, t->mlp = 4 * d;
    t->blocks = calloc((size_t)layers, sizeof *t->blocks);
    for (int l = 0; l < layers; l++) make_block(&t->blocks[l], d, 4 * d, packed);
    t->ln_post_w = rnd(d, 0.2f, 1.0f);
    t->ln_post_b = rnd(d, 0.1f, 0.0f);
    t->proj = rnd((size_t)d * TE, 0.1f, 0.0f);
    t->proj_transposed = transposed;
}
static void free_tower(cdb_tower *t)
{
    for (int l = 0; l < t->layers; l++) free_block(&t->blocks[l], t->width);
    free(t->blocks), free((void *)t->ln_post_w), free((void *)t->ln_post_b), free((void *)t->proj);
}
static void make_towers(towers *w)
{
    memset(w, 0, sizeof *w);
    make_tower(&w->text.t, 64, 2, 1, 0);
    w->text.context = 77, w->text.vocab = TV;
    w->text.tok_emb = rnd((size_t)TV * 64, 0.5f, 0.0f);
    w->text.pos_emb = rnd((size_t)77 * 64, 0.1f, 0.0f);
    make_tower(&w->vision.t, 128, 2, 0, 1);
    w->vision.image_size = 32, w->vision.patch = 8, w->vision.grid = 4, w->vision.n_pos = 17;
    w->vision.patch_w = rnd((size_t)128 * 3 * 64, 0.1f, 0.0f);
    w->vision.class_emb = rnd(128, 0.5f, 0.0f);
    w->vision.pos_emb = rnd((size_t)17 * 128, 0.1f, 0.0f);
    w->vision.ln_pre_w = rnd(128, 0.2f, 1.0f);
    w->vision.ln_pre_b = rnd(128, 0.1f, 0.0f);
}
static void free_towers(towers *w)
{
    free_tower(&w->text.t);
    free((void *)w->text.tok_emb), free((void *)w->text.pos_emb);
    free_tower(&w->vision.t);
    free((void *)w->vision.patch_w), free((void *)w->vision.class_emb);
    free((void *)w->vision.pos_emb), free((void *)w->vision.ln_pre_w);
    free((void *)w->vision.ln_pre_b);
}

#define NT 40
typedef struct text_set {
    int32_t ids[NT][77];
    const int32_t *p[NT];
    int lens[NT];
} text_set;
static void make_texts(text_set *ts)
{
    for (int i = 0; i < NT; i++) {
        int len = 2 + (i * 37) % 76; /* 2..77, mixed order */
        ts->ids[i][0] = TV - 2;      /* "start" */
        for (int j = 1; j < len - 1; j++) ts->ids[i][j] = (int32_t)((i * 131 + j * 17) % (TV - 2));
        ts->ids[i][len - 1] = TV - 1; /* "end": the largest id */
        ts->lens[i] = len;
        ts->p[i] = ts->ids[i];
    }
}

static double max_rel_diff(const float *a, const float *b, size_t n)
{
    double m = 0, s = 0;
    for (size_t i = 0; i < n; i++) s = fmax(s, fabs(b[i]));
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(a[i] - b[i]));
    return m / (s > 0 ? s : 1);
}

TEST(transformer_text_groups_and_cutoff_equal_full_computation)
{
    towers w;
    text_set *ts = malloc(sizeof *ts);
    float *batch = malloc(NT * TE * sizeof(float)), *one = malloc(NT * TE * sizeof(float));
    float *full = malloc(NT * TE * sizeof(float));
    struct cdb_run *r = cdb_run_new();
    cdb_err e;
    int i;
    make_towers(&w);
    make_texts(ts);
    /* all texts in one call: sorted, grouped by length, cut off at the end token */
    REQUIRE(cdb_text_forward(r, &w.text, TE, ts->p, ts->lens, NT, 0, batch, &e) == CLIPDB_OK);
    /* each alone */
    for (i = 0; i < NT; i++)
        REQUIRE(cdb_text_forward(r, &w.text, TE, ts->p + i, ts->lens + i, 1, 0, one + i * TE, &e) ==
                CLIPDB_OK);
    /* CLIP's way: 77 positions (padded with id 0) through every block */
    REQUIRE(cdb_text_forward(r, &w.text, TE, ts->p, ts->lens, NT, 1, full, &e) == CLIPDB_OK);
    CHECK(max_rel_diff(batch, one, NT * TE) < 1e-5);
    CHECK(max_rel_diff(batch, full, NT * TE) < 1e-5);
    /* an id outside the vocabulary is an error, not a read out of bounds */
    ts->ids[3][1] = TV;
    CHECK(cdb_text_forward(r, &w.text, TE, ts->p, ts->lens, NT, 0, batch, &e) == CLIPDB_EINVAL);
    CHECK(strstr(e.msg, "text 3") != NULL);
    cdb_run_free(r);
    free_towers(&w);
    free(ts), free(batch), free(one), free(full);
}

TEST(transformer_vision_chunks_equal_one_at_a_time)
{
    towers w;
    const int n = CDB_VISION_CHUNK + 3, px = 3 * 32 * 32;
    float *pix = rnd((size_t)n * px, 2.0f, 0.0f);
    float *batch = malloc((size_t)n * TE * sizeof(float)), *one = malloc((size_t)n * TE * sizeof(float));
    struct cdb_run *r = cdb_run_new();
    cdb_err e;
    make_towers(&w);
    REQUIRE(cdb_vision_forward(r, &w.vision, TE, pix, n, batch, &e) == CLIPDB_OK);
    for (int i = 0; i < n; i++)
        REQUIRE(cdb_vision_forward(r, &w.vision, TE, pix + (size_t)i * px, 1, one + i * TE, &e) ==
                CLIPDB_OK);
    CHECK(max_rel_diff(batch, one, (size_t)n * TE) < 1e-5);
    /* images differ, so do their vectors */
    CHECK(max_rel_diff(batch, batch + TE, TE) > 1e-3);
    cdb_run_free(r);
    free_towers(&w);
    free(pix), free(batch), free(one);
}

typedef struct job {
    const towers *w;
    const text_set *ts;
    const float *pix;
    int n_img;
    float *text_out, *img_out;
    int rc;
} job;

static void *encode_job(void *arg)
{
    job *j = arg;
    struct cdb_run *r = cdb_run_new();
    cdb_err e;
    j->rc = CLIPDB_ENOMEM;
    if (!r) return NULL;
    for (int rep = 0; rep < 3; rep++) {
        j->rc = cdb_text_forward(r, &j->w->text, TE, j->ts->p, j->ts->lens, NT, 0, j->text_out, &e);
        if (j->rc) break;
        j->rc = cdb_vision_forward(r, &j->w->vision, TE, j->pix, j->n_img, j->img_out, &e);
        if (j->rc) break;
    }
    cdb_run_free(r);
    return NULL;
}

TEST(transformer_two_threads_give_the_serial_results)
{
    towers w;
    text_set *ts = malloc(sizeof *ts);
    const int n_img = 20, px = 3 * 32 * 32;
    float *pix = rnd((size_t)n_img * px, 2.0f, 0.0f);
    job serial, t[2];
    pthread_t th[2];
    make_towers(&w);
    make_texts(ts);
    memset(&serial, 0, sizeof serial);
    serial.w = &w, serial.ts = ts, serial.pix = pix, serial.n_img = n_img;
    serial.text_out = malloc(NT * TE * sizeof(float));
    serial.img_out = malloc((size_t)n_img * TE * sizeof(float));
    encode_job(&serial);
    REQUIRE(serial.rc == CLIPDB_OK);
    for (int k = 0; k < 2; k++) {
        t[k] = serial;
        t[k].text_out = calloc(NT * TE, sizeof(float));
        t[k].img_out = calloc((size_t)n_img * TE, sizeof(float));
        REQUIRE(pthread_create(&th[k], NULL, encode_job, &t[k]) == 0);
    }
    for (int k = 0; k < 2; k++) {
        pthread_join(th[k], NULL);
        CHECK(t[k].rc == CLIPDB_OK);
        CHECK(!memcmp(t[k].text_out, serial.text_out, NT * TE * sizeof(float)));
        CHECK(!memcmp(t[k].img_out, serial.img_out, (size_t)n_img * TE * sizeof(float)));
        free(t[k].text_out), free(t[k].img_out);
    }
    free(serial.text_out), free(serial.img_out), free(pix), free(ts);
    free_towers(&w);
}
