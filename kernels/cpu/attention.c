/* Verify attention for a few queries per row (decode: T = 1, verify: T = k), on CPU.
 *
 * The kernel contract's verify_attention (kernels/reference.py): q [B, H, T, D], caches
 * [B, H_kv, S_max, D] already holding the T new tokens, query t of row b sees slots
 * 0 .. positions[b] + t (causal, bottom-right aligned); scores and softmax in fp32; out
 * [B, H, T, D] in q's dtype (bf16 or fp32, shared by q, caches and out).
 *
 * Token trees: with a mask [B, T, T] (uint8, the contract's active_mask), query t of row b sees
 * every prior slot 0 .. positions[b] - 1 and new slot positions[b] + j iff mask[b, t, j]. Every
 * query then covers all positions[b] + T slots, the hidden ones with weight exactly 0 (score
 * -inf): adding them changes no sum, so a causal mask gives bitwise the mask-free result. A query
 * that sees no slot at all (positions[b] = 0, an all-false row) gets NaN, as the reference's
 * softmax over nothing does.
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

/* One (row, head): T queries, query t sees slots 0 .. S0 - 1 + t, or with mask ([T, T], this
 * row's) slots 0 .. S0 - 2 and S0 - 1 + j where mask[t, j]. Generic path: any D, any ISA. */
static void head_generic(const float *qf, const char *kb, const char *vb, int64_t S0, int64_t T, int64_t D,
                         int64_t esize, int is_bf16, float scale, const uint8_t *mask, float *p, float *acc,
                         float *outf) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t S = mask ? S0 - 1 + T : S0 + t;
        const float *q = qf + t * D;
        float m = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            p[j] = mask && j >= S0 - 1 && !mask[t * T + j - (S0 - 1)] ? -INFINITY
                                                                     : dot_row(q, kb + j * D * esize, D, is_bf16) * scale;
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

/* The sum of a's 16 lanes by a fixed tree: lane i + lane i + 8, then i + i + 4, then (0 + 2) +
 * (1 + 3). */
static inline float hsum1(__m512 a) {
    const __m256 t3 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)), _mm512_castps512_ps256(a));
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}

/* Lane n = hsum1(a[n]) for 16 vectors at once, bit for bit (the same additions of the same
 * values): the four levels of hsum1's tree, each combining two vectors' lanes with two shuffles
 * and one add. 45 operations for 16 sums instead of ~8 each. The pairing below puts key n in
 * output lane n. */
#define HS_L1(x, y) _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0xEE), _mm512_shuffle_f32x4(x, y, 0x44))
#define HS_L2(x, y) _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0xDD), _mm512_shuffle_f32x4(x, y, 0x88))
#define HS_L3(x, y) _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE))
#define HS_L4(x, y) _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD))
static inline __m512 hsum16(const __m512 *a) {
    const __m512 r1 = HS_L2(HS_L1(a[0], a[4]), HS_L1(a[8], a[12])), r2 = HS_L2(HS_L1(a[1], a[5]), HS_L1(a[9], a[13]));
    const __m512 r3 = HS_L2(HS_L1(a[2], a[6]), HS_L1(a[10], a[14])), r4 = HS_L2(HS_L1(a[3], a[7]), HS_L1(a[11], a[15]));
    return HS_L4(HS_L3(r1, r2), HS_L3(r3, r4));
}

/* Lane accumulators of one query's score with key row kr: D / 16 FMAs (fp32) or D / 32 dpbf16
 * (bf16 pairs multiplied exactly, accumulated in fp32) in order from zero. */
static inline __attribute__((always_inline)) __m512 score_lanes(const float *q, const __m512i *qv, const char *kr,
                                                                const int NV, int is_bf16) {
    __m512 a = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
    if (is_bf16) {
        for (int v = 0; v < NV / 2; v++) a = _mm512_dpbf16_ps(a, (__m512bh)qv[v], (__m512bh)_mm512_loadu_si512(kr + 64 * v));
        return a;
    }
#endif
    for (int v = 0; v < NV; v++) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), load16(kr, 16 * v, is_bf16), a);
    return a;
}

/* V row j's 64 values from d0 as fp32 in vr[4]. bf16 rows are widened 32 at a time, the even
 * elements in one register and the odd ones in the next (a fixed permutation of the lanes, undone
 * on the way out): one operation per 16 values instead of two. */
