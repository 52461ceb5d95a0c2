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
#ifndef PF_L2_BYTES
#define PF_L2_BYTES 16384 /* bytes ahead in a weight row for the bf16 kernel's prefetch into L2 */
#endif
#ifndef X_L1_BYTES
#define X_L1_BYTES 24576 /* activation bytes per K-chunk of the bf16 kernel: they stay in L1 */
#endif
#if defined(NO_PF)
#define PREFETCH(p)
#define PREFETCH_L2(p)
#else
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 0)
#define PREFETCH_L2(p) __builtin_prefetch((const void *)(p), 0, 2)
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
/* The AVX512-BF16 kernel runs over a chunk [k0, k1) of the row (multiples of 32), the MM
 * accumulators carried in acc between chunks, so a long row can be cut into chunks whose
 * activations stay in L1 without changing the order of any addition. pf: where to prefetch
 * (into L2) at offset k, far enough ahead that DRAM latency is hidden even when MM rows of
 * arithmetic per weight line leave the core little slack. */
#define CHUNKED 1
#define ROW_BF16(MM)                                                                              \
    static void row_bf16_##MM(const uint16_t *w, const uint16_t *x, int64_t K, int64_t k0, int64_t k1, \
                              __m512 *acc, const char *pf) {                                      \
        __m512 a[MM];                                                                             \
        for (int m = 0; m < MM; m++) a[m] = acc[m];                                               \
        for (int64_t k = k0; k + 32 <= k1; k += 32) {                                             \
            PREFETCH_L2(pf + 2 * k);                                                              \
            __m512i wv = _mm512_loadu_si512((const void *)(w + k));                               \
            for (int m = 0; m < MM; m++)                                                          \
                a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)wv,                                       \
                                        (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k))); \
        }                                                                                         \
        for (int m = 0; m < MM; m++) acc[m] = a[m];                                               \
    }
/* ROW2_BF16(MM): rows n and n + 1 in one pass, each activation load shared by both (7 loads per \
 * 64 weights at MM = 5 instead of 12); each row's accumulators see the same additions in the    \
 * same order as with row_bf16_MM, so the sums are bitwise the same. acc: row n's MM, then row   \
 * n + 1's; pf: prefetch into L2 for the first row, pf + 2 K bytes for the second. */            \
#define ROW2_BF16(MM)                                                                             \
    static void row2_bf16_##MM(const uint16_t *w, const uint16_t *x, int64_t K, int64_t k0, int64_t k1, \
                               __m512 *acc, const char *pf) {                                     \
        __m512 a[MM], b[MM];                                                                      \
        for (int m = 0; m < MM; m++) {                                                            \
            a[m] = acc[m];                                                                        \
            b[m] = acc[MM + m];                                                                   \
        }                                                                                         \
        for (int64_t k = k0; k + 32 <= k1; k += 32) {                                             \
            PREFETCH_L2(pf + 2 * k);                                                              \
            PREFETCH_L2(pf + 2 * K + 2 * k);                                                      \
            __m512i wa = _mm512_loadu_si512((const void *)(w + k));                               \
            __m512i wb = _mm512_loadu_si512((const void *)(w + K + k));                           \
            for (int m = 0; m < MM; m++) {                                                        \
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k));        \
                a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)wa, xv);                                  \
                b[m] = _mm512_dpbf16_ps(b[m], (__m512bh)wb, xv);                                  \
            }                                                                                     \
        }                                                                                         \
        for (int m = 0; m < MM; m++) {                                                            \
            acc[m] = a[m];                                                                        \
            acc[MM + m] = b[m];                                                                   \
        }                                                                                         \
    }
#define PAIR_M 8 /* rows of activations up to which two weight rows share a pass (2 x 8 accumulators) */
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

#if defined(CHUNKED)
typedef void (*row_bf16_fn)(const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t, __m512 *, const char *);
#else
typedef void (*row_bf16_fn)(const uint16_t *, const uint16_t *, int64_t, float *);
#endif
typedef void (*row_f32_fn)(const float *, const float *, int64_t, float *);
#define REF_BF16(MM) row_bf16_##MM,
#define REF_F32(MM) row_f32_##MM,
static const row_bf16_fn ROWS_BF16[MAX_M] = {EACH_M(REF_BF16)};
#if defined(PAIR_M)
#define EACH_PAIR_M(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)
EACH_PAIR_M(ROW2_BF16)
#define REF2_BF16(MM) row2_bf16_##MM,
static const row_bf16_fn ROWS2_BF16[PAIR_M] = {EACH_PAIR_M(REF2_BF16)};
#endif
static const row_f32_fn ROWS_F32[MAX_M] = {EACH_M(REF_F32)};


