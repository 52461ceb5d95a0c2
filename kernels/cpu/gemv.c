/* Skinny matrix products for CPU decode: y[M, N] = x[M, K] . w[N, K]^T (+ bias), M small.
 *
 * Decode and verify passes multiply a handful of activation rows (M = 1 .. 16) by every
 * weight matrix, so they are bound by the speed at which the weights stream from memory.
 * These kernels read each weight row once for all M activation rows, accumulate in fp32,
 * and split the output columns over OpenMP threads. The per-row summation order does not
 * depend on M, so a token's result in a k-token verify pass is bitwise the one it gets in
 * a one-token decode step.
 *
 * bf16 weights use AVX512-BF16 dot products when the compiler targets them, else AVX512F
 * widening, else scalar code; fp32 uses AVX512F FMAs, else scalar code.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_M 16
#ifndef PF_DIST
#define PF_DIST 1024 /* elements ahead in the weight stream: software prefetch hides DRAM latency */
#endif
#if defined(NO_PF)
#define PREFETCH(p)
#else
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 0)
#endif


int verispec_gemv_isa(void) { /* 2: AVX512-BF16, 1: AVX512F, 0: scalar */
#if defined(__AVX512BF16__)
    return 2;
#elif defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* ---- bf16 ----------------------------------------------------------------------------- */

/* ROW_BF16(MM) defines row_bf16_MM: acc[m] = dot(w_row, x[m]) for m < MM, the weight row
 * streamed once. MM is a compile-time constant so the accumulators stay in registers. */
#if defined(__AVX512BF16__)
#define ROW_BF16(MM)                                                                              \
    static void row_bf16_##MM(const uint16_t *w, const uint16_t *x, int64_t K, float *acc) {     \
        __m512 a[MM];                                                                             \
        for (int m = 0; m < MM; m++) a[m] = _mm512_setzero_ps();                                  \
        int64_t k = 0;                                                                            \
        for (; k + 32 <= K; k += 32) {                                                            \
            PREFETCH(w + k + PF_DIST);                                                            \
            __m512i wv = _mm512_loadu_si512((const void *)(w + k));                               \
            for (int m = 0; m < MM; m++)                                                          \
                a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)wv,                                       \
                                        (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k))); \
        }                                                                                         \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = _mm512_reduce_add_ps(a[m]);                                                 \
            for (int64_t j = k; j < K; j++) s += bf16_to_f32(w[j]) * bf16_to_f32(x[m * K + j]);   \
            acc[m] = s;                                                                           \
        }                                                                                         \
    }
#elif defined(__AVX512F__)
#define WIDEN(p) bf16x16_to_f32(p)
#define ROW_BF16(MM)                                                                              \
    static void row_bf16_##MM(const uint16_t *w, const uint16_t *x, int64_t K, float *acc) {     \
        __m512 a[MM];                                                                             \
        for (int m = 0; m < MM; m++) a[m] = _mm512_setzero_ps();                                  \
        int64_t k = 0;                                                                            \
        for (; k + 16 <= K; k += 16) {                                                            \
            __m512 wv = WIDEN(w + k);                                                             \
            for (int m = 0; m < MM; m++) a[m] = _mm512_fmadd_ps(wv, WIDEN(x + m * K + k), a[m]);  \
        }                                                                                         \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = _mm512_reduce_add_ps(a[m]);                                                 \
            for (int64_t j = k; j < K; j++) s += bf16_to_f32(w[j]) * bf16_to_f32(x[m * K + j]);   \
            acc[m] = s;                                                                           \
        }                                                                                         \
    }
#else
#define ROW_BF16(MM)                                                                              \
    static void row_bf16_##MM(const uint16_t *w, const uint16_t *x, int64_t K, float *acc) {     \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = 0.f;                                                                        \
            for (int64_t j = 0; j < K; j++) s += bf16_to_f32(w[j]) * bf16_to_f32(x[m * K + j]);   \
            acc[m] = s;                                                                           \
        }                                                                                         \
    }
#endif

#define ROW_F32(MM)                                                                               \
    static void row_f32_##MM(const float *w, const float *x, int64_t K, float *acc) {            \
        ROW_F32_BODY(MM)                                                                          \
    }
#if defined(__AVX512F__)
#define ROW_F32_BODY(MM)                                                                          \
        __m512 a[MM];                                                                             \
        for (int m = 0; m < MM; m++) a[m] = _mm512_setzero_ps();                                  \
        int64_t k = 0;                                                                            \
        for (; k + 16 <= K; k += 16) {                                                            \
            __m512 wv = _mm512_loadu_ps(w + k);                                                   \
            for (int m = 0; m < MM; m++) a[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), a[m]); \
        }                                                                                         \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = _mm512_reduce_add_ps(a[m]);                                                 \
            for (int64_t j = k; j < K; j++) s += w[j] * x[m * K + j];                             \
            acc[m] = s;                                                                           \
        }
#else
#define ROW_F32_BODY(MM)                                                                          \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = 0.f;                                                                        \
            for (int64_t j = 0; j < K; j++) s += w[j] * x[m * K + j];                             \
            acc[m] = s;                                                                           \
        }
#endif

