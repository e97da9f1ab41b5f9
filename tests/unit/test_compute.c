/*
** test_compute.c: the compute layer (src/compute) against scalar references
** in double: cdb_sgemm for every transpose combination, cdb_linear on plain
** and packed weights in each precision, at sizes on both sides of the
** vector widths and blocking of the kernels (1, 15, 16, 17, 63, 64, 65, 768),
** row counts on both sides of the bf16/int8 piece size and padding step
** (onednn.c: 256 rows a piece, a last piece padded to a multiple of 32),
** the conversion kernels (convert.h: AVX-512 bit-identical to portable),
** concurrent use of one pack from several threads, and bad calls.
** The backend is the one CLIPDB_GEMM selects; tests/cli/test_compute.py runs
** these tests again under CLIPDB_GEMM=openblas and each ONEDNN_MAX_CPU_ISA.
*/
#include <pthread.h>
#include <stdint.h>

#include "compute/compute.h"
#include "compute/convert.h"
#include "test.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}
static float *rnd_vec(size_t n)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = frand();
    return v;
}

static const int sizes[] = {1, 15, 16, 17, 63, 64, 65};
#define NSIZES ((int)(sizeof sizes / sizeof *sizes))

TEST(compute_sgemm_matches_reference_all_transposes)
{
    for (int si = 0; si < NSIZES; si++)
        for (int sj = 0; sj < NSIZES; sj += 2)
            for (int sk = 0; sk < NSIZES; sk += 3)
                for (int t = 0; t < 4; t++) {
                    const int m = sizes[si], n = sizes[sj], k = sizes[sk];
                    const cdb_trans ta = t & 1 ? CDB_TRANS : CDB_NO_TRANS;
                    const cdb_trans tb = t & 2 ? CDB_TRANS : CDB_NO_TRANS;
                    /* stored shapes: A (m, k) or (k, m); B (k, n) or (n, k); padded rows */
                    const int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 1;
                    float *A = rnd_vec((size_t)(ta ? k : m) * lda);
                    float *B = rnd_vec((size_t)(tb ? n : k) * ldb);
                    float *C = rnd_vec((size_t)m * ldc), *C0 = malloc((size_t)m * ldc * 4);
                    memcpy(C0, C, (size_t)m * ldc * 4);
                    cdb_sgemm(ta, tb, m, n, k, 0.5f, A, lda, B, ldb, 2.0f, C, ldc);
                    for (int i = 0; i < m; i++)
                        for (int j = 0; j < n; j++) {
                            double s = 0, mag = 0;
                            for (int p = 0; p < k; p++) {
                                double a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                                double b = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                                s += a * b;
                                mag += fabs(a * b);
                            }
                            CHECK_NEAR(C[(size_t)i * ldc + j],
                                       0.5 * s + 2.0 * C0[(size_t)i * ldc + j], 1e-5 * (mag + 2));
                        }
                    free(A), free(B), free(C), free(C0);
                }
}

/* The reference of cdb_linear in each precision, from the definitions in
** compute.h (written independently of onednn.c). W (n_out, n_in). */
static double ref_linear(cdb_prec p, const float *W, const float *x, int n_in,
                         int i, int j, double *mag)
{
    double s = 0;
    *mag = 0;
    if (p == CDB_PREC_INT8) {
        const double qmax = cdb_int8_weight_max();
        double ax = 0, aw = 0, sx, sw;
        for (int k = 0; k < n_in; k++) {
            ax = fmax(ax, fabs(x[(size_t)i * n_in + k]));
            aw = fmax(aw, fabs(W[(size_t)j * n_in + k]));
        }
        sx = ax > 0 ? ax / 127.0 : 1.0;
        sw = aw > 0 ? aw / qmax : 1.0;
        for (int k = 0; k < n_in; k++) {
            double qx = nearbyint(x[(size_t)i * n_in + k] / sx);
            double qw = nearbyint(W[(size_t)j * n_in + k] / sw);
            s += qx * qw;
            *mag += fabs(qx * qw);
        }
        *mag = *mag * sx * sw;
        return s * sx * sw;
    }
    for (int k = 0; k < n_in; k++) {
        double a = x[(size_t)i * n_in + k], b = W[(size_t)j * n_in + k];
        if (p == CDB_PREC_BF16) {
            a = cdb_bf16_to_f32(cdb_f32_to_bf16((float)a));
            b = cdb_bf16_to_f32(cdb_f32_to_bf16((float)b));
        }
        s += a * b;
        *mag += fabs(a * b);
    }
    return s;
}

static const int shapes[][2] = {{1, 1}, {15, 17}, {16, 16}, {17, 15}, {64, 63}, {65, 64},
                                {512, 768}};

