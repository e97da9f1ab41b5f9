/*
** convert.c: the conversions around bf16 and int8 linear layers (convert.h),
** portable C and AVX-512, with the choice made once from the CPU's features.
**
** The AVX-512 versions do exactly the portable arithmetic 16 lanes at a time
** (same operations in the same order, tails through masked loads and
** stores; QuickGELU's clamps and floor by instructions that give the same
** values), so both give the same bits: bf16 rounding by the integer
** round-to-nearest-even trick (not vcvtneps2bf16, which flushes denormals),
** quantisation by one multiply with 1/sx and vcvtps2dq (nearest even, as
** lrintf in the default rounding mode) with signed saturation to int8.
*/
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "compute/convert.h"
#include "compute/vexp.h"

/* ---- portable --------------------------------------------------------------- */

static void to_bf16_c(const float *x, size_t n, uint16_t *out)
{
    size_t i;
    for (i = 0; i < n; i++) out[i] = cdb_f32_to_bf16(x[i]);
}

static void quantize_rows_c(const float *x, size_t m, size_t k, float qmax, int shift, int8_t *q,
                            float *sx)
{
    size_t i, j;
    for (i = 0; i < m; i++) {
        const float *xr = x + i * k; /* (k) */
        int8_t *qr = q + i * k;
        float amax = 0.0f, inv;
        for (j = 0; j < k; j++) {
            const float a = fabsf(xr[j]);
            amax = a > amax ? a : amax;
        }
        sx[i] = amax > 0.0f ? amax / qmax : 1.0f;
        inv = 1.0f / sx[i];
        for (j = 0; j < k; j++) {
            long v = lrintf(xr[j] * inv);
            v = v > 127 ? 127 : v < -128 ? -128 : v;
            qr[j] = shift ? (int8_t)(uint8_t)(v + 128) : (int8_t)v;
        }
    }
}

/* QuickGELU on one lane: the vector code of vexp.h at width 1 */
typedef float v1f __attribute__((vector_size(4)));
typedef int32_t v1i __attribute__((vector_size(4)));
CDB_DEFINE_VEXP(, exp1, v1f, v1i)
CDB_DEFINE_VQUICK_GELU(, quick_gelu_v1, v1f, exp1)

float cdb_quick_gelu1(float x)
{
    v1f v = {x};
    if (x != x) return x / (1.0f + x * -1.702f); /* NaN, without a float-to-int conversion */
    return quick_gelu_v1(v)[0];
}

static void dequant_rows_c(const int32_t *acc, const int32_t *comp, size_t m, size_t n,
                           const float *sx, const float *sw, int add, const float *bias, int gelu,
                           float *y)
{
    size_t i, j;
    for (i = 0; i < m; i++) {
        const int32_t *ar = acc + i * n; /* (n) */
        float *yr = y + i * n;
        const float s = sx[i];
        for (j = 0; j < n; j++) {
            float v = (float)(comp ? ar[j] - comp[j] : ar[j]) * s * sw[j];
            if (add) v = yr[j] + v;
            if (bias) v = v + bias[j];
            yr[j] = gelu ? cdb_quick_gelu1(v) : v;
        }
    }
}

static const cdb_convert_kernels portable = {"portable", to_bf16_c, quantize_rows_c,
                                             dequant_rows_c};

const cdb_convert_kernels *cdb_convert_portable(void)
{
    return &portable;
}

/* ---- AVX-512 (F + BW + VL) --------------------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* Mask of the first r (< 16) lanes, or all 16. */
AVX512 static inline __mmask16 lanes(size_t r)
{
    return r >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << r) - 1u);
}

/* 16 floats -> their bf16 bits in the low half of each 32-bit lane:
** round (u + 0x7fff + ((u >> 16) & 1)) >> 16; NaN: (u >> 16) | 0x40 */
AVX512 static inline __m512i bf16_bits(__m512i u)
{
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    __m512i r = _mm512_add_epi32(u, half);
    r = _mm512_add_epi32(r, _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, absm), inf);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
}

/* 32 floats at a time, packed into one 64-byte store (vpackusdw: the lanes
** are < 65536, so the unsigned saturation keeps them; then the 64-bit
** halves put back in order). A masked narrowing store (vpmovdw to memory)
** per 16 lanes was measured slower: on Zen 5 most of this pass's samples sat
** behind it. The tail goes 16 lanes at a time, masked. */
AVX512 static void to_bf16_avx512(const float *x, size_t n, uint16_t *out)
{
    const __m512i order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
    size_t i;
    for (i = 0; i + 32 <= n; i += 32) {
        const __m512i a = bf16_bits(_mm512_castps_si512(_mm512_loadu_ps(x + i)));
        const __m512i b = bf16_bits(_mm512_castps_si512(_mm512_loadu_ps(x + i + 16)));
        _mm512_storeu_si512(out + i, _mm512_permutexvar_epi64(order, _mm512_packus_epi32(a, b)));
    }
    for (; i < n; i += 16) {
        const __mmask16 k = lanes(n - i);
        const __m512i r = bf16_bits(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, x + i)));
        _mm256_mask_storeu_epi16(out + i, k, _mm512_cvtepi32_epi16(r));
    }
}

