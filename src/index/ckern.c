/*
** ckern.c: the dot-product kernels of compressed vector copies (cvecs.c),
** one row block at a time, in three implementations chosen at run time:
**   avx512  AVX-512 F+BW+VNNI: u8 x s8 by vpdpbusd (64 codes per
**           instruction); bf16 widened by a 16-bit shift, fp16 by vcvtph2ps,
**           fp32 FMA;
**   avx2    AVX2+FMA+F16C: u8 and s8 widened to s16, vpmaddwd (exact: no
**           16-bit pair saturation, unlike vpmaddubsw); bf16 / fp16 as above
**           on 8 lanes;
**   c       portable C, the reference the others are tested against.
** The integer kernels give identical results on every path (exact int32
** sums: |sum| <= 255 * 127 * CLIPDB_MAX_DIM < 2^31); the float ones differ
** only by summation order. Tests: tests/unit/test_cvecs.c, on both sides of
** every vector width (d = 1 .. 130, rows not a multiple of 4).
*/
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "compute/compute.h"
#include "index/index.h"

/* ---- fp16 <-> fp32 (IEEE binary16), portable ------------------------------ */

uint16_t cdb_f32_to_fp16(float f)
{
    uint32_t x, ax, sign, h, rem;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);    /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* rounds to inf */
    if (ax < 0x38800000u) {                                     /* below 2^-14: subnormal */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f)); /* exact scale, RNE */
    }
    h = (((ax >> 23) - 112) << 10) | ((ax & 0x7fffffu) >> 13);
    rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;      /* round to nearest even */
    return (uint16_t)(sign | h);
}

float cdb_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    memcpy(&f, &u, 4);
    return f;
}

/* ---- portable C -------------------------------------------------------------- */

static void dot_u8s8_c(const uint8_t *x, size_t n, int d, const int8_t *q, int32_t *out)
{
    size_t r;
    int j;
    for (r = 0; r < n; r++, x += d) {
        int32_t s = 0;
        for (j = 0; j < d; j++) s += (int32_t)x[j] * q[j];
        out[r] = s;
    }
}

#define DOT_H16_C(NAME, SCALAR)                                                   \
    static void NAME(const uint16_t *x, size_t n, int d, const float *q, float *out) \
    {                                                                             \
        size_t r;                                                                 \
        int j;                                                                    \
        for (r = 0; r < n; r++, x += d) {                                         \
            float s = 0;                                                          \
            for (j = 0; j < d; j++) s += SCALAR(x[j]) * q[j];                     \
            out[r] = s;                                                           \
        }                                                                         \
    }
DOT_H16_C(dot_bf16_c, cdb_bf16_to_f32)
DOT_H16_C(dot_fp16_c, cdb_fp16_to_f32)

/* ---- AVX2 + FMA + F16C -------------------------------------------------------- */

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))

T_AVX2 static inline int32_t hsum8_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

T_AVX2 static inline float hsum8_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T_AVX2 static void dot_u8s8_avx2(const uint8_t *x, size_t n, int d, const int8_t *q,
                                 int32_t *out)
{
    size_t r;
    for (r = 0; r < n; r++, x += d) {
        __m256i acc = _mm256_setzero_si256();
        int32_t s;
        int j;
        for (j = 0; j + 16 <= d; j += 16) {
            /* 16 codes and 16 query weights -> s16 -> pair products summed in s32 */
            __m256i xv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x + j)));
            __m256i qv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(xv, qv));
        }
        s = hsum8_epi32(acc);
        for (; j < d; j++) s += (int32_t)x[j] * q[j];
        out[r] = s;
    }
}

/* 8 halves at x -> 8 floats */
T_AVX2 static inline __m256 load_bf16x8(const uint16_t *x)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
T_AVX2 static inline __m256 load_fp16x8(const uint16_t *x)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)x));
}

#define DOT_H16_AVX2(NAME, LOAD, SCALAR)                                                   \
    T_AVX2 static void NAME(const uint16_t *x, size_t n, int d, const float *q, float *out) \
    {                                                                                      \
        size_t r;                                                                          \
        for (r = 0; r < n; r++, x += d) {                                                  \
            __m256 acc = _mm256_setzero_ps();                                              \
            float s;                                                                       \
            int j;                                                                         \
            for (j = 0; j + 8 <= d; j += 8)                                                \
                acc = _mm256_fmadd_ps(LOAD(x + j), _mm256_loadu_ps(q + j), acc);           \
            s = hsum8_ps(acc);                                                             \
            for (; j < d; j++) s += SCALAR(x[j]) * q[j];                                   \
            out[r] = s;                                                                    \
        }                                                                                  \
    }
DOT_H16_AVX2(dot_bf16_avx2, load_bf16x8, cdb_bf16_to_f32)
DOT_H16_AVX2(dot_fp16_avx2, load_fp16x8, cdb_fp16_to_f32)

/* ---- AVX-512 F + BW + VL + VNNI ------------------------------------------------------ */