TEST(compute_linear_packed_each_precision_matches_reference)
{
    for (int prec = CDB_PREC_FP32; prec <= CDB_PREC_INT8; prec++)
        for (size_t sh = 0; sh < sizeof shapes / sizeof *shapes; sh++)
            for (int tw = 0; tw < 2; tw++) {
                const int n_out = shapes[sh][0], n_in = shapes[sh][1];
                float *W = rnd_vec((size_t)n_out * n_in), *Wt = malloc((size_t)n_out * n_in * 4);
                cdb_wpack *pk = NULL;
                cdb_err e = {0};
                /* tw 0: the same weight stored (n_in, n_out) */
                for (int j = 0; j < n_out; j++)
                    for (int k = 0; k < n_in; k++) Wt[(size_t)k * n_out + j] = W[(size_t)j * n_in + k];
                REQUIRE(cdb_wpack_new(&pk, tw ? W : Wt, tw ? CDB_TRANS : CDB_NO_TRANS, n_out, n_in,
                                      (cdb_prec)prec, &e) == CLIPDB_OK);
                if (prec != CDB_PREC_FP32 || cdb_compute_backend() == CDB_BACKEND_ONEDNN)
                    CHECK(pk != NULL);
                for (int si = 0; si < NSIZES; si++) {
                    const int m = sizes[si];
                    float *x, *y, *y0;
                    if ((size_t)n_out * n_in > 10000 && m != 1 && m != 17) continue; /* time */
                    x = rnd_vec((size_t)m * n_in);
                    y = rnd_vec((size_t)m * n_out);
                    y0 = malloc((size_t)m * n_out * 4);
                    memcpy(y0, y, (size_t)m * n_out * 4);
                    for (int beta = 0; beta < 2; beta++) {
                        if (beta) memcpy(y0, y, (size_t)m * n_out * 4);
                        REQUIRE(cdb_linear(pk, W, m, n_out, n_in, x, n_in, (float)beta, y, n_out,
                                           &e) == CLIPDB_OK);
                        for (int i = 0; i < m; i++)
                            for (int j = 0; j < n_out; j++) {
                                double mag, r = ref_linear((cdb_prec)prec, W, x, n_in, i, j,
                                                           &mag);
                                double tol = 1e-5 * (mag + 1);
                                /* int8: x*inv vs x/s may round one code differently */
                                if (prec == CDB_PREC_INT8) tol += 2.0 * mag / (n_in + 1) + 1e-3;
                                CHECK_NEAR(y[(size_t)i * n_out + j],
                                           r + (beta ? y0[(size_t)i * n_out + j] : 0.0), tol);
                            }
                    }
                    free(x), free(y), free(y0);
                }
                cdb_wpack_free(pk);
                free(W), free(Wt);
            }
}

/* Row counts around onednn.c's pieces (PIECE_ROWS 256, PIECE_STEP 32): a
** padded last piece, an exact one, several pieces with and without padding.
** Every precision against the reference, beta 0 and 1. */
TEST(compute_linear_rows_on_both_sides_of_the_piece_size)
{
    static const int rows[] = {31, 32, 33, 255, 256, 257, 289, 513};
    const int n_out = 48, n_in = 40;
    float *W = rnd_vec((size_t)n_out * n_in);
    for (int prec = CDB_PREC_FP32; prec <= CDB_PREC_INT8; prec++) {
        cdb_wpack *pk = NULL;
        cdb_err e = {0};
        REQUIRE(cdb_wpack_new(&pk, W, CDB_TRANS, n_out, n_in, (cdb_prec)prec, &e) == CLIPDB_OK);
        for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++) {
            const int m = rows[ri];
            float *x = rnd_vec((size_t)m * n_in), *y = rnd_vec((size_t)m * n_out);
            float *y0 = malloc((size_t)m * n_out * 4);
            for (int beta = 0; beta < 2; beta++) {
                memcpy(y0, y, (size_t)m * n_out * 4);
                REQUIRE(cdb_linear(pk, W, m, n_out, n_in, x, n_in, (float)beta, y, n_out, &e) ==
                        CLIPDB_OK);
                for (int i = 0; i < m; i++)
                    for (int j = 0; j < n_out; j++) {
                        double mag, r = ref_linear((cdb_prec)prec, W, x, n_in, i, j, &mag);
                        double tol = 1e-5 * (mag + 1);
                        if (prec == CDB_PREC_INT8) tol += 2.0 * mag / (n_in + 1) + 1e-3;
                        CHECK_NEAR(y[(size_t)i * n_out + j],
                                   r + (beta ? y0[(size_t)i * n_out + j] : 0.0), tol);
                    }
            }
            free(x), free(y), free(y0);
        }
        cdb_wpack_free(pk);
    }
    free(W);
}

