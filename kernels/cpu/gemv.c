/* Skinny matrix products for CPU decode: y[M, N] = x[M, K] . w[N, K]^T (+ bias), M small.
 *
 * Decode and verify passes multiply a handful of activation rows (M = 1 .. 16) by every
 * weight matrix, so they are bound by the speed at which the weights stream from memory.
 * These kernels read each weight row once for all M activation rows, accumulate in fp32,
 * and split the output columns over OpenMP threads (the bf16 products in blocks that idle threads
 * take over, steal.h). The per-row summation order does not
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
#include "steal.h"
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
#ifndef STEAL_BYTES
#define STEAL_BYTES 65536 /* weight bytes per block of the rebalanced split (steal.h) */
#endif
#ifndef CHUNK_STEAL_BYTES
#define CHUNK_STEAL_BYTES 262144 /* ... and of the K-chunked split: each block reads all M activations again */
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


int verispec_gemv_isa(void) { /* 2: AVX512-BF16, 1: AVX512F, 0: scalar (AMX tiles: verispec_gemv_tiles_available) */
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
/* The AVX512-BF16 kernel. group_bf16(R, MM, ...) runs R consecutive weight rows n .. n + R - 1
 * over a chunk [k0, k1) of K (multiples of 32) against MM activation rows, R * MM accumulators in
 * registers, each activation load shared by the R rows and each weight load by the MM
 * activations. pass_bf16_MM runs a thread's output rows [n0, n1) in groups of R = rows_per_pass(MM)
 * (then single rows): 2 rows for MM = 1 (two independent dpbf16 chains per step), 4 for MM in
 * 2 .. QUAD_M (fewer loads per dpbf16: at MM = 5, 9 loads for 20 products instead of 7 for 10,
 * which lifts the cache-resident rate of a 5-token verify pass), 2 up to PAIR_M, else 1. For
 * decode, measured in situ (0.5B steps interleaved at ~50 GB/s): one row at a time was 4-6%
 * slower than two and four rows 5% slower, though back-to-back products alone had favoured one.
 * Every row's MM accumulators see the same additions in the same order whatever R, M and the
 * chunking, so the sums are bitwise those of a plain row-by-row loop and do not depend on M.
 *
 * Whole rows (park == NULL): the accumulators start at zero and each row is finished (lane sum,
 * K % 32 tail, bias, rounding) as soon as its group ends; each row prefetches PF_L2_BYTES ahead
 * of itself. Chunked (park != NULL): the accumulators are loaded from and stored back to
 * park[(n - n0) * MM ...], so a long row can be cut into chunks whose activations stay in L1;
 * the prefetch reads the next group's rows at the same offset, which is where the next group
 * reads. One call per thread and chunk, not per row: a row kernel called through a pointer for
 * each pair of short rows (K = 896: 28 lines a row) left a tenth of the read bandwidth unused. */
#define CHUNKED 1
#define PAIR_M 8 /* activation rows (from 2) up to which weight rows go at least two to a group */
#define QUAD_M 5 /* ... and four to a group from 2 rows up to this (4 x 5 accumulators) */

static inline int rows_per_pass(int MM) { return MM == 1 ? 2 : MM <= QUAD_M ? 4 : MM <= PAIR_M ? 2 : 1; }

/* y[m, n] from the sum s of row n's first K / 32 * 32 products with activation row m: the K % 32
 * tail, the bias, rounding. */
static inline __attribute__((always_inline)) void finish_sum_bf16(float s, const uint16_t *w, const uint16_t *x,
                                                                  const uint16_t *bias, void *y, int yf, int64_t K,
                                                                  int64_t N, int64_t m, int64_t n) {
    for (int64_t j = K / 32 * 32; j < K; j++) s += bf16_to_f32(w[n * K + j]) * bf16_to_f32(x[m * K + j]);
    const uint16_t v = f32_to_bf16(s + (bias ? bf16_to_f32(bias[n]) : 0.f));
    if (yf)
        ((float *)y)[m * N + n] = bf16_to_f32(v); /* the bf16 value, widened: what .float() gives */
    else
        ((uint16_t *)y)[m * N + n] = v;
}

/* y[m, n] from row n's accumulator for activation row m: lane sum, the K % 32 tail, the bias,
 * rounding. Takes the accumulator by value, so the caller's stay in registers. */
static inline __attribute__((always_inline)) void finish1_bf16(__m512 acc, const uint16_t *w, const uint16_t *x,
                                                               const uint16_t *bias, void *y, int yf, int64_t K,
                                                               int64_t N, int64_t m, int64_t n) {
    finish_sum_bf16(_mm512_reduce_add_ps(acc), w, x, bias, y, yf, K, N, m, n);
}

/* The same for the M accumulators of row n in acc[0 .. M). */
static void finish_bf16(const __m512 *acc, const uint16_t *w, const uint16_t *x, const uint16_t *bias, void *y, int yf,
                        int64_t M, int64_t K, int64_t N, int64_t n) {
    for (int64_t m = 0; m < M; m++) finish1_bf16(acc[m], w, x, bias, y, yf, K, N, m, n);
}

/* R and MM are compile-time constants at every call (always inlined), so the loops unroll and
 * the R * MM accumulators are registers. */
static inline __attribute__((always_inline)) void group_bf16(const int R, const int MM, const uint16_t *w,
                                                             const uint16_t *x, const uint16_t *bias, void *y, int yf,
                                                             int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n,
                                                             int64_t n0, int64_t n1, __m512 *park) {
    __m512 a[4 * MAX_M];
    const uint16_t *wr = w + n * K;
    const char *pf = park ? (const char *)(w + (n + 2 * R <= n1 ? n + R : n) * K) : (const char *)wr + PF_L2_BYTES;
#pragma GCC unroll 64
    for (int i = 0; i < R * MM; i++) a[i] = park ? park[(n - n0) * MM + i] : _mm512_setzero_ps();
    for (int64_t k = k0; k + 32 <= k1; k += 32) {
        __m512i wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            PREFETCH_L2(pf + 2 * (r * K + k));
            wv[r] = _mm512_loadu_si512((const void *)(wr + r * K + k));
        }
#pragma GCC unroll 16
        for (int m = 0; m < MM; m++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k));
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) a[r * MM + m] = _mm512_dpbf16_ps(a[r * MM + m], (__m512bh)wv[r], xv);
        }
    }
    if (park) {
#pragma GCC unroll 64
        for (int i = 0; i < R * MM; i++) park[(n - n0) * MM + i] = a[i];
    } else {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 16
            for (int m = 0; m < MM; m++) finish1_bf16(a[r * MM + m], w, x, bias, y, yf, K, N, m, n + r);
    }
}

