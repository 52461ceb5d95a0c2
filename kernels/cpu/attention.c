/* Verify attention for a few queries per row (decode: T = 1, verify: T = k), on CPU.
 *
 * The kernel contract's verify_attention (kernels/reference.py): q [B, H, T, D], caches
 * [B, H_kv, S_max, D] already holding the T new tokens, query t of row b sees slots
 * 0 .. positions[b] + t (causal, bottom-right aligned); scores and softmax in fp32; out
 * [B, H, T, D] in q's dtype (bf16 or fp32, shared by q, caches and out).
 *
 * At decode sizes the reference's dozen ATen calls per layer (two cache casts to fp32, two
 * matmuls, softmax, mask, casts back) cost more than the arithmetic; this does it in one call,
 * reading each cache row once per query in its stored dtype. Every query is computed on its own,
 * in the same order whatever T is, so a token's output in a k-token verify pass is bitwise the
 * one it gets in a one-token decode step.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "bf16.h"
#include "vmath.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* dot(qf[0:D], row[0:D]) with the row in its stored dtype: 16-lane partial sums when D is a
 * multiple of 16 and AVX512F is there, then a fixed-order reduction; else a scalar loop. */
static inline float dot_row(const float *qf, const void *row, int64_t D, int is_bf16) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m512 r = is_bf16 ? bf16x16_to_f32((const uint16_t *)row + d) : _mm512_loadu_ps((const float *)row + d);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), r, a);
        }
        return _mm512_reduce_add_ps(a);
    }
#endif
    float s = 0.f;
    for (int64_t d = 0; d < D; d++) s += qf[d] * ld_any(row, d, is_bf16);
    return s;
}

/* a[0:D] += w * row[0:D], the row in its stored dtype. */
static inline void axpy_row(float *restrict a, float w, const void *row, int64_t D, int is_bf16) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        const __m512 wv = _mm512_set1_ps(w);
        for (int64_t d = 0; d < D; d += 16) {
            __m512 r = is_bf16 ? bf16x16_to_f32((const uint16_t *)row + d) : _mm512_loadu_ps((const float *)row + d);
            _mm512_storeu_ps(a + d, _mm512_fmadd_ps(wv, r, _mm512_loadu_ps(a + d)));
        }
        return;
    }
#endif
    for (int64_t d = 0; d < D; d++) a[d] += w * ld_any(row, d, is_bf16);
}

#define NPART 8 /* partial sums per reduction over slots (generic path) */

/* One (row, head): T queries, query t sees slots 0 .. S0 - 1 + t. Generic path: any D, any ISA. */
static void head_generic(const float *qf, const char *kb, const char *vb, int64_t S0, int64_t T, int64_t D,
                         int64_t esize, int is_bf16, float scale, float *p, float *acc, float *outf) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t S = S0 + t;
        const float *q = qf + t * D;
        float m = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            p[j] = dot_row(q, kb + j * D * esize, D, is_bf16) * scale;
            if (p[j] > m) m = p[j];
        }
        /* exp(s - max), then sum_j e_j * v_j / sum_j e_j; both sums over j are kept in NPART
         * interleaved partial sums (slot j in part j % NPART), added in a fixed order at the end */
        float part[NPART] = {0.f};
        for (int64_t j = 0; j < S; j++) {
            p[j] = expf(p[j] - m);
            part[j % NPART] += p[j];
        }
        float sum = 0.f;
        for (int r = 0; r < NPART; r++) sum += part[r];
        for (int64_t i = 0; i < NPART * D; i++) acc[i] = 0.f;
        for (int64_t j = 0; j < S; j++) axpy_row(acc + (j % NPART) * D, p[j], vb + j * D * esize, D, is_bf16);
        for (int r = 1; r < NPART; r++)
            for (int64_t d = 0; d < D; d++) acc[d] += acc[r * D + d];
        for (int64_t d = 0; d < D; d++) outf[t * D + d] = acc[d] / sum;
    }
}

#if defined(__AVX512F__)
static inline __m512 load16(const char *row, int64_t d, int is_bf16) {
    return is_bf16 ? bf16x16_to_f32((const uint16_t *)row + d) : _mm512_loadu_ps((const float *)row + d);
}

#define TC 5     /* queries whose p . V sums share one pass over V (5 x 4 accumulators in registers) */
#define VBLOCK 32 /* slots per block of the p . V sum: a block's sum is added to the total */