/* convert.h: the AVX-512 kernels give the portable kernels' bits at lengths
** on both sides of the 16-lane width (masked tails), and the portable ones
** follow the definitions (cdb_f32_to_bf16; x * (1/s) rounded to even). */
TEST(compute_convert_kernels_avx512_equal_portable)
{
    static const size_t lens[] = {1, 15, 16, 17, 31, 32, 33, 512, 768};
    const cdb_convert_kernels *c = cdb_convert_portable(), *v = cdb_convert_avx512();
    const cdb_convert_kernels *best = cdb_convert_best();
    const char *env = getenv("CLIPDB_CONVERT");
    CHECK(best == (v && !(env && !strcmp(env, "portable")) ? v : c));
    CHECK(!strcmp(c->name, "portable"));
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        const size_t n = lens[li], m = 3;
        float *x = rnd_vec(m * n), sx[3], sx2[3];
        int32_t *acc = malloc(m * n * sizeof *acc), *comp = malloc(n * sizeof *comp);
        float *sw = rnd_vec(n), *y = rnd_vec(m * n), *y1 = malloc(m * n * 4), *y2 = malloc(m * n * 4);
        uint16_t *b1 = malloc(m * n * 2), *b2 = malloc(m * n * 2);
        int8_t *q1 = malloc(m * n), *q2 = malloc(m * n);
        for (size_t i = 0; i < m * n; i++) {
            x[i] *= 100.0f;
            acc[i] = (int32_t)(frand() * 1e6f);
        }
        for (size_t j = 0; j < n; j++) comp[j] = (int32_t)(frand() * 1e5f);
        x[0] = NAN;                                  /* kept NaN in bf16 */
        if (n > 1) x[1] = 1.0f + 1.0f / 256;         /* a tie: to even */
        if (n > 2) x[2] = -1e-40f;                   /* a denormal: not flushed */
        c->to_bf16(x, m * n, b1);
        for (size_t i = 0; i < m * n; i++) CHECK(b1[i] == cdb_f32_to_bf16(x[i]));
        x[0] = 3.0f;
        for (size_t i = 0; i < n; i++) x[n + i] = 0.0f; /* a zero row: scale 1, codes 0 */
        c->quantize_rows(x, m, n, 127.0f, 0, q1, sx);
        CHECK(sx[1] == 1.0f);
        for (size_t i = 0; i < m; i++)
            for (size_t j = 0; j < n; j++) {
                CHECK(q1[i * n + j] == (int8_t)lrintf(x[i * n + j] * (1.0f / sx[i])));
                CHECK(abs(q1[i * n + j]) <= 127);
            }
        /* shift: the same codes + 128, as u8 */
        c->quantize_rows(x, m, n, 127.0f, 1, q2, sx2);
        CHECK(!memcmp(sx, sx2, sizeof sx));
        for (size_t i = 0; i < m * n; i++) CHECK((uint8_t)q2[i] == q1[i] + 128);
        /* every epilogue: [y +] (acc - comp)*sx*sw [+ bias], [QuickGELU], in that order */
        for (int ep = 0; ep < 16; ep++) {
            const int add = ep & 1, gelu = ep & 4;
            const float *bias = ep & 2 ? sw : NULL;
            const int32_t *cp = ep & 8 ? comp : NULL;
            memcpy(y1, y, m * n * 4);
            c->dequant_rows(acc, cp, m, n, sx, sw, add, bias, gelu, y1);
            for (size_t i = 0; i < m; i++)
                for (size_t j = 0; j < n; j++) {
                    float r = (float)(acc[i * n + j] - (cp ? cp[j] : 0)) * sx[i] * sw[j];
                    if (add) r = y[i * n + j] + r;
                    if (bias) r = r + bias[j];
                    CHECK(y1[i * n + j] == (gelu ? cdb_quick_gelu1(r) : r));
                }
        }
        if (v) {
            x[0] = NAN;
            c->to_bf16(x, m * n, b1);
            v->to_bf16(x, m * n, b2);
            CHECK(!memcmp(b1, b2, m * n * 2));
            x[0] = 3.0f;
            for (int shift = 0; shift < 2; shift++) {
                c->quantize_rows(x, m, n, 127.0f, shift, q1, sx);
                v->quantize_rows(x, m, n, 127.0f, shift, q2, sx2);
                CHECK(!memcmp(q1, q2, m * n) && !memcmp(sx, sx2, sizeof sx));
            }
            for (int ep = 0; ep < 16; ep++) {
                const float *bias = ep & 2 ? sw : NULL;
                const int32_t *cp = ep & 8 ? comp : NULL;
                memcpy(y1, y, m * n * 4);
                memcpy(y2, y, m * n * 4);
                c->dequant_rows(acc, cp, m, n, sx, sw, ep & 1, bias, ep & 4, y1);
                v->dequant_rows(acc, cp, m, n, sx, sw, ep & 1, bias, ep & 4, y2);
                CHECK(!memcmp(y1, y2, m * n * 4));
            }
        }
        /* the weights' 7-bit codes (no VNNI): qmax 63 */
        x[0] = 3.0f;
        c->quantize_rows(x, m, n, 63.0f, 0, q1, sx);
        for (size_t i = 0; i < m * n; i++) CHECK(abs(q1[i]) <= 63);
        if (v) {
            v->quantize_rows(x, m, n, 63.0f, 0, q2, sx2);
            CHECK(!memcmp(q1, q2, m * n) && !memcmp(sx, sx2, sizeof sx));
        }
        free(x), free(acc), free(comp), free(sw), free(y), free(y1), free(y2), free(b1), free(b2);
        free(q1), free(q2);
    }
}

/* cdb_quick_gelu1 against x * sigmoid(1.702 x) in double, over the range
** where its exp is clamped and beyond; the AVX-512 dequantisation applies
** it with the same bits over that range (as many values as lanes allow). */
TEST(compute_quick_gelu1_matches_its_definition_and_the_avx512_lanes)
{
    const cdb_convert_kernels *c = cdb_convert_portable(), *v = cdb_convert_avx512();
    enum { N = 4099 };
    static float x[N], y1[N], y2[N], one[N], zero[N] = {0};
    static int32_t acc[N];
    for (int i = 0; i < N; i++) {
        x[i] = (float)(i - N / 2) * (120.0f / (N / 2)); /* [-120, 120] */
        const double g = x[i] / (1.0 + exp(-1.702 * x[i]));
        CHECK_NEAR(cdb_quick_gelu1(x[i]), g, 2e-6 * fabs(g) + 1e-9); /* tiny: exp near its clamp */
        one[i] = 1.0f;
        acc[i] = 0;
    }
    CHECK(cdb_quick_gelu1(0.0f) == 0.0f);
    CHECK(isnan(cdb_quick_gelu1(NAN)));
    /* y = gelu(y + 0 * 1 * 1 + 0): the kernels' QuickGELU of x */
    memcpy(y1, x, sizeof x);
    c->dequant_rows(acc, NULL, 1, N, one, one, 1, zero, 1, y1);
    for (int i = 0; i < N; i++) CHECK(y1[i] == cdb_quick_gelu1(x[i]));
    if (v) {
        memcpy(y2, x, sizeof x);
        v->dequant_rows(acc, NULL, 1, N, one, one, 1, zero, 1, y2);
        CHECK(!memcmp(y1, y2, sizeof y1));
    }
}

