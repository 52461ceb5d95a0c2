/* One decoder layer of a decode or verify step (B * T <= 16 rows) in a single native call.
 *
 * A step of a small model runs ten-odd native kernels per layer; called one by one from Python
 * each costs module dispatch, argument checks and an output allocation, about 0.15 ms a layer on
 * this machine (3-4 ms of a 20 ms draft step). This runs the same kernels in the same order on one
 * scratch block: RMSNorm, the fused q/k/v product, RoPE with the cache append, verify attention,
 * the o product, the residual add with the next RMSNorm, the fused gate/up product, SiLU(gate) *
 * up, the down product and the residual add. Every step rounds as the module path of the cpu
 * backend does: the products, norms, RoPE, attention and SiLU are the very same functions
 * (tests/test_cpu_fused.py checks the layer against the module path).
 * Row-wise throughout, so a token's result does not depend on how many rows share the call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#include "vmath.h"

void verispec_rms_norm(const void *x, const void *delta, const void *w, void *h_out, void *y, int64_t R, int64_t E,
                       float eps, int bf16);
void verispec_rope_append(const void *qkv, const void *cos, const void *sin, const int64_t *pos, void *q_out,
                          void *k_cache, void *v_cache, int64_t B, int64_t T, int64_t H, int64_t H_kv, int64_t D,
                          int64_t S_max, int bf16);
int verispec_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *positions, void *out,
                       int64_t B, int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t S_max, float scale,
                       int is_bf16, int nthreads);
void verispec_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                        int64_t K, int64_t N, int nthreads);
void verispec_gemv_f32(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                       int nthreads);
int verispec_gemv_i8(const void *x, int x_bf16, const int8_t *w, const float *scale, const void *bias, void *y,
                     int64_t M, int64_t K, int64_t N, int nthreads);
int verispec_gemv_w8a8(const void *x, int x_bf16, const int8_t *w, const float *scale, const void *bias, void *y,
                       int64_t M, int64_t K, int64_t N, int nthreads);

#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#ifdef STAGE_TIMING
#include <time.h>
double verispec_stage_s[16];
static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define STAGE(i) do { double t_ = now_s(); verispec_stage_s[i] += t_ - t_prev; t_prev = t_; } while (0)
#else
#define STAGE(i)
#endif
#define LIN_WORDS 6 /* kind (0: weights in the activation dtype, 1: int8, 2: w8a8), weight, scale, bias, N, K */

/* y [M, N] = x [M, K] . W^T (+ bias) by the layer's kind; 0 or the kernel's error code. */
static int linear(const int64_t *L, const void *x, void *y, int64_t M, int bf16, int nt) {
    const void *w = (const void *)L[1], *bias = (const void *)L[3];
    const float *scale = (const float *)L[2];
    switch (L[0]) {
    case 0:
        if (bf16)
            verispec_gemv_bf16(x, w, bias, y, M, L[5], L[4], nt);
        else
            verispec_gemv_f32(x, w, bias, y, M, L[5], L[4], nt);
        return 0;
    case 1:
        return verispec_gemv_i8(x, bf16, w, scale, bias, y, M, L[5], L[4], nt);
    case 2:
        return verispec_gemv_w8a8(x, bf16, w, scale, bias, y, M, L[5], L[4], nt);
    default:
        return -3;
    }
}


/* m [R, F] = dtype(dtype(silu(gate)) * up), gu [R, 2F] = [gate | up] (torch's F.silu(gate) * up),
 * silu(g) = g / (1 + e^-g) in fp32. With AVX512F, e^x is vmath.h's polynomial (about 1 ulp) on 16
 * lanes, else the C library's expf; either may differ from torch's exp in the last bit of the fp32
 * silu, so the decoder's module path calls this same function (layer.py's silu_mul) and the two
 * paths agree bitwise. Element-wise, so a row's result does not depend on R or on the threads.
 * The R * F elements are split over nt threads in blocks of 16. */