/* Fast path, D = 16 * NV (NV = 4 or 8). Every cache row is read once for all T queries; each
 * query's arithmetic is the same sequence whatever T is:
 * - scores: dot over D in 16 lanes, D / 16 FMAs in order, then a fixed-order lane reduction;
 * - softmax: exp of s - max, summed in 16 lanes (slot j in lane j % 16), then reduced;
 * - p . V: slots in blocks of VBLOCK (by absolute slot index), summed in order within a block,
 *   block sums added to the total in order; the total divided by the softmax sum. */
static inline __attribute__((always_inline)) void head_fast(const float *qf, const uint16_t *qbf, const char *kb, const char *vb,
                                                            int64_t S0, int64_t T, const int NV, int64_t esize,
                                                            int is_bf16, float scale, float *p, int64_t Sp,
                                                            float *outf) {
    const int64_t D = 16 * NV;
    for (int64_t t = 0; t < T; t++) { /* scores of query t: slots 0 .. S0 - 1 + t, four at a time */
        const int64_t S = S0 + t;
        float *pt = p + t * Sp;
#if defined(__AVX512BF16__)
        if (is_bf16) { /* bf16 pairs multiplied exactly, accumulated in fp32 (vdpbf16ps) */
            __m512bh qv[4];
            for (int v = 0; v < NV / 2; v++) qv[v] = (__m512bh)_mm512_loadu_si512(qbf + t * D + 32 * v);
            int64_t j = 0;
            for (; j + 4 <= S; j += 4) {
                __m512 a[4];
                for (int u = 0; u < 4; u++) {
                    const uint16_t *kr = (const uint16_t *)kb + (j + u) * D;
                    a[u] = _mm512_setzero_ps();
                    for (int v = 0; v < NV / 2; v++)
                        a[u] = _mm512_dpbf16_ps(a[u], qv[v], (__m512bh)_mm512_loadu_si512(kr + 32 * v));
                }
                for (int u = 0; u < 4; u++) pt[j + u] = _mm512_reduce_add_ps(a[u]) * scale;
            }
            for (; j < S; j++) {
                const uint16_t *kr = (const uint16_t *)kb + j * D;
                __m512 a = _mm512_setzero_ps();
                for (int v = 0; v < NV / 2; v++) a = _mm512_dpbf16_ps(a, qv[v], (__m512bh)_mm512_loadu_si512(kr + 32 * v));
                pt[j] = _mm512_reduce_add_ps(a) * scale;
            }
            continue;
        }
#endif
        const float *q = qf + t * D;
        int64_t j = 0;
        for (; j + 4 <= S; j += 4) {
            __m512 a[4];
            for (int u = 0; u < 4; u++) {
                a[u] = _mm512_setzero_ps();
                for (int v = 0; v < NV; v++)
                    a[u] = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), load16(kb + (j + u) * D * esize, 16 * v, is_bf16), a[u]);
            }
            for (int u = 0; u < 4; u++) pt[j + u] = _mm512_reduce_add_ps(a[u]) * scale;
        }
        for (; j < S; j++) {
            __m512 a = _mm512_setzero_ps();
            for (int v = 0; v < NV; v++)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), load16(kb + j * D * esize, 16 * v, is_bf16), a);
            pt[j] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    float sum[16];
    for (int64_t t = 0; t < T; t++) { /* softmax numerators in place, and their sum */
        float *pt = p + t * Sp;
        const int64_t S = S0 + t;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < S; j += 16) {
            const __mmask16 k = (__mmask16)(S - j >= 16 ? 0xffff : (1u << (S - j)) - 1);
            mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, pt + j));
        }
        float m = _mm512_reduce_max_ps(mv);
        for (int64_t j = 0; j < S; j++) /* NaN scores: max ignores them above, so fold them in */
            if (pt[j] != pt[j]) m = pt[j];
        const __m512 m16 = _mm512_set1_ps(m);
        __m512 sv = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; j += 16) {
            const __mmask16 k = (__mmask16)(S - j >= 16 ? 0xffff : (1u << (S - j)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, pt + j), m16));
            _mm512_mask_storeu_ps(pt + j, k, e);
            sv = _mm512_mask_add_ps(sv, k, sv, e);
        }
        sum[t] = _mm512_reduce_add_ps(sv);
    }
    for (int d0 = 0; d0 < D; d0 += 64) /* p . V, 64 lanes and TC queries at a time */
        for (int64_t t0 = 0; t0 < T; t0 += TC) {
            const int64_t tc = T - t0 < TC ? T - t0 : TC;
            __m512 blk[TC][4], tot[TC][4];
            for (int u = 0; u < TC; u++)
                for (int v = 0; v < 4; v++) blk[u][v] = tot[u][v] = _mm512_setzero_ps();
            const int64_t S_end = S0 + t0 + tc - 1;
            for (int64_t j = 0; j < S_end; j++) {
                __m512 vr[4];
                for (int v = 0; v < 4; v++) vr[v] = load16(vb + j * D * esize, d0 + 16 * v, is_bf16);
                for (int u = 0; u < TC; u++)
                    if (u < tc && j < S0 + t0 + u) {
                        const __m512 w = _mm512_set1_ps(p[(t0 + u) * Sp + j]);
                        for (int v = 0; v < 4; v++) blk[u][v] = _mm512_fmadd_ps(w, vr[v], blk[u][v]);
                    }
                if ((j + 1) % VBLOCK == 0)
                    for (int u = 0; u < TC; u++)
                        for (int v = 0; v < 4; v++) {
                            tot[u][v] = _mm512_add_ps(tot[u][v], blk[u][v]);
                            blk[u][v] = _mm512_setzero_ps();
                        }
            }
            for (int u = 0; u < tc; u++) {
                const __m512 s = _mm512_set1_ps(sum[t0 + u]);
                for (int v = 0; v < 4; v++)
                    _mm512_storeu_ps(outf + (t0 + u) * D + d0 + 16 * v,
                                     _mm512_div_ps(_mm512_add_ps(tot[u][v], blk[u][v]), s));
            }
        }
}
#endif