/* The AVX-512 QuickGELU (its clamps as min/max, its floor as one rounding)
** gives cdb_quick_gelu1's bits for floats of every exponent, sign and
** special value: 2^32 / 4099 bit patterns and the clamps' neighbours, through
** the int8 MLP's own case (u8 compensation, bias, QuickGELU: the pattern is
** the bias, 0 * 1 * 1 + x = x) and the generic one (y + 0, QuickGELU). */
TEST(compute_quick_gelu_avx512_equals_portable_on_all_exponents)
{
    const cdb_convert_kernels *c = cdb_convert_portable(), *v = cdb_convert_avx512();
    enum { N = 1048576 + 64 };
    float *x, *y1, *y2, *one;
    int32_t *zero;
    size_t n = 0, bad = 0;
    if (!v) SKIP("no AVX-512 on this CPU: the portable kernels are the only ones");
    x = malloc(N * sizeof *x), y1 = malloc(N * sizeof *y1), y2 = malloc(N * sizeof *y2);
    one = malloc(N * sizeof *one), zero = calloc(N, sizeof *zero);
    CHECK(x && y1 && y2 && one && zero);
    if (!x || !y1 || !y2 || !one || !zero) goto cleanup;
    for (uint64_t u = 0; u < (1ull << 32) && n < N - 64; u += 4099) {
        uint32_t b = (uint32_t)u;
        memcpy(&x[n++], &b, 4);
    }
    {
        static const float edges[] = {88.3762626647949f, 87.3f, 51.9f, 51.92f, 0.5f, 1e-30f, 0.0f};
        for (size_t i = 0; i < sizeof edges / sizeof *edges; i++)
            for (int s = -1; s <= 1; s += 2) {
                const float e = edges[i] / -1.702f * (float)s; /* exp's input is -1.702 x */
                x[n++] = e, x[n++] = nextafterf(e, INFINITY), x[n++] = nextafterf(e, -INFINITY);
            }
    }
    for (size_t i = 0; i < n; i++) one[i] = 1.0f;
    for (int path = 0; path < 2; path++) {
        if (path == 0) { /* comp, bias, QuickGELU */
            c->dequant_rows(zero, zero, 1, n, one, one, 0, x, 1, y1);
            v->dequant_rows(zero, zero, 1, n, one, one, 0, x, 1, y2);
        } else { /* y + 0, QuickGELU */
            memcpy(y1, x, n * 4), memcpy(y2, x, n * 4);
            c->dequant_rows(zero, NULL, 1, n, one, one, 1, NULL, 1, y1);
            v->dequant_rows(zero, NULL, 1, n, one, one, 1, NULL, 1, y2);
        }
        for (size_t i = 0; i < n; i++)
            if (isnan(x[i]) ? !(isnan(y1[i]) && isnan(y2[i])) : memcmp(&y1[i], &y2[i], 4)) bad++;
    }
    CHECK(n > 1000000);
    CHECK(bad == 0);
cleanup:
    free(x), free(y1), free(y2), free(one), free(zero);
}

/* cdb_linear_ep: a bias and QuickGELU in the product's own pass on bf16 and
** int8 packs (oneDNN's epilogue, the dequantisation) against the reference
** with the bias and activation applied after, at row counts on both sides
** of the pieces; fp32 packs and NULL do not fuse and refuse an epilogue. */
TEST(compute_linear_ep_applies_bias_and_quick_gelu)
{
    static const int rows[] = {1, 31, 33, 257};
    const int n_out = 48, n_in = 40;
    float *W = rnd_vec((size_t)n_out * n_in), *bias = rnd_vec(n_out);
    cdb_err e = {0};
    CHECK(cdb_linear_fuses(NULL) == 0);
    for (int prec = CDB_PREC_FP32; prec <= CDB_PREC_INT8; prec++) {
        cdb_wpack *pk = NULL;
        REQUIRE(cdb_wpack_new(&pk, W, CDB_TRANS, n_out, n_in, (cdb_prec)prec, &e) == CLIPDB_OK);
        if (!cdb_linear_fuses(pk)) {
            float x[40] = {0}, y[48];
            CHECK(prec != CDB_PREC_INT8); /* int8 always fuses */
            CHECK(cdb_linear_ep(pk, 1, n_out, n_in, x, 0.0f, y, bias, CDB_ACT_NONE, &e) ==
                  CLIPDB_EINVAL);
            cdb_wpack_free(pk);
            continue;
        }
        for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++) {
            const int m = rows[ri];
            float *x = rnd_vec((size_t)m * n_in), *y = rnd_vec((size_t)m * n_out);
            float *y0 = malloc((size_t)m * n_out * 4);
            for (int mode = 0; mode < 3; mode++) { /* bias+gelu; bias, beta 1; gelu only */
                const float beta = mode == 1 ? 1.0f : 0.0f;
                const float *b = mode == 2 ? NULL : bias;
                const cdb_act act = mode == 1 ? CDB_ACT_NONE : CDB_ACT_QUICK_GELU;
                memcpy(y0, y, (size_t)m * n_out * 4);
                REQUIRE(cdb_linear_ep(pk, m, n_out, n_in, x, beta, y, b, act, &e) == CLIPDB_OK);
                for (int i = 0; i < m; i++)
                    for (int j = 0; j < n_out; j++) {
                        double mag, r = ref_linear((cdb_prec)prec, W, x, n_in, i, j, &mag);
                        double tol = 1e-5 * (mag + 1);
                        if (prec == CDB_PREC_INT8) tol += 2.0 * mag / (n_in + 1) + 1e-3;
                        if (b) r += b[j];
                        if (act == CDB_ACT_QUICK_GELU) r = r / (1.0 + exp(-1.702 * r));
                        if (beta != 0.0f) r += y0[(size_t)i * n_out + j];
                        CHECK_NEAR(y[(size_t)i * n_out + j], r, tol + 1e-4);
                    }
            }
            free(x), free(y), free(y0);
        }
        /* an activation with beta 1 is refused */
        {
            float x[40] = {0}, y[48] = {0};
            CHECK(cdb_linear_ep(pk, 1, n_out, n_in, x, 1.0f, y, NULL, CDB_ACT_QUICK_GELU, &e) ==
                  CLIPDB_EINVAL);
        }
        cdb_wpack_free(pk);
    }
    CHECK(cdb_linear_ep(NULL, 1, n_out, n_in, W, 0.0f, W, NULL, CDB_ACT_NONE, &e) ==
          CLIPDB_EINVAL);
    free(W), free(bias);
}