static inline __attribute__((always_inline)) void load_v64(const char *row, int d0, int is_bf16, __m512 *vr) {
    if (is_bf16) {
        const __m512i lo = _mm512_loadu_si512(row + 2 * d0), hi = _mm512_loadu_si512(row + 2 * d0 + 64);
        const __m512i m = _mm512_set1_epi32((int)0xffff0000u);
        vr[0] = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)); /* elements d0 + 0, 2, ..., 30 */
        vr[1] = _mm512_castsi512_ps(_mm512_and_si512(lo, m));   /* d0 + 1, 3, ..., 31 */
        vr[2] = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)); /* d0 + 32, 34, ..., 62 */
        vr[3] = _mm512_castsi512_ps(_mm512_and_si512(hi, m));   /* d0 + 33, 35, ..., 63 */
    } else
        for (int v = 0; v < 4; v++) vr[v] = _mm512_loadu_ps((const float *)row + d0 + 16 * v);
}

/* p . V over slots [j0, j1) for NQ queries that all see them, into their block and running sums:
 * slot j's weight p[u * Sp + j] times its V row, added in slot order; a block's sum goes into the
 * total after each VBLOCK-th slot (by absolute index). NQ is a compile-time constant, so the sums
 * live in registers for the span and in blk / tot between spans. */
static inline __attribute__((always_inline)) void pv_span(const int NQ, const float *p, int64_t Sp, const char *vb,
                                                          int64_t j0, int64_t j1, int64_t D, int d0, int64_t esize,
                                                          int is_bf16, __m512 blk[TC][4], __m512 tot[TC][4]) {
    __m512 b[TC][4], tt[TC][4];
    for (int u = 0; u < NQ; u++)
        for (int v = 0; v < 4; v++) b[u][v] = blk[u][v], tt[u][v] = tot[u][v];
    for (int64_t j = j0; j < j1; j++) {
        __m512 vr[4];
        load_v64(vb + j * D * esize, d0, is_bf16, vr);
        for (int u = 0; u < NQ; u++) {
            const __m512 w = _mm512_set1_ps(p[u * Sp + j]);
            for (int v = 0; v < 4; v++) b[u][v] = _mm512_fmadd_ps(w, vr[v], b[u][v]);
        }
        if ((j + 1) % VBLOCK == 0)
            for (int u = 0; u < NQ; u++)
                for (int v = 0; v < 4; v++) {
                    tt[u][v] = _mm512_add_ps(tt[u][v], b[u][v]);
                    b[u][v] = _mm512_setzero_ps();
                }
    }
    for (int u = 0; u < NQ; u++)
        for (int v = 0; v < 4; v++) blk[u][v] = b[u][v], tot[u][v] = tt[u][v];
}

/* Fast path, D = 16 * NV (NV = 4 or 8). With mask ([T, T], this row's), every query covers slots
 * 0 .. S0 - 2 + T, its hidden new slots scored -inf (weight 0). Each query's arithmetic is the
 * same sequence whatever T is:
 * - scores: score_lanes, then hsum1's lane tree (16 keys at a time by hsum16, bitwise the same);
 * - softmax: exp of s - max, summed in 16 lanes (slot j in lane j % 16), then reduced;
 * - p . V: slots in blocks of VBLOCK (by absolute slot index), summed in order within a block,
 *   block sums added to the total in order; the total divided by the softmax sum. Queries share
 *   each pass over V, TC at a time. */
