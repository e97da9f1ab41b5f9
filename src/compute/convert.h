/*
** convert.h: the elementwise passes around the bf16 and int8 linear layers
** (onednn.c): fp32 -> bf16 rounding of activations, per-row int8
** quantisation of activations, and the dequantisation of the int32
** accumulators. One interface (a table of functions), two implementations:
** portable C, and AVX-512 (F + BW, compiled with a target attribute, so any
** x86-64 build has it) chosen at run time from the CPU's features. Both give
** bit-identical results (tests/unit/test_compute.c checks that at lengths on
** both sides of the 16-lane vector width). Internal to src/compute.
*/
#ifndef CDB_CONVERT_H
#define CDB_CONVERT_H

#include <stddef.h>
#include <stdint.h>

typedef struct cdb_convert_kernels {
    const char *name; /* "portable" or "avx512" */
    /* out (n) = bf16(x (n)), round to nearest even, NaN kept NaN
    ** (cdb_f32_to_bf16 element by element). */
    void (*to_bf16)(const float *x, size_t n, uint16_t *out);
    /* x (m, k) -> q (m, k) s8 with sx[i] = max|x[i,:]| / qmax (1 for a zero
    ** row); q = round-to-nearest-even(x / sx) as x * (1 / sx). qmax <= 127:
    ** 127 for activations, cdb_int8_weight_max() for weights. shift 1:
    ** each byte holds the code + 128 as u8 instead (the code's bits ^ 0x80). */
    void (*quantize_rows)(const float *x, size_t m, size_t k, float qmax, int shift, int8_t *q,
                          float *sx);
    /* y (m, n) = act([y +] (acc (m, n) - comp[j]) * sx[i] * sw[j] [+ bias[j]]),
    ** with comp (n) or NULL (none; the subtraction is exact in int32), add 0
    ** or 1, bias (n) or NULL, act QuickGELU when gelu (cdb_quick_gelu1),
    ** evaluated in that order. */
    void (*dequant_rows)(const int32_t *acc, const int32_t *comp, size_t m, size_t n,
                         const float *sx, const float *sw, int add, const float *bias, int gelu,
                         float *y);
} cdb_convert_kernels;

/* QuickGELU of one float, x / (1 + exp(-1.702 x)), with Cephes' expf:
** vexp.h's code at width 1, so the same bits as the 16 lanes of the AVX-512
** kernel and the transformer's vector QuickGELU (NaN gives NaN). */
float cdb_quick_gelu1(float x);

const cdb_convert_kernels *cdb_convert_portable(void);
/* NULL when the CPU lacks AVX-512 F + BW (or the compiler is not for x86-64). */
const cdb_convert_kernels *cdb_convert_avx512(void);
/* The best of the two for this CPU (read once). CLIPDB_CONVERT=portable
** forces the portable one (for comparison). */
const cdb_convert_kernels *cdb_convert_best(void);

#endif
