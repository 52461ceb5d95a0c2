/* bf16 <-> fp32 conversions and element access shared by the native CPU kernels. */
#ifndef VERISPEC_BF16_H
#define VERISPEC_BF16_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element i of an array of bf16 (bf16 = 1) or fp32 values, as fp32; the store rounds to the
 * array's dtype; rnd_any rounds an fp32 value as a store-and-load would. */
static inline float ld_any(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st_any(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}
static inline float rnd_any(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

#if defined(__AVX512F__)
static inline __m512 bf16x16_to_f32(const uint16_t *p) { /* 16 bf16 values, widened exactly */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}
#endif
#endif