/* cdb_mlp_ep: the two layers of an MLP in one call give the bits of the
** two cdb_linear_ep calls (bias + QuickGELU, then bias and beta 1), on bf16
** and int8 packs, at row counts on both sides of the pieces and of the
** threaded passes; other pairings are refused. */
TEST(compute_mlp_ep_equals_two_linear_ep)
{
    static const int rows[] = {1, 31, 33, 255, 256, 257, 513};
    const int d = 64, f = 256;
    float *W1 = rnd_vec((size_t)f * d), *W2 = rnd_vec((size_t)d * f);
    float *b1 = rnd_vec(f), *b2 = rnd_vec(d);
    cdb_err e = {0};
    for (int prec = CDB_PREC_FP32; prec <= CDB_PREC_INT8; prec++) {
        cdb_wpack *p1 = NULL, *p2 = NULL;
        REQUIRE(cdb_wpack_new(&p1, W1, CDB_TRANS, f, d, (cdb_prec)prec, &e) == CLIPDB_OK);
        REQUIRE(cdb_wpack_new(&p2, W2, CDB_TRANS, d, f, (cdb_prec)prec, &e) == CLIPDB_OK);
        if (!cdb_linear_fuses(p1)) {
            float h[64] = {0}, x[64] = {0};
            CHECK(cdb_mlp_ep(p1, p2, 1, d, f, h, b1, b2, x, &e) == CLIPDB_EINVAL);
        } else {
            for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++) {
                const int m = rows[ri];
                float *h = rnd_vec((size_t)m * d), *x = rnd_vec((size_t)m * d);
                float *x0 = malloc((size_t)m * d * 4), *mid = malloc((size_t)m * f * 4);
                memcpy(x0, x, (size_t)m * d * 4);
                REQUIRE(cdb_linear_ep(p1, m, f, d, h, 0.0f, mid, b1, CDB_ACT_QUICK_GELU, &e) ==
                        CLIPDB_OK);
                REQUIRE(cdb_linear_ep(p2, m, d, f, mid, 1.0f, x0, b2, CDB_ACT_NONE, &e) ==
                        CLIPDB_OK);
                REQUIRE(cdb_mlp_ep(p1, p2, m, d, f, h, b1, b2, x, &e) == CLIPDB_OK);
                if (memcmp(x, x0, (size_t)m * d * 4)) {
                    char msg[96];
                    snprintf(msg, sizeof msg, "precision %d, %d rows: not the two layers' bits",
                             prec, m);
                    test_fail_at(__FILE__, __LINE__, msg);
                }
                free(h), free(x), free(x0), free(mid);
            }
            /* the packs the other way round, or one of them twice: refused */
            {
                float h[64] = {0}, x[64] = {0};
                CHECK(cdb_mlp_ep(p2, p1, 1, d, f, h, b1, b2, x, &e) == CLIPDB_EINVAL);
                CHECK(cdb_mlp_ep(p1, p1, 1, d, f, h, b1, b2, x, &e) == CLIPDB_EINVAL);
            }
        }
        cdb_wpack_free(p1);
        cdb_wpack_free(p2);
    }
    {
        float h[64] = {0}, x[64] = {0};
        CHECK(cdb_mlp_ep(NULL, NULL, 1, d, f, h, b1, b2, x, &e) == CLIPDB_EINVAL);
    }
    free(W1), free(W2), free(b1), free(b2);
}

TEST(compute_linear_plain_weight_with_strides)
{
    /* the training path: plain fp32 W, x and y inside wider rows */
    const int m = 17, n_out = 16, n_in = 15, ldx = 20, ldy = 48;
    float *W = rnd_vec((size_t)n_out * n_in), *x = rnd_vec((size_t)m * ldx);
    float *y = rnd_vec((size_t)m * ldy), *y0 = malloc((size_t)m * ldy * 4);
    cdb_err e = {0};
    memcpy(y0, y, (size_t)m * ldy * 4);
    REQUIRE(cdb_linear(NULL, W, m, n_out, n_in, x, ldx, 1.0f, y, ldy, &e) == CLIPDB_OK);
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < n_out; j++) {
            double s = y0[(size_t)i * ldy + j];
            for (int k = 0; k < n_in; k++) s += (double)x[(size_t)i * ldx + k] * W[(size_t)j * n_in + k];
            CHECK_NEAR(y[(size_t)i * ldy + j], s, 1e-4);
        }
        for (int j = n_out; j < ldy; j++) CHECK(y[(size_t)i * ldy + j] == y0[(size_t)i * ldy + j]);
    }
    free(W), free(x), free(y), free(y0);
}

TEST(compute_linear_rejects_bad_calls)
{
    float *W = rnd_vec(16 * 16), x[16 * 2] = {0}, y[16 * 2];
    cdb_wpack *pk = NULL;
    cdb_err e = {0};
    CHECK(cdb_wpack_new(&pk, NULL, CDB_TRANS, 16, 16, CDB_PREC_BF16, &e) == CLIPDB_EINVAL);
    CHECK(pk == NULL);
    CHECK(cdb_wpack_new(&pk, W, CDB_TRANS, 0, 16, CDB_PREC_BF16, &e) == CLIPDB_EINVAL);
    REQUIRE(cdb_wpack_new(&pk, W, CDB_TRANS, 16, 16, CDB_PREC_BF16, &e) == CLIPDB_OK);
    /* a pack called with another shape, strides or beta is refused, not misread */
    CHECK(cdb_linear(pk, W, 2, 8, 16, x, 16, 0.0f, y, 8, &e) == CLIPDB_EINVAL);
    CHECK(strstr(e.msg, "pack") != NULL);
    CHECK(cdb_linear(pk, W, 2, 16, 16, x, 17, 0.0f, y, 16, &e) == CLIPDB_EINVAL);
    CHECK(cdb_linear(pk, W, 2, 16, 16, x, 16, 0.5f, y, 16, &e) == CLIPDB_EINVAL);
    CHECK(cdb_linear(pk, W, 0, 16, 16, x, 16, 0.0f, y, 16, &e) == CLIPDB_OK); /* nothing to do */
    CHECK(cdb_wpack_bytes(pk) >= 16 * 16 * 2);
    cdb_wpack_free(pk);
    cdb_wpack_free(NULL);
    free(W);
}