#define PASS_BF16(MM)                                                                             \
    static void pass_bf16_##MM(const uint16_t *w, const uint16_t *x, const uint16_t *bias, void *y, int yf, \
                               int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1, __m512 *park) { \
        int64_t n = n0;                                                                           \
        if (rows_per_pass(MM) == 4)                                                               \
            for (; n + 4 <= n1; n += 4) group_bf16(4, MM, w, x, bias, y, yf, K, N, k0, k1, n, n0, n1, park); \
        if (rows_per_pass(MM) >= 2)                                                               \
            for (; n + 2 <= n1; n += 2) group_bf16(2, MM, w, x, bias, y, yf, K, N, k0, k1, n, n0, n1, park); \
        for (; n < n1; n++) group_bf16(1, MM, w, x, bias, y, yf, K, N, k0, k1, n, n0, n1, park);       \
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
EACH_M(ROW_F32)
typedef void (*row_f32_fn)(const float *, const float *, int64_t, float *);
#define REF_F32(MM) row_f32_##MM,
static const row_f32_fn ROWS_F32[MAX_M] = {EACH_M(REF_F32)};
#if defined(CHUNKED)
EACH_M(PASS_BF16)
typedef void (*pass_bf16_fn)(const uint16_t *, const uint16_t *, const uint16_t *, void *, int, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, __m512 *);
#define REF_PASS_BF16(MM) pass_bf16_##MM,
static const pass_bf16_fn PASSES_BF16[MAX_M] = {EACH_M(REF_PASS_BF16)};
#else
EACH_M(ROW_BF16)
typedef void (*row_bf16_fn)(const uint16_t *, const uint16_t *, int64_t, float *);
#define REF_BF16(MM) row_bf16_##MM,
static const row_bf16_fn ROWS_BF16[MAX_M] = {EACH_M(REF_BF16)};
#endif



/* ---- bf16 on AMX tiles ------------------------------------------------------------------ */

#if defined(CHUNKED) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* The tile products (verispec_gemv_bf16_tiles), for models loaded with amx=True, where the CPU has
 * AMX-BF16 and Linux grants the process its tile state. The weights are the A operand as they lie:
 * a tile is 16 weight rows x 32 columns of K (64 bytes of each row, the row stride 2K), so nothing
 * is re-laid out. The activations are the B operand, x^T in pairs: B row kk holds (x[m][2kk],
 * x[m][2kk + 1]) for the M activation rows (M columns, repacked per call: M * K values). The
 * accumulator tile C holds 16 weight rows x M fp32 sums; TDPBF16PS adds each output's pair
 * products of a step in the unit's fixed order, steps follow K, and column m of C reads only
 * activation row m, so the sums do not depend on M, on the other rows, or on the thread that runs
 * the block: a token's product in a 16-token verify pass is bitwise its one-token product, as with
 * the vector kernel. The two kernels round differently, so a model uses one of them for all its
 * products (a load option, not a per-call choice). The tile unit's time hardly grows with M: a
 * 16-row product costs about what one row does (the vector kernel's time grows with M past ~8
 * rows), while a one-row product streams its weights 10-25% slower than the vector kernel (32 row
 * streams a block instead of two). Weight rows past the last whole tile (N % 16), and matrices
 * with K < 32, go through the vector kernel: a given row always takes the same path. */
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config;

static int amx_granted = -1; /* -1: not asked yet; 0: refused (old kernel, no AMX); 1: granted */

static int amx_on(void) {
    if (amx_granted < 0) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: once per process */
        amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_granted;
}

#define AMX_BLOCK 32 /* weight rows per block: two tiles share each activation tile */


static void gemv_bf16_amx(const uint16_t *x, const uint16_t *w, const uint16_t *bias, void *y, int yf, int64_t M,
                          int64_t K, int64_t N, int nthreads) {
    const int64_t K32 = K / 32 * 32, NT = N / 16 * 16, KK = K32 / 2;
    uint32_t *xb = NULL; /* B: xb[kk * M + m] = the pair (x[m][2kk], x[m][2kk + 1]); M = 1: x itself */
    if (M > 1) {
        xb = (uint32_t *)aligned_alloc(64, ((size_t)(KK * M) * 4 + 63) / 64 * 64);
        for (int64_t m = 0; m < M; m++)
            for (int64_t kk = 0; kk < KK; kk++) {
                uint32_t v;
                memcpy(&v, x + m * K + 2 * kk, 4);
                xb[kk * M + m] = v;
            }
    }
    const void *bsrc = M > 1 ? (const void *)xb : (const void *)x;
    const int64_t nblocks = (NT + AMX_BLOCK - 1) / AMX_BLOCK, tail = NT < N; /* + one block: rows NT .. N */
    const int nreg = nthreads > 0 ? nthreads : 1;
    steal_region regions[nreg];
    steal_init(regions, nreg, nblocks + tail);
#pragma omp parallel num_threads(nreg)
    {
        const int id = omp_get_thread_num();
        amx_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        cfg.rows[0] = cfg.rows[1] = 16; /* C: 16 weight rows x M sums */
        cfg.colsb[0] = cfg.colsb[1] = (uint16_t)(4 * M);
        cfg.rows[2] = cfg.rows[3] = 16; /* A: 16 weight rows x 32 bf16 */
        cfg.colsb[2] = cfg.colsb[3] = 64;
        cfg.rows[4] = cfg.rows[7] = 16; /* B: 16 pairs of K x M activation rows */
        cfg.colsb[4] = cfg.colsb[7] = (uint16_t)(4 * M);
        cfg.rows[5] = cfg.rows[6] = 16; /* A again: odd steps load while even steps multiply */
        cfg.colsb[5] = cfg.colsb[6] = 64;
        _tile_loadconfig(&cfg);
        float c[2][16 * MAX_M];
        for (int64_t blk; (blk = steal_next(regions, nreg, id)) >= 0;) {
            if (blk == nblocks) { /* the rows past the last whole tile */
                PASSES_BF16[M - 1](w, x, bias, y, yf, K, N, 0, K32, NT, N, NULL);
                continue;
            }
            const int64_t n0 = blk * AMX_BLOCK;
            const uint16_t *w0 = w + n0 * K, *w1 = w0 + 16 * K;
            const char *b = (const char *)bsrc;
            const int two = n0 + 32 <= NT;
            _tile_zero(0);
            if (two) {
                _tile_zero(1);
                int64_t k = 0;
                for (; k + 64 <= K32; k += 64, b += 128 * M) {
                    _tile_loadd(4, b, 4 * M);
                    _tile_loadd(2, w0 + k, 2 * K);
                    _tile_loadd(3, w1 + k, 2 * K);
                    _tile_loadd(7, b + 64 * M, 4 * M);
                    _tile_loadd(5, w0 + k + 32, 2 * K);
                    _tile_loadd(6, w1 + k + 32, 2 * K);
                    _tile_dpbf16ps(0, 2, 4);
                    _tile_dpbf16ps(1, 3, 4);
                    _tile_dpbf16ps(0, 5, 7);
                    _tile_dpbf16ps(1, 6, 7);
                }
                if (k < K32) {
                    _tile_loadd(4, b, 4 * M);
                    _tile_loadd(2, w0 + k, 2 * K);
                    _tile_loadd(3, w1 + k, 2 * K);
                    _tile_dpbf16ps(0, 2, 4);
                    _tile_dpbf16ps(1, 3, 4);
                }
                _tile_stored(1, c[1], 4 * M);
            } else {
                for (int64_t k = 0; k < K32; k += 32, b += 64 * M) {
                    _tile_loadd(4, b, 4 * M);
                    _tile_loadd(2, w0 + k, 2 * K);
                    _tile_dpbf16ps(0, 2, 4);
                }
            }
            _tile_stored(0, c[0], 4 * M);
            for (int t = 0; t <= two; t++)
                for (int64_t i = 0; i < 16; i++)
                    for (int64_t m = 0; m < M; m++)
                        finish_sum_bf16(c[t][i * M + m], w, x, bias, y, yf, K, N, m, n0 + 16 * t + i);
        }
        _tile_release();
    }
    free(xb);
}
#endif

int verispec_gemv_tiles_available(void) { /* built for AMX-BF16 and granted the tile state */
#if defined(AMX)
    return amx_on();
#else
    return 0;
#endif
}

/* M must be in 1..MAX_M (the caller splits larger M). Whole rows: blocks of about STEAL_BYTES of
 * weights, each thread through its own range, then stealing from the back of the others' (steal.h).
 * Rows whose M activations outgrow X_L1_BYTES are cut into K-chunks: the rows go in blocks of about
 * CHUNK_STEAL_BYTES, rebalanced the same way, and a thread runs chunk c over its block's rows before
 * chunk c + 1, the accumulators parked in a per-thread buffer (a fixed share of the rows per
 * thread, as before, waited up to 1.5 ms a 5-token 0.5B verify pass on the slower vCPU). Either way a row is computed by one thread in one order: the result does not depend on
 * the thread count. */
static void gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, void *y, int yf, int64_t M,
                      int64_t K, int64_t N, int nthreads) {
#if defined(CHUNKED)
    const int64_t K32 = K / 32 * 32;
    int64_t KC = K32; /* K32 in equal chunks of at most X_L1_BYTES of activations */
    if (2 * M * K32 > X_L1_BYTES) {
        const int64_t nchunks = (2 * M * K32 + X_L1_BYTES - 1) / X_L1_BYTES;
        KC = (K32 / 32 + nchunks - 1) / nchunks * 32;
    }
    const pass_bf16_fn pass = PASSES_BF16[M - 1];
    /* blocks of ~STEAL_BYTES of weights (whole rows) or ~CHUNK_STEAL_BYTES (K-chunks), rebalanced
     * (steal.h); rows per block in whole groups of 4 */
    const int whole = K32 == 0 || KC == K32;
    int64_t BR = K > 0 ? (whole ? STEAL_BYTES : CHUNK_STEAL_BYTES) / (2 * K) / 4 * 4 : N;
    if (BR < 4) BR = 4;
    const int64_t nblocks = (N + BR - 1) / BR;
    const int nreg = nthreads > 0 ? nthreads : 1;
    steal_region regions[nreg];
    steal_init(regions, nreg, nblocks);
#pragma omp parallel num_threads(nreg)
    {
        const int id = omp_get_thread_num();
        /* K-chunks: within a block, chunk c over all its rows before chunk c + 1, the accumulators
         * parked in a per-thread buffer; whole rows when it cannot be had (the same sums) */
        __m512 *park = whole ? NULL : (__m512 *)aligned_alloc(64, (size_t)(BR * M) * sizeof(__m512));
        for (int64_t blk; (blk = steal_next(regions, nreg, id)) >= 0;) {
            const int64_t n0 = blk * BR, n1 = n0 + BR < N ? n0 + BR : N;
            if (!park) {
                pass(w, x, bias, y, yf, K, N, 0, K32, n0, n1, NULL);
                continue;
            }
            for (int64_t i = 0; i < (n1 - n0) * M; i++) park[i] = _mm512_setzero_ps();
            for (int64_t k0 = 0; k0 < K32; k0 += KC) pass(w, x, bias, y, yf, K, N, k0, k0 + KC < K32 ? k0 + KC : K32, n0, n1, park);
            for (int64_t n = n0; n < n1; n++) finish_bf16(park + (n - n0) * M, w, x, bias, y, yf, M, K, N, n);
        }
        free(park);
    }
#else
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float acc[MAX_M];
        ROWS_BF16[M - 1](w + n * K, x, K, acc);
        float b = bias ? bf16_to_f32(bias[n]) : 0.f;
        for (int64_t m = 0; m < M; m++) {
            const uint16_t v = f32_to_bf16(acc[m] + b);
            if (yf)
                ((float *)y)[m * N + n] = bf16_to_f32(v);
            else
                ((uint16_t *)y)[m * N + n] = v;
        }
    }