NO_CONTRACT void verispec_silu_mul(const void *gu, void *m, int64_t R, int64_t F, int bf16, int nt) {
    const int64_t blocks = (F + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nt) if (R * F >= 4096)
    for (int64_t i = 0; i < R * blocks; i++) {
        const int64_t r = i / blocks, f0 = (i % blocks) * 16, f1 = f0 + 16 < F ? f0 + 16 : F;
#if defined(__AVX512F__)
        if (f1 - f0 == 16) {
            const int64_t g0 = r * 2 * F + f0, u0 = g0 + F, o = r * F + f0;
            __m512 g, u;
            if (bf16) {
                g = bf16x16_to_f32((const uint16_t *)gu + g0);
                u = bf16x16_to_f32((const uint16_t *)gu + u0);
            } else {
                g = _mm512_loadu_ps((const float *)gu + g0);
                u = _mm512_loadu_ps((const float *)gu + u0);
            }
            const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            st16_any(m, o, MUL16(rnd16_any(s, bf16), u), bf16);
            continue;
        }
#endif
        for (int64_t f = f0; f < f1; f++) {
            const float g = ld_any(gu, r * 2 * F + f, bf16), u = ld_any(gu, r * 2 * F + F + f, bf16);
#if defined(__AVX512F__)
            float e[16];
            _mm512_storeu_ps(e, exp512(_mm512_set1_ps(-g)));
            st_any(m, r * F + f, rnd_any(g / (1.0f + e[0]), bf16) * u, bf16);
#else
            st_any(m, r * F + f, rnd_any(g / (1.0f + expf(-g)), bf16) * u, bf16);
#endif
        }
    }
}

/* P: x (residual stream [B, T, E], updated in place), in-norm weight, post-norm weight, cos,
 * sin ([B, T, D]), positions (host int64 [B], validated by the caller: positions[b] + T <=
 * S_max), k_cache, v_cache ([B, H_kv, S_max, D]), B, T, E, H, H_kv, D, S_max, F, then the four
 * linears (q/k/v fused, o, gate/up fused, down) of LIN_WORDS each. Returns 0; -1 if scratch
 * could not be allocated; another negative code from a product kernel. */
NO_CONTRACT int verispec_layer(const int64_t *P, float eps_in, float eps_post, float attn_scale, int bf16, int nt) {
    void *x = (void *)P[0];
    const void *w_in = (const void *)P[1], *w_post = (const void *)P[2], *cos = (const void *)P[3],
               *sin = (const void *)P[4];
    const int64_t *pos = (const int64_t *)P[5];
    void *k_cache = (void *)P[6], *v_cache = (void *)P[7];
    const int64_t B = P[8], T = P[9], E = P[10], H = P[11], H_kv = P[12], D = P[13], S_max = P[14], F = P[15];
    const int64_t *qkv_l = P + 16, *o_l = qkv_l + LIN_WORDS, *gu_l = o_l + LIN_WORDS, *down_l = gu_l + LIN_WORDS;
    const int64_t R = B * T, W = (H + 2 * H_kv) * D, size = bf16 ? 2 : 4;
    const int64_t n_elems = R * (2 * E + W + 2 * H * D + 2 * F + F);
    char *buf = (char *)malloc((size_t)(n_elems * size));
    if (!buf) return -1;
    char *h = buf, *a = h + R * E * size, *qkv = a + R * E * size, *q = qkv + R * W * size;
    char *o = q + R * H * D * size, *gu = o + R * H * D * size, *m = gu + R * 2 * F * size;
    int rc = 0;
#ifdef STAGE_TIMING
    double t_prev = now_s();
#endif
    verispec_rms_norm(x, NULL, w_in, NULL, h, R, E, eps_in, bf16);
    STAGE(0);
    if ((rc = linear(qkv_l, h, qkv, R, bf16, nt))) goto done;
    STAGE(1);
    verispec_rope_append(qkv, cos, sin, pos, q, k_cache, v_cache, B, T, H, H_kv, D, S_max, bf16); /* q [B,H,T,D] */
    STAGE(2);
    if ((rc = verispec_attention(q, k_cache, v_cache, pos, o, B, H, H_kv, T, D, S_max, attn_scale, bf16, nt))) goto done;
    STAGE(3);
    for (int64_t b = 0; b < B; b++) /* [B, H, T, D] -> [B, T, H * D] into q's space */
        for (int64_t hh = 0; hh < H; hh++)
            for (int64_t t = 0; t < T; t++)
                memcpy(q + (((b * T + t) * H + hh) * D) * size, o + (((b * H + hh) * T + t) * D) * size,
                       (size_t)(D * size));
    STAGE(4);
    if ((rc = linear(o_l, q, a, R, bf16, nt))) goto done;
    STAGE(5);
    verispec_rms_norm(x, a, w_post, x, h, R, E, eps_post, bf16); /* x <- dtype(x + a); h <- norm(x) */
    STAGE(6);
    if ((rc = linear(gu_l, h, gu, R, bf16, nt))) goto done;
    STAGE(7);
    verispec_silu_mul(gu, m, R, F, bf16, nt);
    STAGE(8);
    if ((rc = linear(down_l, m, a, R, bf16, nt))) goto done;
    STAGE(9);
    int64_t i0 = 0;
#if defined(__AVX512F__)
    for (; i0 + 16 <= R * E; i0 += 16) st16_any(x, i0, ADD16(ld16_any(x, i0, bf16), ld16_any(a, i0, bf16)), bf16);
#endif
    for (int64_t i = i0; i < R * E; i++) st_any(x, i, ld_any(x, i, bf16) + ld_any(a, i, bf16), bf16);
    STAGE(10);
done:
    free(buf);
    return rc;
}

