/*
** vexp.h: exp and QuickGELU lane by lane on the compiler's vector types
** (gcc and clang's vector_size), written once for every width that uses
** them: the transformer's kernels (src/model/transformer.c: 4, 8 or 16
** lanes), and the int8 dequantisation that fuses QuickGELU (convert.c: one
** lane in portable C; its AVX-512 version spells the same steps with
** AVX-512's min/max and floor instructions, and gives the same bits).
**
** exp is Cephes' expf: range reduction by ln 2, a degree-5 polynomial,
** relative error about 2e-7 over [-87, 88]. Inputs are clamped to
** [-88.38, 88.38], so the result is finite, and 0 below -87.3. Every lane
** goes through the same operations in the same order at any width, so a
** value's result does not depend on the width that computed it (as long as
** the compiler does not fuse a multiply and an add: gcc in ISO C mode does
** not, and convert.o is built with -ffp-contract=off for clang too).
**
** Each macro defines a static inline function: ATTR is empty or a target
** attribute (the width's instructions), VF a float vector type and VI the
** int32 vector type of the same lane count.
*/
#ifndef CDB_VEXP_H
#define CDB_VEXP_H

/* VF NAME(VF x): exp(x) lane-wise. A NaN lane may give any value (the
** compare-and-select clamps keep it NaN until the float-to-int conversion);
** callers that must keep NaN test for it. */
#define CDB_DEFINE_VEXP(ATTR, NAME, VF, VI)                                             \
    ATTR static inline VF NAME(VF x)                                                    \
    {                                                                                   \
        const VF hi = (VF){0} + 88.3762626647949f, lo = (VF){0} - 88.3762626647949f;    \
        VI m, n;                                                                        \
        VF fx, t, z, y;                                                                 \
        m = x > hi;                                                                     \
        x = (VF)((m & (VI)hi) | (~m & (VI)x));                                          \
        m = x < lo;                                                                     \
        x = (VF)((m & (VI)lo) | (~m & (VI)x));                                          \
        /* n = floor(x / ln 2 + 0.5) */                                                 \
        fx = x * 1.44269504088896341f + 0.5f;                                           \
        t = __builtin_convertvector(__builtin_convertvector(fx, VI), VF); /* trunc */    \
        m = t > fx;                                                                     \
        fx = t - (VF)(m & (VI)((VF){0} + 1.0f));                                        \
        x = x - fx * 0.693359375f - fx * -2.12194440e-4f;                               \
        z = x * x;                                                                      \
        y = (VF){0} + 1.9875691500e-4f;                                                 \
        y = y * x + 1.3981999507e-3f;                                                   \
        y = y * x + 8.3334519073e-3f;                                                   \
        y = y * x + 4.1665795894e-2f;                                                   \
        y = y * x + 1.6666665459e-1f;                                                   \
        y = y * x + 5.0000001201e-1f;                                                   \
        y = y * z + x + 1.0f;                                                           \
        n = __builtin_convertvector(fx, VI);                                            \
        n = (n + 127) << 23; /* 2^n as float bits; n >= -127 here (0 -> 0.0f) */        \
        return y * (VF)n;                                                               \
    }

/* VF NAME(VF x): QuickGELU, x / (1 + exp(-1.702 x)), with EXP a function
** that CDB_DEFINE_VEXP defined for VF. */
#define CDB_DEFINE_VQUICK_GELU(ATTR, NAME, VF, EXP)                                      \
    ATTR static inline VF NAME(VF x)                                                    \
    {                                                                                   \
        return x / (1.0f + EXP(x * -1.702f));                                           \
    }

#endif /* CDB_VEXP_H */