#endif
}

void verispec_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                        int64_t K, int64_t N, int nthreads) {
    gemv_bf16(x, w, bias, y, 0, M, K, N, nthreads);
}

/* The same products on AMX tiles (see above); where the tiles are unavailable (the caller checks
 * verispec_gemv_tiles_available first), or K < 32, or N < 16, the vector kernel's. */
static void gemv_bf16_tiles(const uint16_t *x, const uint16_t *w, const uint16_t *bias, void *y, int yf, int64_t M,
                            int64_t K, int64_t N, int nthreads) {
#if defined(AMX)
    if (K >= 32 && N >= 16 && amx_on()) {
        gemv_bf16_amx(x, w, bias, y, yf, M, K, N, nthreads);
        return;
    }
#endif
    gemv_bf16(x, w, bias, y, yf, M, K, N, nthreads);
}

void verispec_gemv_bf16_tiles(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                              int64_t K, int64_t N, int nthreads) {
    gemv_bf16_tiles(x, w, bias, y, 0, M, K, N, nthreads);
}

void verispec_gemv_bf16_tiles_f32out(const uint16_t *x, const uint16_t *w, const uint16_t *bias, float *y, int64_t M,
                                     int64_t K, int64_t N, int nthreads) {
    gemv_bf16_tiles(x, w, bias, y, 1, M, K, N, nthreads);
}

/* The same product, each bf16 result written widened to fp32 (y [M, N] float): a bf16 model's
 * logits as the fp32 the decoder returns, without a second pass over them. */
void verispec_gemv_bf16_f32out(const uint16_t *x, const uint16_t *w, const uint16_t *bias, float *y, int64_t M,
                               int64_t K, int64_t N, int nthreads) {
    gemv_bf16(x, w, bias, y, 1, M, K, N, nthreads);
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
 * software prefetch into L2 as the bf16 products, a few percent faster here than without, and the
 * same rebalanced split), so benchmarks can state decode speed against a bandwidth measured in the
 * same run by code as tight as the kernels themselves. Returns the sum (blocks added in an order
 * that varies) so the reads cannot be optimised away. */
double verispec_stream_read(const float *p, int64_t n, int nthreads) {
    double total = 0.0;
    const int nreg = nthreads > 0 ? nthreads : 1;
    steal_region regions[nreg]; /* blocks of 4096 floats, rebalanced as the bf16 products are */
    steal_init(regions, nreg, n / 4096);
#pragma omp parallel num_threads(nreg) reduction(+ : total)
    for (int64_t c; (c = steal_next(regions, nreg, omp_get_thread_num())) >= 0;) {
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