/* Returns 0, or -1 when a scratch buffer could not be allocated. positions must already be
 * validated (0 <= positions[b] and positions[b] + T <= S_max), H a multiple of H_kv, T <= 16. */
int verispec_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *positions, void *out,
                       int64_t B, int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t S_max, float scale,
                       int is_bf16, int nthreads) {
    const int64_t G = H / H_kv, esize = is_bf16 ? 2 : 4;
    int64_t S_vis = 1;
    for (int64_t b = 0; b < B; b++)
        if (positions[b] + T > S_vis) S_vis = positions[b] + T;
    int fast = 0;
#if defined(__AVX512F__)
    fast = (D == 64 || D == 128) && T <= 16;
#endif
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *p = (float *)malloc((size_t)(S_vis * (fast ? T : 1)) * sizeof(float));
        float *qf = (float *)malloc((size_t)(T * D) * sizeof(float));
        float *outf = (float *)malloc((size_t)(T * D) * sizeof(float));
        float *acc = fast ? NULL : (float *)malloc((size_t)(NPART * D) * sizeof(float));
        const int ok = p && qf && outf && (fast || acc);
        if (!ok) failed = 1;
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++) {
                if (!ok) continue;
                const int64_t cache_row0 = (b * H_kv + h / G) * S_max; /* KV head h / G, slot 0 */
                const char *kb = (const char *)k_cache + cache_row0 * D * esize;
                const char *vb = (const char *)v_cache + cache_row0 * D * esize;
                const int64_t q0 = (b * H + h) * T * D;
                for (int64_t i = 0; i < T * D; i++) qf[i] = ld_any(q, q0 + i, is_bf16);
                const int64_t S0 = positions[b] + 1; /* slots query 0 sees */
#if defined(__AVX512F__)
                if (fast && D == 64)
                    head_fast(qf, is_bf16 ? (const uint16_t *)q + q0 : NULL, kb, vb, S0, T, 4, esize, is_bf16, scale, p, S_vis, outf);
                else if (fast)
                    head_fast(qf, is_bf16 ? (const uint16_t *)q + q0 : NULL, kb, vb, S0, T, 8, esize, is_bf16, scale, p, S_vis, outf);
                else
#endif
                    head_generic(qf, kb, vb, S0, T, D, esize, is_bf16, scale, p, acc, outf);
                if (is_bf16)
                    for (int64_t i = 0; i < T * D; i++) ((uint16_t *)out)[q0 + i] = f32_to_bf16(outf[i]);
                else
                    memcpy((float *)out + q0, outf, (size_t)(T * D) * sizeof(float));
            }
        free(p);
        free(qf);
        free(outf);
        free(acc);
    }
    return failed ? -1 : 0;
}
