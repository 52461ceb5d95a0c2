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
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Element i of a row of dtype bf16 (is_bf16) or fp32. */
static inline float load(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

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
    for (int64_t d = 0; d < D; d++) s += qf[d] * load(row, d, is_bf16);
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
    for (int64_t d = 0; d < D; d++) a[d] += w * load(row, d, is_bf16);
}

#define NPART 8 /* partial sums per reduction over slots */

/* Returns 0, or -1 when a scratch buffer could not be allocated. positions must already be
 * validated (0 <= positions[b] and positions[b] + T <= S_max) and H a multiple of H_kv. */
int verispec_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *positions, void *out,
                       int64_t B, int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t S_max, float scale,
                       int is_bf16, int nthreads) {
    const int64_t G = H / H_kv, esize = is_bf16 ? 2 : 4;
    int64_t S_vis = 0;
    for (int64_t b = 0; b < B; b++)
        if (positions[b] + T > S_vis) S_vis = positions[b] + T;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *p = (float *)malloc((size_t)(S_vis > 0 ? S_vis : 1) * sizeof(float));
        float *qf = (float *)malloc((size_t)D * sizeof(float));
        float *acc = (float *)malloc((size_t)(NPART * D) * sizeof(float));
        if (!p || !qf || !acc) failed = 1;
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++) {
                if (!p || !qf || !acc) continue;
                const int64_t cache_row0 = (b * H_kv + h / G) * S_max; /* KV head h / G, slot 0 */
                const char *kb = (const char *)k_cache + cache_row0 * D * esize;
                const char *vb = (const char *)v_cache + cache_row0 * D * esize;
                for (int64_t t = 0; t < T; t++) {
                    const int64_t qi = ((b * H + h) * T + t) * D;
                    for (int64_t d = 0; d < D; d++) qf[d] = load(q, qi + d, is_bf16);
                    const int64_t S = positions[b] + t + 1; /* slots this query sees */
                    float m = -INFINITY;
                    for (int64_t j = 0; j < S; j++) {
                        p[j] = dot_row(qf, kb + j * D * esize, D, is_bf16) * scale;
                        if (p[j] > m) m = p[j];
                    }
                    /* exp(s - max), then sum_j e_j * v_j / sum_j e_j; both sums over j are kept in
                     * NPART interleaved partial sums (slot j in part j % NPART), added in a fixed
                     * order at the end: as accurate as a blocked matmul, and independent of T */
                    float part[NPART] = {0.f};
                    for (int64_t j = 0; j < S; j++) {
                        p[j] = expf(p[j] - m);
                        part[j % NPART] += p[j];
                    }
                    float sum = 0.f;
                    for (int r = 0; r < NPART; r++) sum += part[r];
                    for (int64_t i = 0; i < NPART * D; i++) acc[i] = 0.f;
                    for (int64_t j = 0; j < S; j++) {
                        const float w = p[j];
                        float *a = acc + (j % NPART) * D;
                        const char *vr = vb + j * D * esize;
                        axpy_row(a, w, vr, D, is_bf16);
                    }
                    for (int r = 1; r < NPART; r++)
                        for (int64_t d = 0; d < D; d++) acc[d] += acc[r * D + d];
                    for (int64_t d = 0; d < D; d++) acc[d] /= sum;
                    if (is_bf16)
                        for (int64_t d = 0; d < D; d++) ((uint16_t *)out)[qi + d] = f32_to_bf16(acc[d]);
                    else
                        memcpy((float *)out + qi, acc, (size_t)D * sizeof(float));
                }
            }
        free(p);
        free(qf);
        free(acc);
    }
    return failed ? -1 : 0;
}