#if defined(CHUNKED)
/* y[m, n] from the accumulators of row n: lane sum, the K % 32 tail, the bias, rounding. */
static void finish_bf16(const __m512 *acc, const uint16_t *w, const uint16_t *x, const uint16_t *bias, uint16_t *y,
                        int64_t M, int64_t K, int64_t N, int64_t n) {
    const float b = bias ? bf16_to_f32(bias[n]) : 0.f;
    for (int64_t m = 0; m < M; m++) {
        float s = _mm512_reduce_add_ps(acc[m]);
        for (int64_t j = K / 32 * 32; j < K; j++) s += bf16_to_f32(w[n * K + j]) * bf16_to_f32(x[m * K + j]);
        y[m * N + n] = f32_to_bf16(s + b);
    }
}
#endif

/* M must be in 1..MAX_M (the caller splits larger M). Rows whose M activations outgrow X_L1_BYTES are cut into K-chunks: each thread runs chunk c
 * over all its output rows before chunk c + 1, the accumulators parked in a per-thread buffer. */
void verispec_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                       int64_t K, int64_t N, int nthreads) {
#if defined(CHUNKED)
    const int64_t K32 = K / 32 * 32;
    int64_t KC = K32; /* K32 in equal chunks of at most X_L1_BYTES of activations */
    if (2 * M * K32 > X_L1_BYTES) {
        const int64_t nchunks = (2 * M * K32 + X_L1_BYTES - 1) / X_L1_BYTES;
        KC = (K32 / 32 + nchunks - 1) / nchunks * 32;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t n0 = N * id / nt, n1 = N * (id + 1) / nt;
        __m512 *acc = NULL;
        if (K32 > 0 && KC < K32 && n1 > n0) acc = (__m512 *)aligned_alloc(64, (size_t)((n1 - n0) * M) * sizeof(__m512));
        if (acc) { /* chunked: the prefetch runs two rows ahead at the same offset */
            for (int64_t i = 0; i < (n1 - n0) * M; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t k0 = 0; k0 < K32; k0 += KC) {
                const int64_t k1 = k0 + KC < K32 ? k0 + KC : K32;
                int64_t n = n0;
                if (M <= PAIR_M)
                    for (; n + 1 < n1; n += 2)
                        ROWS2_BF16[M - 1](w + n * K, x, K, k0, k1, acc + (n - n0) * M,
                                          (const char *)(w + (n + 3 < n1 ? n + 2 : n) * K));
                for (; n < n1; n++)
                    ROWS_BF16[M - 1](w + n * K, x, K, k0, k1, acc + (n - n0) * M,
                                     (const char *)(w + (n + 2 < n1 ? n + 2 : n1 - 1) * K));
            }
            for (int64_t n = n0; n < n1; n++) finish_bf16(acc + (n - n0) * M, w, x, bias, y, M, K, N, n);
            free(acc);
        } else { /* whole rows (also the fallback when the buffer cannot be had: same sums) */
            __m512 a[2 * MAX_M];
            int64_t n = n0;
            if (M <= PAIR_M)
                for (; n + 1 < n1; n += 2) {
                    for (int64_t m = 0; m < 2 * M; m++) a[m] = _mm512_setzero_ps();
                    ROWS2_BF16[M - 1](w + n * K, x, K, 0, K32, a, (const char *)(w + n * K) + PF_L2_BYTES);
                    finish_bf16(a, w, x, bias, y, M, K, N, n);
                    finish_bf16(a + M, w, x, bias, y, M, K, N, n + 1);
                }
            for (; n < n1; n++) {
                for (int64_t m = 0; m < M; m++) a[m] = _mm512_setzero_ps();
                ROWS_BF16[M - 1](w + n * K, x, K, 0, K32, a, (const char *)(w + n * K) + PF_L2_BYTES);
                finish_bf16(a, w, x, bias, y, M, K, N, n);
            }
        }
    }
#else
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_M];
        ROWS_BF16[M - 1](w + n * K, x, K, acc);
        float b = bias ? bf16_to_f32(bias[n]) : 0.f;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = f32_to_bf16(acc[m] + b);
    }
#endif
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

/* Sum of n floats split over threads: a streaming read at the machine's limit (with the same
 * software prefetch into L2 as the bf16 products, a few percent faster here than without), so benchmarks
 * can state decode speed against a bandwidth measured in the same run by code as tight as the
 * kernels themselves. Returns the sum so the reads cannot be optimised away. */
double verispec_stream_read(const float *p, int64_t n, int nthreads) {
    double total = 0.0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : total)
    for (int64_t c = 0; c < n / 4096; c++) {
        const float *q = p + c * 4096;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < 4096; i += 64) { /* prefetched as far ahead as the products do */
            for (int64_t j = 0; j < 64; j += 16) PREFETCH_L2(q + i + j + PF_L2_BYTES / 4);
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