#define T_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* Four rows at a time share each query load; the tail of a row (d % 64
** codes) goes through a masked load, so no scalar loop. */
T_512 static void dot_u8s8_avx512(const uint8_t *x, size_t n, int d, const int8_t *q,
                                  int32_t *out)
{
    const int full = d & ~63;
    const __mmask64 tail = (d & 63) ? (__mmask64)((~0ull) >> (64 - (d & 63))) : 0;
    size_t r = 0;
    for (; r + 4 <= n; r += 4) {
        const uint8_t *x0 = x + r * (size_t)d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        int j;
        for (j = 0; j < full; j += 64) {
            __m512i qv = _mm512_loadu_si512(q + j);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(x0 + j), qv);
            a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(x1 + j), qv);
            a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(x2 + j), qv);
            a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(x3 + j), qv);
        }
        if (tail) {
            __m512i qv = _mm512_maskz_loadu_epi8(tail, q + j);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(tail, x0 + j), qv);
            a1 = _mm512_dpbusd_epi32(a1, _mm512_maskz_loadu_epi8(tail, x1 + j), qv);
            a2 = _mm512_dpbusd_epi32(a2, _mm512_maskz_loadu_epi8(tail, x2 + j), qv);
            a3 = _mm512_dpbusd_epi32(a3, _mm512_maskz_loadu_epi8(tail, x3 + j), qv);
        }
        out[r] = _mm512_reduce_add_epi32(a0);
        out[r + 1] = _mm512_reduce_add_epi32(a1);
        out[r + 2] = _mm512_reduce_add_epi32(a2);
        out[r + 3] = _mm512_reduce_add_epi32(a3);
    }
    for (; r < n; r++) {
        const uint8_t *x0 = x + r * (size_t)d;
        __m512i a0 = _mm512_setzero_si512();
        int j;
        for (j = 0; j < full; j += 64)
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(x0 + j), _mm512_loadu_si512(q + j));
        if (tail)
            a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(tail, x0 + j),
                                     _mm512_maskz_loadu_epi8(tail, q + j));
        out[r] = _mm512_reduce_add_epi32(a0);
    }
}

/* 16 halves at x (masked by m) -> 16 floats */
T_512 static inline __m512 load_bf16x16(const uint16_t *x, __mmask16 m)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
T_512 static inline __m512 load_fp16x16(const uint16_t *x, __mmask16 m)
{
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x));
}

#define DOT_H16_512(NAME, LOAD)                                                             \
    T_512 static void NAME(const uint16_t *x, size_t n, int d, const float *q, float *out)  \
    {                                                                                       \
        const int full = d & ~15;                                                           \
        const __mmask16 tail = (__mmask16)((1u << (d & 15)) - 1);                           \
        size_t r;                                                                           \
        for (r = 0; r < n; r++, x += d) {                                                   \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;                                       \
            int j = 0;                                                                      \
            for (; j + 32 <= full; j += 32) {                                               \
                a0 = _mm512_fmadd_ps(LOAD(x + j, 0xffff), _mm512_loadu_ps(q + j), a0);      \
                a1 = _mm512_fmadd_ps(LOAD(x + j + 16, 0xffff), _mm512_loadu_ps(q + j + 16), \
                                     a1);                                                   \
            }                                                                               \
            for (; j < full; j += 16)                                                       \
                a0 = _mm512_fmadd_ps(LOAD(x + j, 0xffff), _mm512_loadu_ps(q + j), a0);      \
            if (tail)                                                                       \
                a1 = _mm512_fmadd_ps(LOAD(x + j, tail), _mm512_maskz_loadu_ps(tail, q + j), \
                                     a1);                                                   \
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                           \
        }                                                                                   \
    }
DOT_H16_512(dot_bf16_avx512, load_bf16x16)
DOT_H16_512(dot_fp16_avx512, load_fp16x16)

/* ---- dispatch ----------------------------------------------------------------------- */

static const cdb_ckern kernels[] = {
    {"c", dot_u8s8_c, dot_bf16_c, dot_fp16_c},
    {"avx2", dot_u8s8_avx2, dot_bf16_avx2, dot_fp16_avx2},
    {"avx512_vnni", dot_u8s8_avx512, dot_bf16_avx512, dot_fp16_avx512},
};

const cdb_ckern *cdb_ckern_at(cdb_ck_level level)
{
    __builtin_cpu_init();
    switch (level) {
    case CDB_CK_C: return &kernels[0];
    case CDB_CK_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &kernels[1]
                                                                                : NULL;
    case CDB_CK_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
                   ? &kernels[2]
                   : NULL;
    }
    return NULL;
}

const cdb_ckern *cdb_ckern_best(void)
{
    const cdb_ckern *k = cdb_ckern_at(CDB_CK_AVX512);
    if (!k) k = cdb_ckern_at(CDB_CK_AVX2);
    return k ? k : cdb_ckern_at(CDB_CK_C);
}
