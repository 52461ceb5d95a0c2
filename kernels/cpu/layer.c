/* Per-layer glue of a decode or verify step in single native calls: RMSNorm (optionally after
 * the residual add), and RoPE on q and k with the k/v cache append.
 *
 * A decode step of a small model spends ~10% of its time in these short elementwise ops when
 * each is a handful of torch operators (dispatch, temporaries). Each function here reproduces
 * the rounding of the torch reference (kernels/reference.py) step by step: the residual add and
 * every RoPE product and sum are rounded to the model dtype as torch rounds them (bitwise equal);
 * RMSNorm's fp32 sum of squares is summed in another order than torch's, so it may differ from
 * the reference in the last fp32 bit before the rounding to the model dtype. Every row is
 * computed on its own, so a token's result does not depend on how many tokens share the call.
 *
 * dtype: bf16 = 1 (uint16 storage, fp32 arithmetic, round to nearest even), else fp32.
 */
#include <math.h>
#include <stdint.h>
#include "bf16.h"

#define NO_CONTRACT __attribute__((optimize("fp-contract=off"))) /* a*b + c stays two roundings */


/* y[r] = w * dtype(x[r] * rsqrt(mean(x[r]^2) + eps)) for rows r < R of E values. With delta
 * given, x is first replaced by dtype(x + delta), written to h_out (the new residual stream).
 * With AVX512F the 16-lane loops do the scalar loops' arithmetic, the sum of squares in 16
 * partial sums; each row on its own, in an order fixed by E alone. */
NO_CONTRACT void verispec_rms_norm(const void *x, const void *delta, const void *w, void *h_out, void *y,
                                   int64_t R, int64_t E, float eps, int bf16) {
    float buf[E > 0 ? E : 1];
    for (int64_t r = 0; r < R; r++) {
        float ss = 0.f;
        int64_t e1 = 0;
#if defined(__AVX512F__)
        { /* squares summed in 16 lanes (element e in lane e % 16), reduced, then the tail in order */
            __m512 acc = _mm512_setzero_ps();
            for (; e1 + 16 <= E; e1 += 16) {
                __m512 v = ld16_any(x, r * E + e1, bf16);
                if (delta) v = rnd16_any(ADD16(v, ld16_any(delta, r * E + e1, bf16)), bf16);
                _mm512_storeu_ps(buf + e1, v);
                acc = ADD16(acc, MUL16(v, v));
            }
            ss = _mm512_reduce_add_ps(acc);
        }
#else
#pragma omp simd reduction(+ : ss)
#endif
        for (int64_t e = e1; e < E; e++) {
            float v = ld_any(x, r * E + e, bf16);
            if (delta) v = rnd_any(v + ld_any(delta, r * E + e, bf16), bf16);
            buf[e] = v;
            ss += v * v;
        }
        int64_t e0 = 0;
        const float inv = 1.0f / sqrtf(ss / (float)E + eps);
#if defined(__AVX512F__)
        const __m512 inv16 = _mm512_set1_ps(inv);
        for (; e0 + 16 <= E; e0 += 16) { /* the scalar loops' arithmetic, 16 elements at a time */
            const __m512 v = _mm512_loadu_ps(buf + e0);
            if (delta) st16_any(h_out, r * E + e0, v, bf16);
            st16_any(y, r * E + e0, MUL16(ld16_any(w, e0, bf16), rnd16_any(MUL16(v, inv16), bf16)), bf16);
        }
#endif
        if (delta)
            for (int64_t e = e0; e < E; e++) st_any(h_out, r * E + e, buf[e], bf16);
        for (int64_t e = e0; e < E; e++) st_any(y, r * E + e, ld_any(w, e, bf16) * rnd_any(buf[e] * inv, bf16), bf16);
    }
}

/* One head vector of D values: out = dtype(dtype(x * cos) + dtype(roll(x, D/2) * sin)), sin's
 * first half negated (rotate_half's sign folded in, as in the reference). */
NO_CONTRACT static void rope_head(const void *x, int64_t xo, const void *cos, const void *sin, int64_t co, void *out,
                                  int64_t oo, int64_t D, int bf16) {
    const int64_t half = D / 2;
#if defined(__AVX512F__)
    if (half % 16 == 0) { /* the loop below, 16 elements of each half at a time */
        for (int64_t d = 0; d < half; d += 16) {
            const __m512 x1 = ld16_any(x, xo + d, bf16), x2 = ld16_any(x, xo + d + half, bf16);
            const __m512 a1 = rnd16_any(MUL16(x1, ld16_any(cos, co + d, bf16)), bf16);
            const __m512 b1 = rnd16_any(MUL16(x2, ld16_any(sin, co + d, bf16)), bf16);
            const __m512 a2 = rnd16_any(MUL16(x2, ld16_any(cos, co + d + half, bf16)), bf16);
            const __m512 b2 = rnd16_any(MUL16(x1, ld16_any(sin, co + d + half, bf16)), bf16);
            st16_any(out, oo + d, ADD16(a1, b1), bf16);
            st16_any(out, oo + d + half, ADD16(a2, b2), bf16);
        }
        return;
    }
#endif
    for (int64_t d = 0; d < D; d++) {
        const float a = rnd_any(ld_any(x, xo + d, bf16) * ld_any(cos, co + d, bf16), bf16);
        const float b = rnd_any(ld_any(x, xo + (d + half) % D, bf16) * ld_any(sin, co + d, bf16), bf16);
        st_any(out, oo + d, a + b, bf16);
    }
}

/* q_src [B T rows of ldq values], k_src and v_src [B T rows of ldkv values] (the projections'
 * outputs, separate or inside one fused row), cos/sin [B, T, D]:
 * q_out[b, h, t] = rope(q), k_cache[b, g, pos[b] + t] = rope(k), v_cache[b, g, pos[b] + t] = v.
 * The caller has checked pos[b] + T <= S_max. */
void verispec_rope_append(const void *q_src, int64_t ldq, const void *k_src, const void *v_src, int64_t ldkv,
                          const void *cos, const void *sin, const int64_t *pos, void *q_out, void *k_cache,
                          void *v_cache, int64_t B, int64_t T, int64_t H, int64_t H_kv, int64_t D, int64_t S_max,
                          int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const int64_t r = b * T + t, co = r * D;
            for (int64_t h = 0; h < H; h++) rope_head(q_src, r * ldq + h * D, cos, sin, co, q_out, ((b * H + h) * T + t) * D, D, bf16);
            for (int64_t g = 0; g < H_kv; g++) {
                const int64_t slot = ((b * H_kv + g) * S_max + pos[b] + t) * D;
                rope_head(k_src, r * ldkv + g * D, cos, sin, co, k_cache, slot, D, bf16);
                memcpy((char *)v_cache + slot * size, (const char *)v_src + (r * ldkv + g * D) * size,
                       (size_t)(D * size));
            }
        }
}
