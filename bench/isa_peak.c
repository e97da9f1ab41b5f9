/*
** isa_peak.c: the peak arithmetic rate of one core for the three AVX-512
** instructions clipdb's precisions end in: fp32 FMA (vfmadd231ps), the
** bf16 pair dot product (vdpbf16ps, AVX512_BF16) and the int8 quad dot
** product (vpdpbusd, AVX512_VNNI). It answers one question a GEMM
** benchmark cannot: does this CPU run bf16 faster than fp32 at all, before
** any library's blocking or packing? The figures measured so far, per
** CPU, are in bench/README.md ("The instructions' own peak").
**
**   make build/bench/isa_peak && build/bench/isa_peak [seconds]
**
** Each kernel keeps 12 independent accumulators in registers, so the loop
** is bound by issue rate, not latency; operands are fixed registers (no
** memory traffic). One thread, pinned to no core. Counts: an FMA lane does
** 2 flops (16 lanes: 32 per instruction); a vdpbf16ps lane does 2 products
** and 2 adds (64 per instruction); a vpdpbusd lane does 4 products and 4
** adds (128 integer ops per instruction). Each rate is the best of 5 runs.
** Where the CPU has AMX, the same for its tile products, tdpbf16ps (bf16:
** a 16 x 32 by 32 x 16 product into 16 x 16 fp32, 16,384 flops) and tdpbssd
** (int8: 16 x 64 by 64 x 16 into int32, 32,768 ops): four accumulator tiles
** fed by two A and two B tiles loaded once (a 2 x 2 block, as a GEMM's
** inner loop has it), after asking Linux for the tile state
** (arch_prctl ARCH_REQ_XCOMP_PERM).
** Prints the CPU model, then one line per instruction the CPU has: "NAME gops G ratio_to_fma R".
*/
#define _GNU_SOURCE /* clock_gettime under -std=c11, syscall */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* KERNEL defines one kernel: n iterations of 12 independent instructions
** STEP(acc, a, b) on accumulators of type T, each started at INIT(i); it
** returns the sum of the accumulators (ADD, then REDUCE), so that nothing
** is optimised away. */
#define KERNEL(name, isa, T, TO, A, B, INIT, STEP, ADD, REDUCE)                  \
    __attribute__((target(isa))) static float name(long n)                      \
    {                                                                            \
        TO a = A, b = B;                                                         \
        T c0 = INIT(0), c1 = INIT(1), c2 = INIT(2), c3 = INIT(3), c4 = INIT(4),  \
          c5 = INIT(5), c6 = INIT(6), c7 = INIT(7), c8 = INIT(8), c9 = INIT(9),  \
          c10 = INIT(10), c11 = INIT(11);                                        \
        for (long it = 0; it < n; it++) {                                        \
            c0 = STEP(c0, a, b); c1 = STEP(c1, a, b); c2 = STEP(c2, a, b);       \
            c3 = STEP(c3, a, b); c4 = STEP(c4, a, b); c5 = STEP(c5, a, b);       \
            c6 = STEP(c6, a, b); c7 = STEP(c7, a, b); c8 = STEP(c8, a, b);       \
            c9 = STEP(c9, a, b); c10 = STEP(c10, a, b); c11 = STEP(c11, a, b);   \
            __asm__ volatile("" ::: "memory");                                   \
        }                                                                        \
        T s = ADD(ADD(ADD(ADD(c0, c1), ADD(c2, c3)), ADD(ADD(c4, c5), ADD(c6, c7))), \
                  ADD(ADD(c8, c9), ADD(c10, c11)));                              \
        return (float)REDUCE(s);                                                 \
    }

#define PS_INIT(i) _mm512_set1_ps((float)(i))
#define EPI_INIT(i) _mm512_set1_epi32(i)
#define FMA_STEP(c, a, b) _mm512_fmadd_ps(a, b, c)
#define BF16_STEP(c, a, b) _mm512_dpbf16_ps(c, a, b)
#define VNNI_STEP(c, a, b) _mm512_dpbusd_epi32(c, a, b)

KERNEL(run_fma, "avx512f", __m512, __m512, _mm512_set1_ps(1.0000001f), _mm512_set1_ps(0.9999999f),
       PS_INIT, FMA_STEP, _mm512_add_ps, _mm512_reduce_add_ps)
KERNEL(run_dpbf16, "avx512f,avx512bf16", __m512, __m512bh, (__m512bh)_mm512_set1_epi16(0x3f80),
       (__m512bh)_mm512_set1_epi16(0x3f80), PS_INIT, BF16_STEP, _mm512_add_ps,
       _mm512_reduce_add_ps)