AVX512 static void quantize_rows_avx512(const float *x, size_t m, size_t k, float qmax,
                                        int shift, int8_t *q, float *sx)
{
    size_t i, j;
    for (i = 0; i < m; i++) {
        const float *xr = x + i * k; /* (k) */
        int8_t *qr = q + i * k;
        __m512 vmax = _mm512_setzero_ps(), vinv;
        float amax, inv;
        for (j = 0; j < k; j += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes(k - j), xr + j)));
        amax = _mm512_reduce_max_ps(vmax);
        sx[i] = amax > 0.0f ? amax / qmax : 1.0f;
        inv = 1.0f / sx[i];
        vinv = _mm512_set1_ps(inv);
        for (j = 0; j < k; j += 16) {
            const __mmask16 msk = lanes(k - j);
            const __m512i v =
                _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(msk, xr + j), vinv));
            if (shift) /* saturate to s8, then + 128 (bits ^ 0x80) */
                _mm_mask_storeu_epi8(qr + j, msk,
                                     _mm_xor_si128(_mm512_cvtsepi32_epi8(v), _mm_set1_epi8(-128)));
            else
                _mm512_mask_cvtsepi32_storeu_epi8(qr + j, msk, v);
        }
    }
}

/* cdb_quick_gelu1 on 16 lanes: vexp.h's exp written with the instructions
** AVX-512 has for its steps, the same bits for every number: the clamps as
** vminps/vmaxps (vexp.h compares and selects), the floor of x / ln 2 + 0.5
** as one vrndscaleps (vexp.h truncates through int32 and corrects by 1: the
** same value for |x| < 2^31, and here |x| <= 128), then the same polynomial
** and power of two in the same order, unfused (convert.o is built with
** -ffp-contract=off). A NaN lane gives NaN: vexp.h's result for it is then
** divided into the NaN itself. 6 vector operations fewer than gcc makes of
** the generic code (the clamps 2 instead of 4, the floor 1 instead of 5);
** the MLP's first int8 layer runs it on every output. */
AVX512 static inline __m512 exp16(__m512 x)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 fx, z, y;
    __m512i n;
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f));
    fx = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                       _mm512_set1_ps(0.5f));
    fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(fx, _mm512_set1_ps(0.693359375f))),
                      _mm512_mul_ps(fx, _mm512_set1_ps(-2.12194440e-4f)));
    z = _mm512_mul_ps(x, x);
    y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(y, z), x), one);
    n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(n));
}

AVX512 static inline __m512 quick_gelu16(__m512 x)
{
    return _mm512_div_ps(
        x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_mul_ps(x, _mm512_set1_ps(-1.702f)))));
}

/* One row's epilogue, 16 lanes at a time; always_inline with constant
** flags, so that each caller below is a loop without tests. */
__attribute__((always_inline)) AVX512 static inline void
dequant_row16(const int32_t *ar, const int32_t *comp, size_t n, __m512 s, const float *sw,
              int add, const float *bias, int gelu, float *yr)
{
    size_t j;
    for (j = 0; j < n; j += 16) {
        const __mmask16 k = lanes(n - j);
        __m512i a = _mm512_maskz_loadu_epi32(k, ar + j);
        __m512 v;
        if (comp) a = _mm512_sub_epi32(a, _mm512_maskz_loadu_epi32(k, comp + j));
        v = _mm512_cvtepi32_ps(a);
        v = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_maskz_loadu_ps(k, sw + j));
        if (add) v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, yr + j), v);
        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + j));
        if (gelu) v = quick_gelu16(v);
        _mm512_mask_storeu_ps(yr + j, k, v);
    }
}

AVX512 static void dequant_rows_avx512(const int32_t *acc, const int32_t *comp, size_t m,
                                       size_t n, const float *sx, const float *sw, int add,
                                       const float *bias, int gelu, float *y)
{
    size_t i;
    for (i = 0; i < m; i++) {
        const int32_t *ar = acc + i * n; /* (n) */
        float *yr = y + i * n;
        const __m512 s = _mm512_set1_ps(sx[i]);
        /* the int8 layers' cases (u8 codes: comp; a bias; then QuickGELU,
        ** the residual's add, or neither) without per-lane tests */
        if (comp && bias && gelu && !add)
            dequant_row16(ar, comp, n, s, sw, 0, bias, 1, yr);
        else if (comp && bias && add && !gelu)
            dequant_row16(ar, comp, n, s, sw, 1, bias, 0, yr);
        else if (comp && bias && !add && !gelu)
            dequant_row16(ar, comp, n, s, sw, 0, bias, 0, yr);
        else
            dequant_row16(ar, comp, n, s, sw, add, bias, gelu, yr);
    }
}

static const cdb_convert_kernels avx512 = {"avx512", to_bf16_avx512, quantize_rows_avx512,
                                           dequant_rows_avx512};

const cdb_convert_kernels *cdb_convert_avx512(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return &avx512;
    return NULL;
}
#else
const cdb_convert_kernels *cdb_convert_avx512(void)
{
    return NULL;
}
#endif

static pthread_once_t best_once = PTHREAD_ONCE_INIT;
static const cdb_convert_kernels *best;

static void choose(void)
{
    const char *env = getenv("CLIPDB_CONVERT");
    best = (env && !strcmp(env, "portable")) ? NULL : cdb_convert_avx512();
    if (!best) best = &portable;
}

const cdb_convert_kernels *cdb_convert_best(void)
{
    pthread_once(&best_once, choose);
    return best;
}