#define EACH_M(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)
EACH_M(ROW_BF16)
EACH_M(ROW_F32)

typedef void (*row_bf16_fn)(const uint16_t *, const uint16_t *, int64_t, float *);
typedef void (*row_f32_fn)(const float *, const float *, int64_t, float *);
#define REF_BF16(MM) row_bf16_##MM,
#define REF_F32(MM) row_f32_##MM,
static const row_bf16_fn ROWS_BF16[MAX_M] = {EACH_M(REF_BF16)};
static const row_f32_fn ROWS_F32[MAX_M] = {EACH_M(REF_F32)};


/* M must be in 1..MAX_M (the caller splits larger M). */
void verispec_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                        int64_t K, int64_t N, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_M];
        ROWS_BF16[M - 1](w + n * K, x, K, acc);
        float b = bias ? bf16_to_f32(bias[n]) : 0.f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = f32_to_bf16(acc[m] + b);
    }
}

void verispec_gemv_f32(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                       int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_M];
        ROWS_F32[M - 1](w + n * K, x, K, acc);
        float b = bias ? bias[n] : 0.f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = acc[m] + b;
    }
}

/* ---- int8 weights ------------------------------------------------------------------------ */

/* Weights quantized per output row: w[n, k] ~= q[n, k] * scale[n], q int8. y[m, n] =
 * scale[n] * sum_k q[n, k] * x[m, k] (+ bias[n]), accumulated in fp32 (each product is exact:
 * an int8 times a bf16 or fp32 value). Activations are bf16 (x_bf16 = 1) or fp32, converted to
 * fp32 once per call; y and bias have the activations' dtype. Half the weight bytes of bf16, for
 * drafts: a draft only proposes, so its precision moves acceptance, never the output law. */
#define ROW_I8(MM)                                                                                \
    static void row_i8_##MM(const int8_t *w, const float *x, int64_t K, float *acc) {            \
        ROW_I8_BODY(MM)                                                                           \
    }
#if defined(__AVX512F__)
#define ROW_I8_BODY(MM)                                                                           \
        __m512 a[MM];                                                                             \
        for (int m = 0; m < MM; m++) a[m] = _mm512_setzero_ps();                                  \
        int64_t k = 0;                                                                            \
        for (; k + 16 <= K; k += 16) {                                                            \
            PREFETCH(w + k + 2 * PF_DIST);                                                        \
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(w + k)))); \
            for (int m = 0; m < MM; m++) a[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), a[m]); \
        }                                                                                         \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = _mm512_reduce_add_ps(a[m]);                                                 \
            for (int64_t j = k; j < K; j++) s += (float)w[j] * x[m * K + j];                      \
            acc[m] = s;                                                                           \
        }
#else
#define ROW_I8_BODY(MM)                                                                           \
        for (int m = 0; m < MM; m++) {                                                            \
            float s = 0.f;                                                                        \
            for (int64_t j = 0; j < K; j++) s += (float)w[j] * x[m * K + j];                      \
            acc[m] = s;                                                                           \
        }
#endif
EACH_M(ROW_I8)
typedef void (*row_i8_fn)(const int8_t *, const float *, int64_t, float *);
#define REF_I8(MM) row_i8_##MM,
static const row_i8_fn ROWS_I8[MAX_M] = {EACH_M(REF_I8)};

/* M must be in 1..MAX_M. Returns 0, or -1 if the activation buffer could not be allocated. */
int verispec_gemv_i8(const void *x, int x_bf16, const int8_t *w, const float *scale, const void *bias, void *y,
                     int64_t M, int64_t K, int64_t N, int nthreads) {
    float *xf = (float *)x;
    if (x_bf16) {
        xf = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xf) return -1;
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_M];
        ROWS_I8[M - 1](w + n * K, xf, K, acc);
        for (int64_t m = 0; m < M; m++) {
            if (x_bf16) {
                float b = bias ? bf16_to_f32(((const uint16_t *)bias)[n]) : 0.f;
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(acc[m] * scale[n] + b);
            } else {
                float b = bias ? ((const float *)bias)[n] : 0.f;
                ((float *)y)[m * N + n] = acc[m] * scale[n] + b;
            }
        }
    }
    if (x_bf16) free(xf);
    return 0;
}

/* ---- memory bandwidth probe ---------------------------------------------------------------- */

/* Sum of n floats split over threads: a streaming read at the machine's limit, so benchmarks
 * can state decode speed against a bandwidth measured in the same run by code as tight as the
 * kernels themselves. Returns the sum so the reads cannot be optimised away. */
double verispec_stream_read(const float *p, int64_t n, int nthreads) {
    double total = 0.0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : total)
    for (int64_t c = 0; c < n / 4096; c++) {
        const float *q = p + c * 4096;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < 4096; i += 64) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(q + i));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(q + i + 16));
            a2 = _mm512_add_ps(a2, _mm512_loadu_ps(q + i + 32));
            a3 = _mm512_add_ps(a3, _mm512_loadu_ps(q + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
        float s = 0.f;
        for (int64_t i = 0; i < 4096; i++) s += q[i];
        total += s;
#endif
    }
    for (int64_t i = (n / 4096) * 4096; i < n; i++) total += p[i]; /* the ragged tail */
    return total;
}