typedef struct lin_job {
    const cdb_wpack *pk;
    const float *x;
    float *y;
    int m, n_out, n_in, rc;
} lin_job;

static void *lin_run(void *arg)
{
    lin_job *j = arg;
    cdb_err e = {0};
    for (int r = 0; r < 20 && !j->rc; r++)
        j->rc = cdb_linear(j->pk, NULL, j->m, j->n_out, j->n_in, j->x, j->n_in, 0.0f, j->y,
                           j->n_out, &e);
    return NULL;
}

TEST(compute_one_pack_used_by_four_threads_gives_the_serial_results)
{
    const int m = 33, n_out = 96, n_in = 64;
    float *W = rnd_vec((size_t)n_out * n_in);
    for (int prec = CDB_PREC_FP32; prec <= CDB_PREC_INT8; prec++) {
        cdb_wpack *pk = NULL;
        cdb_err e = {0};
        lin_job jobs[4];
        pthread_t th[4];
        float *serial = malloc((size_t)4 * m * n_out * 4);
        if (cdb_wpack_new(&pk, W, CDB_TRANS, n_out, n_in, (cdb_prec)prec, &e) != CLIPDB_OK || !pk) {
            cdb_wpack_free(pk);
            free(serial);
            continue; /* fp32 on OpenBLAS has no pack */
        }
        for (int t = 0; t < 4; t++) {
            jobs[t] = (lin_job){pk, rnd_vec((size_t)m * n_in), malloc((size_t)m * n_out * 4), m,
                                n_out, n_in, 0};
            REQUIRE(cdb_linear(pk, NULL, m, n_out, n_in, jobs[t].x, n_in, 0.0f,
                               serial + (size_t)t * m * n_out, n_out, &e) == CLIPDB_OK);
        }
        for (int t = 0; t < 4; t++) REQUIRE(pthread_create(&th[t], NULL, lin_run, &jobs[t]) == 0);
        for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
        for (int t = 0; t < 4; t++) {
            CHECK(jobs[t].rc == CLIPDB_OK);
            CHECK(!memcmp(jobs[t].y, serial + (size_t)t * m * n_out, (size_t)m * n_out * 4));
            free((void *)jobs[t].x), free(jobs[t].y);
        }
        free(serial);
        cdb_wpack_free(pk);
    }
    free(W);
}

