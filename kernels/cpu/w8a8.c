/* Int8 weights times int8 activations (W8A8) for draft models, with AVX512-VNNI.
 *
 * y[m, n] = scale[n] * sum_b xs[m, b] * sum_{k in block b} xq[m, k] * q[n, k] (+ bias[n])
 *
 * q: the int8 weights of quant.py (per output row, scale[n]). The activations are quantized
 * here, per row m and per block b of QB values along K: xs[m, b] = max|x| / 127 over the block,
 * xq = round-half-even(x * (127 / max|x|)) in [-127, 127] (0 for an all-zero block). Each block's
 * dot product is exact in int32 (vpdpbusd: xq + 128 as unsigned bytes times q, less 128 * sum q);
 * the blocks are accumulated in fp32, in order. A draft only proposes tokens, so the activation
 * rounding moves the acceptance rate, never the output law; in exchange a weight line costs a
 * handful of instructions instead of the int8-to-fp32 widening of gemv.c's int8 kernel, which
 * makes that kernel compute-bound on two cores.
 *
 * quant.py's w8a8_reference computes the same in torch (the fallback, and the tests' oracle).
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#include "bf16.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_W8A8 1
#endif

#define QB 64     /* activation values per quantization block (one zmm of bytes) */
#define W8_MAX_M 16

int verispec_w8a8_available(void) {
#if defined(HAVE_W8A8)
    return 1;
#else
    return 0;
#endif
}

#if defined(HAVE_W8A8)
/* x [M, K] (bf16 or fp32) -> xq [M, Kp] (xq + 128 as bytes; padding 128, i.e. 0), xs [M, Kp / QB]. */
static void quantize_act(const void *x, int x_bf16, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *xs) {
    const int64_t nb = Kp / QB;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = b * QB, len = K - k0 < QB ? K - k0 : QB;
            __m512 v[4];
            __m512 amax = _mm512_setzero_ps();
            for (int c = 0; c < 4; c++) {
                const int64_t n = len - 16 * c; /* values of this 16-lane chunk inside the row */
                const __mmask16 k = n >= 16 ? (__mmask16)0xffff : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
                const int64_t i = m * K + k0 + 16 * c;
                if (x_bf16)
                    v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t *)x + i)), 16));
                else
                    v[c] = _mm512_maskz_loadu_ps(k, (const float *)x + i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[c]));
            }
            const float a = _mm512_reduce_max_ps(amax);
            const float inv = a > 0.f ? 127.f / a : 0.f;
            xs[m * nb + b] = a / 127.f;
            for (int c = 0; c < 4; c++) {
                __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v[c], _mm512_set1_ps(inv))); /* half to even */
                r = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(r, _mm512_set1_epi32(-127)),
                                                      _mm512_set1_epi32(127)),
                                     _mm512_set1_epi32(128));
                _mm_storeu_si128((__m128i *)(xq + m * Kp + k0 + 16 * c), _mm512_cvtepi32_epi8(r));
            }
        }
}


/* ROW_W8(MM) defines row_w8_MM: the MM fp32 accumulators of one weight row (MM a compile-time
 * constant, so they stay in registers). xq rows are Kp long, xs rows nb long. */
#define ROW_W8(MM)                                                                                \
    static void row_w8_##MM(const int8_t *wr, const uint8_t *xq, const float *xs, int64_t K, int64_t Kp, \
                            float *out) {                                                         \
        const int64_t nb = Kp / QB;                                                               \
        const __m512i ones = _mm512_set1_epi8(1);                                                 \
        __m512 acc[MM];                                                                           \
        for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();                                \
        for (int64_t b = 0; b < nb; b++) {                                                        \
            const int64_t k = b * QB, len = K - k;                                                \
            const __mmask64 mask = len >= QB ? ~(__mmask64)0 : (((__mmask64)1 << len) - 1);       \
            __builtin_prefetch((const void *)(wr + k + 16384), 0, 2);                             \
            const __m512i wv = _mm512_maskz_loadu_epi8(mask, wr + k);                             \
            const __m512i corr = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv), 7); \
            for (int m = 0; m < MM; m++) {                                                        \
                const __m512i xv = _mm512_loadu_si512((const void *)(xq + m * Kp + k));           \
                const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv), corr); \
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xs[m * nb + b]), acc[m]); \
            }                                                                                     \
        }                                                                                         \
        for (int m = 0; m < MM; m++) out[m] = _mm512_reduce_add_ps(acc[m]);                       \
    }
#define W8_EACH_M(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)
W8_EACH_M(ROW_W8)
typedef void (*row_w8_fn)(const int8_t *, const uint8_t *, const float *, int64_t, int64_t, float *);
#define REF_W8(MM) row_w8_##MM,
static const row_w8_fn ROWS_W8[W8_MAX_M] = {W8_EACH_M(REF_W8)};
#endif

/* M in 1..W8_MAX_M. Returns 0; -1 if a buffer could not be allocated; -2 without AVX512-VNNI. */
int verispec_gemv_w8a8(const void *x, int x_bf16, const int8_t *w, const float *scale, const void *bias, void *y,
                       int64_t M, int64_t K, int64_t N, int nthreads) {
#if defined(HAVE_W8A8)
    const int64_t Kp = (K + QB - 1) / QB * QB, nb = Kp / QB;
    uint8_t *xq = (uint8_t *)malloc((size_t)(M * Kp));
    float *xs = (float *)malloc((size_t)(M * nb) * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    quantize_act(x, x_bf16, M, K, Kp, xq, xs);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float acc[W8_MAX_M];
        ROWS_W8[M - 1](w + n * K, xq, xs, K, Kp, acc);
        for (int64_t m = 0; m < M; m++) {
            const float s = acc[m] * scale[n];
            if (x_bf16) {
                const float bb = bias ? bf16_to_f32(((const uint16_t *)bias)[n]) : 0.f;
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(s + bb);
            } else {
                ((float *)y)[m * N + n] = s + (bias ? ((const float *)bias)[n] : 0.f);
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
#else
    (void)x, (void)x_bf16, (void)w, (void)scale, (void)bias, (void)y, (void)M, (void)K, (void)N, (void)nthreads;
    return -2;
#endif
}