KERNEL(run_vnni, "avx512f,avx512vnni", __m512i, __m512i, _mm512_set1_epi8(1), _mm512_set1_epi8(1),
       EPI_INIT, VNNI_STEP, _mm512_add_epi32, _mm512_reduce_add_epi32)

/* AMX: 2 x 2 tiles of products per iteration, on tiles configured once
** (palette 1: tiles 0-3 accumulators of 16 rows x 64 bytes, 4-5 the A
** tiles, 6-7 the B tiles, all 16 x 64 bytes). */
#define AMX_KERNEL(name, isa, DP)                                                \
    __attribute__((target("amx-tile," isa))) static float name(long n)          \
    {                                                                            \
        static uint8_t src[16 * 64] __attribute__((aligned(64)));                \
        static int32_t dst[16 * 16] __attribute__((aligned(64)));                \
        for (int i = 0; i < 16 * 64; i++) src[i] = (i & 1) ? 0x3f : 0x80;       \
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);              \
        _tile_loadd(4, src, 64); _tile_loadd(5, src, 64);                        \
        _tile_loadd(6, src, 64); _tile_loadd(7, src, 64);                        \
        for (long it = 0; it < n; it++) {                                        \
            DP(0, 4, 6); DP(1, 4, 7); DP(2, 5, 6); DP(3, 5, 7);                  \
            __asm__ volatile("" ::: "memory");                                   \
        }                                                                        \
        _tile_stored(0, dst, 64);                                                \
        return (float)dst[0];                                                    \
    }

AMX_KERNEL(run_amx_bf16_4, "amx-bf16", _tile_dpbf16ps)
AMX_KERNEL(run_amx_int8_4, "amx-int8", _tile_dpbssd)

/* The kernels above run 4 products per iteration, rate() counts 12 per
** iteration: these run 3 iterations per count. */
static float run_amx_bf16(long n) { return run_amx_bf16_4(3 * n); }
static float run_amx_int8(long n) { return run_amx_int8_4(3 * n); }

/* Palette 1 with tiles 0-7 of 16 rows x 64 bytes, loaded on this thread;
** 0 if the CPU or the kernel gives no tile state. */
__attribute__((target("amx-tile"))) static int amx_ready(void)
{
    static struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg __attribute__((aligned(64)));
    if (!__builtin_cpu_supports("amx-tile")) return 0;
    /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18) */
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 0;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    return 1;
}

/* Best rate (giga-ops/s) of 5 runs of about secs/5 seconds each. */
static double rate(float (*fn)(long), double ops_per_instr, double secs, float *sink)
{
    long n = 1 << 20;
    double best = 0;
    for (;;) { /* size n to about secs/5 */
        double t0 = now();
        *sink += fn(n);
        if (now() - t0 > secs / 20) break;
        n *= 2;
    }
    n *= 4;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        *sink += fn(n);
        double t = now() - t0;
        double g = (double)n * 12 * ops_per_instr / t * 1e-9;
        if (g > best) best = g;
    }
    return best;
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 2.0;
    float sink = 0;
    __builtin_cpu_init();
    char line[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f)) /* the CPU model, for the record */
        if (!strncmp(line, "model name", 10)) {
            printf("cpu %s", strchr(line, ':') ? strchr(line, ':') + 2 : line);
            break;
        }
    if (f) fclose(f);
    if (!__builtin_cpu_supports("avx512f")) {
        printf("no AVX-512 on this CPU: nothing to measure\n");
        return 0;
    }
    double fma = rate(run_fma, 32, secs, &sink);
    printf("vfmadd231ps(fp32) gops %.1f ratio_to_fma 1.00\n", fma);
    if (__builtin_cpu_supports("avx512bf16")) {
        double g = rate(run_dpbf16, 64, secs, &sink);
        printf("vdpbf16ps(bf16) gops %.1f ratio_to_fma %.2f\n", g, g / fma);
    } else {
        printf("vdpbf16ps(bf16) absent\n");
    }
    if (__builtin_cpu_supports("avx512vnni")) {
        double g = rate(run_vnni, 128, secs, &sink);
        printf("vpdpbusd(int8) gops %.1f ratio_to_fma %.2f\n", g, g / fma);
    } else {
        printf("vpdpbusd(int8) absent\n");
    }
    if (amx_ready()) {
        double g = rate(run_amx_bf16, 16384, secs, &sink);
        printf("tdpbf16ps(amx bf16) gops %.1f ratio_to_fma %.2f\n", g, g / fma);
        g = rate(run_amx_int8, 32768, secs, &sink);
        printf("tdpbssd(amx int8) gops %.1f ratio_to_fma %.2f\n", g, g / fma);
    } else {
        printf("amx absent\n");
    }
    return sink == 12345.0f; /* keeps the results alive */
}