/* A step's decoder in one call: the embedding rows of ids (when given) into the residual stream
 * x [R, E] (every layer's P[0]), when cos_tab/sin_tab are given ([S, D] RoPE tables in the model
 * dtype, S > positions[b] + T - 1, checked by the caller) their rows positions[b] + t into the
 * [B, T, D] buffers every layer reads (P[3], P[4]), L layers, layer l reading words P + l * stride (as
 * verispec_layer) and f[3 l .. 3 l + 2] = (eps_in, eps_post, attn_scale), then the final RMSNorm
 * of x into y (when norm_w is given). Returns 0; -5 if ids[*failed] is not in [0, V); else the
 * failing layer's code, its index in *failed. Saves the per-layer calls from Python (argument
 * conversion, the per-call words) and the embedding and norm operators, which after a layer's
 * weight stream run with cold caches: ~2 ms of a 30 ms 0.5B step. */
int verispec_step(const int64_t *P, int64_t L, int64_t stride, const float *f, int bf16, int nt, int64_t *failed,
                  int64_t R, int64_t E, const int64_t *ids, const void *embed, int64_t V, const void *norm_w,
                  float norm_eps, void *y, const void *cos_tab, const void *sin_tab) {
    void *x = (void *)P[0];
    const int64_t size = bf16 ? 2 : 4;
    if (cos_tab) {
        const int64_t *pos = (const int64_t *)P[5], B = P[8], T = P[9], D = P[13], row = D * size;
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++) {
                memcpy((char *)P[3] + (b * T + t) * row, (const char *)cos_tab + (pos[b] + t) * row, (size_t)row);
                memcpy((char *)P[4] + (b * T + t) * row, (const char *)sin_tab + (pos[b] + t) * row, (size_t)row);
            }
    }
    if (ids) {
        for (int64_t r = 0; r < R; r++)
            if (ids[r] < 0 || ids[r] >= V) {
                *failed = r;
                return -5;
            }
        for (int64_t r = 0; r < R; r++)
            memcpy((char *)x + r * E * size, (const char *)embed + ids[r] * E * size, (size_t)(E * size));
    }
    for (int64_t l = 0; l < L; l++) {
        const int rc = verispec_layer(P + l * stride, f[3 * l], f[3 * l + 1], f[3 * l + 2], bf16, nt);
        if (rc) {
            *failed = l;
            return rc;
        }
    }
    if (norm_w) verispec_rms_norm(x, NULL, norm_w, NULL, y, R, E, norm_eps, bf16);
    return 0;
}