TEST(compute_bf16_rounding_is_nearest_even)
{
    /* 1 + 2^-8 is halfway between two bf16 values: rounds to even (1.0) */
    CHECK(cdb_bf16_to_f32(cdb_f32_to_bf16(1.0f + 1.0f / 256)) == 1.0f);
    CHECK(cdb_bf16_to_f32(cdb_f32_to_bf16(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);
    CHECK(cdb_bf16_to_f32(cdb_f32_to_bf16(-2.5f)) == -2.5f);
    CHECK(isnan(cdb_bf16_to_f32(cdb_f32_to_bf16(NAN))));
    CHECK(isinf(cdb_bf16_to_f32(cdb_f32_to_bf16(INFINITY))));
}

TEST(compute_describe_names_the_backend_in_use)
{
    const char *env = getenv("CLIPDB_GEMM"), *d = cdb_compute_describe();
    if (env && !strcmp(env, "openblas")) {
        CHECK(cdb_compute_backend() == CDB_BACKEND_OPENBLAS);
        CHECK(!strncmp(d, "openblas ", 9));
    } else {
        CHECK(cdb_compute_backend() == CDB_BACKEND_ONEDNN);
        CHECK(!strncmp(d, "onednn ", 7));
        CHECK(!strcmp(d + 7, cdb_onednn_isa()));
    }
    CHECK(cdb_compute_threads() >= 1);
}

/* cdb_sgemm_bf16 against a double reference on the bf16-rounded inputs: the
** products of bf16 numbers are exact in fp32, so only the fp32 summation
** differs (relative 1e-5 of sum |a b|); and against the unrounded fp32
** answer, it is off by the rounding (bf16 has 8 significant bits). Every
** transpose, padded strides, alpha/beta, sizes on both sides of 16 and 64. */
TEST(compute_sgemm_bf16_matches_rounded_reference_all_transposes)
{
    static const float betas[] = {0.0f, 1.0f, 0.5f};
    double worst_fp32 = 0.0;
    for (int si = 0; si < NSIZES; si++)
        for (int sj = 1; sj < NSIZES; sj += 2)
            for (int sk = 0; sk < NSIZES; sk += 2)
                for (int t = 0; t < 4; t++) {
                    const int m = sizes[si], n = sizes[sj], k = sizes[sk];
                    const cdb_trans ta = t & 1 ? CDB_TRANS : CDB_NO_TRANS;
                    const cdb_trans tb = t & 2 ? CDB_TRANS : CDB_NO_TRANS;
                    const int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 1;
                    const float alpha = (t == 3) ? 2.0f : 1.0f, beta = betas[(si + sk) % 3];
                    float *A = rnd_vec((size_t)(ta ? k : m) * lda);
                    float *B = rnd_vec((size_t)(tb ? n : k) * ldb);
                    float *C = rnd_vec((size_t)m * ldc), *C0 = malloc((size_t)m * ldc * 4);
                    cdb_err e;
                    cdb_err_clear(&e);
                    memcpy(C0, C, (size_t)m * ldc * 4);
                    REQUIRE(cdb_sgemm_bf16(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc,
                                           &e) == CLIPDB_OK);
                    for (int i = 0; i < m; i++)
                        for (int j = 0; j < n; j++) {
                            double s = 0, s32 = 0, mag = 0;
                            for (int p = 0; p < k; p++) {
                                float a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                                float b = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                                double ar = cdb_bf16_to_f32(cdb_f32_to_bf16(a));
                                double br = cdb_bf16_to_f32(cdb_f32_to_bf16(b));
                                s += ar * br;
                                s32 += (double)a * b;
                                mag += fabs(ar * br);
                            }
                            const double want = alpha * s + beta * C0[(size_t)i * ldc + j];
                            const double got = C[(size_t)i * ldc + j];
                            CHECK_NEAR(got, want, 1e-5 * (alpha * mag + 1));
                            /* vs fp32: each product is off by < 2^-8 relative */
                            CHECK_NEAR(got, alpha * s32 + beta * C0[(size_t)i * ldc + j],
                                       alpha * mag / 128.0 + 1e-5);
                            if (mag > 0)
                                worst_fp32 = fmax(worst_fp32, fabs(got - alpha * s32 -
                                                                   beta * C0[(size_t)i * ldc + j]) /
                                                                  (alpha * mag));
                        }
                    free(A), free(B), free(C), free(C0);
                }
    /* the rounding is really there (a bf16 path that summed fp32 inputs would be closer) */
    CHECK(worst_fp32 > 1e-4);
}

/* cdb_gemm_bf16_ops: either operand given as bf16 already, in strided
** storage (a column window of a wider matrix, as the ResNet's im2col
** chunks), against the same rounded-operand reference as cdb_sgemm_bf16
** and against cdb_sgemm_bf16 on the fp32 values the bf16 ones round from;
** every transpose, sizes on both sides of the vector widths. Where bf16 is
** emulated the call is not made (it is only for native bf16). */
TEST(compute_gemm_bf16_ops_strided_bf16_operands)
{
    if (!cdb_gemm_bf16_native()) SKIP("bf16 is emulated on this ISA");
    for (int si = 0; si < NSIZES; si += 2)
        for (int sj = 1; sj < NSIZES; sj += 2)
            for (int sk = 0; sk < NSIZES; sk += 3)
                for (int t = 0; t < 8; t++) {
                    const int m = sizes[si], n = sizes[sj], k = sizes[sk];
                    const cdb_trans ta = t & 1 ? CDB_TRANS : CDB_NO_TRANS;
                    const cdb_trans tb = t & 2 ? CDB_TRANS : CDB_NO_TRANS;
                    const int a16 = t & 4, b16 = !(t & 4) || (t & 1);
                    const int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
                    const int lda = ac + 5, ldb = bc + 7, ldc = n + 1;
                    float *A = rnd_vec((size_t)ar * lda), *B = rnd_vec((size_t)br * ldb);
                    float *C = rnd_vec((size_t)m * ldc), *C0 = malloc((size_t)m * ldc * 4);
                    float *C1 = malloc((size_t)m * ldc * 4);
                    uint16_t *Ah = malloc((size_t)ar * lda * 2), *Bh = malloc((size_t)br * ldb * 2);
                    const float beta = (si + sk) % 2 ? 1.0f : 0.0f;
                    cdb_err e;
                    cdb_err_clear(&e);
                    for (size_t i = 0; i < (size_t)ar * lda; i++) Ah[i] = cdb_f32_to_bf16(A[i]);
                    for (size_t i = 0; i < (size_t)br * ldb; i++) Bh[i] = cdb_f32_to_bf16(B[i]);
                    memcpy(C0, C, (size_t)m * ldc * 4);
                    memcpy(C1, C, (size_t)m * ldc * 4);
                    REQUIRE(cdb_gemm_bf16_ops(ta, tb, m, n, k, 1.0f, a16 ? NULL : A,
                                              a16 ? Ah : NULL, lda, b16 ? NULL : B,
                                              b16 ? Bh : NULL, ldb, beta, C, ldc,
                                              &e) == CLIPDB_OK);
                    REQUIRE(cdb_sgemm_bf16(ta, tb, m, n, k, 1.0f, A, lda, B, ldb, beta, C1, ldc,
                                           &e) == CLIPDB_OK);
                    for (int i = 0; i < m; i++)
                        for (int j = 0; j < n; j++) {
                            double s = 0, mag = 0;
                            for (int p = 0; p < k; p++) {
                                const size_t ia = ta ? (size_t)p * lda + i : (size_t)i * lda + p;
                                const size_t ib = tb ? (size_t)j * ldb + p : (size_t)p * ldb + j;
                                const double x = (double)cdb_bf16_to_f32(Ah[ia]) *
                                                 cdb_bf16_to_f32(Bh[ib]);
                                s += x;
                                mag += fabs(x);
                            }
                            const double want = s + beta * C0[(size_t)i * ldc + j];
                            CHECK_NEAR(C[(size_t)i * ldc + j], want, 1e-5 * (mag + 1));
                            CHECK_NEAR(C[(size_t)i * ldc + j], C1[(size_t)i * ldc + j],
                                       1e-5 * (mag + 1));
                        }
                    free(A), free(B), free(C), free(C0), free(C1), free(Ah), free(Bh);
                }
    {   /* refusals: no operand, k 0 */
        float x[4] = {0}, c[4] = {0};
        cdb_err e;
        cdb_err_clear(&e);
        CHECK(cdb_gemm_bf16_ops(CDB_NO_TRANS, CDB_NO_TRANS, 2, 2, 2, 1.0f, NULL, NULL, 2, x, NULL,
                                2, 0.0f, c, 2, &e) == CLIPDB_EINVAL);
        CHECK(cdb_gemm_bf16_ops(CDB_NO_TRANS, CDB_NO_TRANS, 2, 2, 0, 1.0f, x, NULL, 2, x, NULL,
                                2, 0.0f, c, 2, &e) == CLIPDB_EINVAL);
    }
}

typedef struct bf16_job {
    const float *A, *B;
    float *C;
    int m, n, k, failed;
} bf16_job;

static void bf16_task(void *arg, size_t r)
{
    bf16_job *j = arg;
    cdb_err e;
    cdb_err_clear(&e);
    if (cdb_sgemm_bf16(CDB_NO_TRANS, CDB_NO_TRANS, j->m, j->n, j->k, 1.0f, j->A, j->k, j->B, j->n,
                       0.0f, j->C + r * j->m * j->n, j->n, &e))
        j->failed = 1;
}

TEST(compute_sgemm_bf16_concurrent_calls_agree)
{
    /* one cached primitive run by the caller and the pool's workers at once */
    enum { M = 65, N = 64, K = 63, R = 8 };
    float *A = rnd_vec((size_t)M * K), *B = rnd_vec((size_t)K * N);
    float *C = calloc((size_t)R * M * N, sizeof *C);
    bf16_job j = {A, B, C, M, N, K, 0};
    cdb_pool_run(R, bf16_task, &j);
    CHECK(!j.failed);
    for (int r = 1; r < R; r++) CHECK(!memcmp(C, C + (size_t)r * M * N, (size_t)M * N * 4));
    CHECK(cdb_gemm_bf16_native() == 0 || cdb_gemm_bf16_native() == 1);
    free(A), free(B), free(C);
}

/* cdb_gemm_u8s8s32 (the sq8 copies' batched scores; a cached oneDNN matmul,
** AMX where the CPU has it): exact integers against a reference, every
** shape of the size list and the copies' own (256 rows of 512 against 16
** and 256 queries), each twice (the second call runs the cached primitive),
** B within cdb_int8_weight_max() as the callers keep it. */
TEST(compute_gemm_u8s8s32_exact_and_cached)
{
    static const int ks[] = {1, 63, 64, 65, 512};
    const int wmax = cdb_int8_weight_max();
    for (int si = 0; si < NSIZES + 1; si++)
        for (int sj = 0; sj < NSIZES + 2; sj++)
            for (int sk = 0; sk < 5; sk++) {
                const int m = si < NSIZES ? sizes[si] : 256;
                const int n = sj < NSIZES ? sizes[sj] : sj == NSIZES ? 16 : 256, k = ks[sk];
                uint8_t *A = malloc((size_t)m * k);
                int8_t *B = malloc((size_t)n * k);
                int32_t *C = malloc((size_t)m * n * 4), *C2 = malloc((size_t)m * n * 4);
                cdb_err e;
                int bad = 0;
                cdb_err_clear(&e);
                for (size_t i = 0; i < (size_t)m * k; i++) A[i] = (uint8_t)(128 + 127.99f * frand());
                for (size_t i = 0; i < (size_t)n * k; i++)
                    B[i] = (int8_t)((float)wmax * frand());
                REQUIRE(cdb_gemm_u8s8s32(m, n, k, A, B, C, &e) == CLIPDB_OK);
                REQUIRE(cdb_gemm_u8s8s32(m, n, k, A, B, C2, &e) == CLIPDB_OK);
                for (int i = 0; i < m; i++)
                    for (int j = 0; j < n; j++) {
                        int64_t want = 0;
                        for (int p = 0; p < k; p++)
                            want += (int64_t)A[(size_t)i * k + p] * B[(size_t)j * k + p];
                        bad += C[(size_t)i * n + j] != want || C2[(size_t)i * n + j] != want;
                    }
                if (bad) {
                    char msg[128];
                    snprintf(msg, sizeof msg, "u8s8s32 (%d, %d, %d): %d entries off", m, n, k,
                             bad);
                    test_fail_at(__FILE__, __LINE__, msg);
                }
                free(A), free(B), free(C), free(C2);
            }
}

/* onednn.c splits the activations' bf16 rounding and int8 (de)quantisation
** over the OpenMP threads from 65536 elements (PAR_MIN_ELEMS): row counts on
** both sides of it (255, 256, 257 rows of 256) and several pieces (513) give
** the bits of the same call on one thread. */
TEST(compute_linear_threaded_passes_equal_one_thread)
{
    static const int rows[] = {1, 255, 256, 257, 513};
    const int n_out = 256, n_in = 256;
    float *W = rnd_vec((size_t)n_out * n_in);
    for (int prec = CDB_PREC_BF16; prec <= CDB_PREC_INT8; prec++) {
        cdb_wpack *pk = NULL;
        cdb_err e = {0};
        REQUIRE(cdb_wpack_new(&pk, W, CDB_TRANS, n_out, n_in, (cdb_prec)prec, &e) == CLIPDB_OK);
        for (size_t ri = 0; ri < sizeof rows / sizeof *rows; ri++) {
            const int m = rows[ri];
            const size_t ny = (size_t)m * n_out;
            float *x = rnd_vec((size_t)m * n_in), *y = rnd_vec(ny), *y1 = malloc(ny * 4);
            int saved;
            memcpy(y1, y, ny * 4);
            REQUIRE(cdb_linear(pk, W, m, n_out, n_in, x, n_in, 1.0f, y, n_out, &e) == CLIPDB_OK);
            saved = cdb_compute_serial_enter();
            REQUIRE(cdb_linear(pk, W, m, n_out, n_in, x, n_in, 1.0f, y1, n_out, &e) == CLIPDB_OK);
            cdb_compute_serial_leave(saved);
            CHECK(!memcmp(y, y1, ny * 4));
            free(x), free(y), free(y1);
        }
        cdb_wpack_free(pk);
    }
    free(W);
}