static inline __attribute__((always_inline)) void head_fast(const float *qf, const uint16_t *qbf, const char *kb, const char *vb,
                                                            int64_t S0, int64_t T, const int NV, int64_t esize,
                                                            int is_bf16, float scale, const uint8_t *mask, float *p,
                                                            int64_t Sp, float *outf) {
    const int64_t D = 16 * NV;
    const __m512 scale16 = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < T; t++) { /* scores of query t: slots 0 .. S0 - 1 + t (mask: S0 - 2 + T) */
        const int64_t S = mask ? S0 - 1 + T : S0 + t;
        float *pt = p + t * Sp;
        const float *q = qf + t * D;
        __m512i qv[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        if (is_bf16 && qbf)
            for (int v = 0; v < NV / 2; v++) qv[v] = _mm512_loadu_si512(qbf + t * D + 32 * v);
        int64_t j = 0;
        for (; j + 16 <= S; j += 16) {
            __m512 a[16];
            for (int u = 0; u < 16; u++) a[u] = score_lanes(q, qv, kb + (j + u) * D * esize, NV, is_bf16);
            _mm512_storeu_ps(pt + j, _mm512_mul_ps(hsum16(a), scale16));
        }
        for (; j < S; j++) pt[j] = hsum1(score_lanes(q, qv, kb + j * D * esize, NV, is_bf16)) * scale;
        if (mask) /* hidden new slots: -inf, weight exactly 0 after the exp (or NaN if nothing is seen) */
            for (int64_t i = 0; i < T; i++)
                if (!mask[t * T + i]) pt[S0 - 1 + i] = -INFINITY;
    }
    float sum[16];
    for (int64_t t = 0; t < T; t++) { /* softmax numerators in place, and their sum */
        float *pt = p + t * Sp;
        const int64_t S = mask ? S0 - 1 + T : S0 + t;
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
            const float *pq = p + t0 * Sp;
            const int64_t shared = mask ? S0 - 1 + T : S0 + t0; /* slots every one of the tc queries covers */
            switch (tc) { /* a compile-time query count, so the sums stay in registers */
            case 1: pv_span(1, pq, Sp, vb, 0, shared, D, d0, esize, is_bf16, blk, tot); break;
            case 2: pv_span(2, pq, Sp, vb, 0, shared, D, d0, esize, is_bf16, blk, tot); break;
            case 3: pv_span(3, pq, Sp, vb, 0, shared, D, d0, esize, is_bf16, blk, tot); break;
            case 4: pv_span(4, pq, Sp, vb, 0, shared, D, d0, esize, is_bf16, blk, tot); break;
            default: pv_span(TC, pq, Sp, vb, 0, shared, D, d0, esize, is_bf16, blk, tot); break;
            }
            const int64_t last = mask ? shared : S0 + t0 + tc - 1;
            for (int64_t j = shared; j < last; j++) { /* the last tc - 1 slots: later queries only (causal) */
                __m512 vr[4];
                load_v64(vb + j * D * esize, d0, is_bf16, vr);
                for (int64_t u = j - shared + 1; u < tc; u++) { /* query u sees slots < S0 + t0 + u */
                    const __m512 w = _mm512_set1_ps(pq[u * Sp + j]);
                    for (int v = 0; v < 4; v++) blk[u][v] = _mm512_fmadd_ps(w, vr[v], blk[u][v]);
                    if ((j + 1) % VBLOCK == 0)
                        for (int v = 0; v < 4; v++) {
                            tot[u][v] = _mm512_add_ps(tot[u][v], blk[u][v]);
                            blk[u][v] = _mm512_setzero_ps();
                        }
                }
            }
            for (int u = 0; u < tc; u++) {
                const __m512 s = _mm512_set1_ps(sum[t0 + u]);
                float o[64];
                for (int v = 0; v < 4; v++) _mm512_storeu_ps(o + 16 * v, _mm512_div_ps(_mm512_add_ps(tot[u][v], blk[u][v]), s));
                float *dst = outf + (t0 + u) * D + d0;
                if (is_bf16) /* undo the even/odd lanes: o[0:16] = elements 0, 2, .., o[16:32] = 1, 3, .. */
                    for (int i = 0; i < 16; i++) {
                        dst[2 * i] = o[i], dst[2 * i + 1] = o[16 + i];
                        dst[32 + 2 * i] = o[32 + i], dst[33 + 2 * i] = o[48 + i];
                    }
                else
                    memcpy(dst, o, sizeof o);
            }
        }
}
#endif

/* Returns 0, or -1 when a scratch buffer could not be allocated. positions must already be
 * validated (0 <= positions[b] and positions[b] + T <= S_max), H a multiple of H_kv, T <= 16.
 * mask: [B, T, T] (nonzero: query t sees new slot j), or NULL for causal. */
int verispec_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *positions,
                       const uint8_t *mask, void *out,
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
                const int64_t S0 = positions[b] + 1; /* slots query 0 sees (causal) */
                const uint8_t *mb = mask ? mask + b * T * T : NULL;
#if defined(__AVX512F__)
                if (fast && D == 64)
                    head_fast(qf, is_bf16 ? (const uint16_t *)q + q0 : NULL, kb, vb, S0, T, 4, esize, is_bf16, scale, mb, p, S_vis, outf);
                else if (fast)
                    head_fast(qf, is_bf16 ? (const uint16_t *)q + q0 : NULL, kb, vb, S0, T, 8, esize, is_bf16, scale, mb, p, S_vis, outf);
                else
#endif
                    head_generic(qf, kb, vb, S0, T, D, esize, is_bf16, scale, mb, p, acc, outf);
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
