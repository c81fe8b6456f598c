/* Vector types and lane functions the CPU kernels share (paged_decode.c, sample.c).
 *
 * Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 register, two AVX2
 * ones, four SSE ones. Hot functions are compiled for each of those (CPU_CLONES: target_clones)
 * and the loader picks what the CPU has, so a build made on one x86-64 machine runs on another.
 */

#ifndef DAEMON_KERNELS_VECTORS_H
#define DAEMON_KERNELS_VECTORS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 16

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
/* the same vector read from or written to memory aligned only as a float is */
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_CLONES
#endif

#define INLINE static inline __attribute__((always_inline))

/* e^x lane by lane for x <= 0, to about 2e-7 relative: e^x = 2^n * e^r with |r| <= ln2/2 and
 * e^r by its Taylor series to r^6. Below -87 it gives about 1e-38 instead of 0 (callers zero
 * the lanes that must be 0). */
INLINE v16 exp_nonpositive(v16 x)
{
    const v16 floor_ = (v16){0} - 87.0f;
    x = (v16)(((v16i)x & (x > floor_)) | ((v16i)floor_ & ~(x > floor_)));
    v16i rounded = -__builtin_convertvector(0.5f - x * 1.44269504f, v16i); /* x <= 0: round half up */
    v16 n = __builtin_convertvector(rounded, v16);
    v16 r = x - n * 0.693145752f - n * 1.42860677e-6f;
    v16 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    return (v16)((v16i)p + (rounded << 23));
}


/* the largest and the sum of a vector's lanes, as a tree: four dependent steps, not sixteen */
INLINE float lane_max(v16 x)
{
    float m[8];
    for (int i = 0; i < 8; i++) m[i] = x[i] > x[i + 8] ? x[i] : x[i + 8];
    for (int i = 0; i < 4; i++) m[i] = m[i] > m[i + 4] ? m[i] : m[i + 4];
    for (int i = 0; i < 2; i++) m[i] = m[i] > m[i + 2] ? m[i] : m[i + 2];
    return m[0] > m[1] ? m[0] : m[1];
}

INLINE float lane_sum(v16 x)
{
    float s[8];
    for (int i = 0; i < 8; i++) s[i] = x[i] + x[i + 8];
    for (int i = 0; i < 4; i++) s[i] += s[i + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

#endif
