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

/* 16 lanes of f32_to_bf16's bits, each in the high half of its 32-bit lane (low half zero): round to
 * nearest even, a NaN quieted, denormals kept (VCVTNEPS2BF16 would flush them, unlike torch). */
static inline __m512i bf16x16_round_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(_mm512_and_si512(_mm512_add_epi32(u, bias), hi), nan,
                                 _mm512_and_si512(_mm512_or_si512(u, _mm512_set1_epi32(0x00400000)), hi));
}

/* rnd_any, ld_any and st_any on 16 consecutive elements (i, i + 1, ..., i + 15). */
static inline __m512 rnd16_any(__m512 v, int bf16) { return bf16 ? _mm512_castsi512_ps(bf16x16_round_bits(v)) : v; }
static inline __m512 ld16_any(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16x16_to_f32((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}
static inline void st16_any(void *p, int64_t i, __m512 v, int bf16) {
    if (bf16)
        _mm256_storeu_si256((void *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16x16_round_bits(v), 16)));
    else
        _mm512_storeu_ps((float *)p + i, v);
}
/* a * b and a + b, each rounded once: the explicit-rounding forms, which the compiler never fuses
 * into an FMA whatever -ffp-contract says. */
#define MUL16(a, b) _mm512_mul_round_ps((a), (b), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ADD16(a, b) _mm512_add_round_ps((a), (b), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#endif
#endif
