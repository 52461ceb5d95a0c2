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
#include <stddef.h>
#include "bf16.h"
#include "step.h"
#include "vmath.h"

void verispec_rms_norm(const void *x, const void *delta, const void *w, void *h_out, void *y, int64_t R, int64_t E,
                       float eps, int bf16);
void verispec_rope_append(const void *q_src, int64_t ldq, const void *k_src, const void *v_src, int64_t ldkv,
                          const void *cos, const void *sin, const int64_t *pos, void *q_out, void *k_cache,
                          void *v_cache, int64_t B, int64_t T, int64_t H, int64_t H_kv, int64_t D, int64_t S_max,
                          int bf16);
int verispec_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *positions,
                       const uint8_t *mask, void *out,
                       int64_t B, int64_t H, int64_t H_kv, int64_t T, int64_t D, int64_t S_max, float scale,
                       int is_bf16, int nthreads);
void verispec_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
                        int64_t K, int64_t N, int nthreads);
void verispec_gemv_bf16_tiles(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t M,
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

/* y [M, n] = x [M, k] . W^T (+ bias) by the layer's kind; 0 or the kernel's error code. */
static int linear(const vs_linear *L, const void *x, void *y, int64_t M, int bf16, int nt) {
    switch (L->kind) {
    case 0:
        if (bf16)
            verispec_gemv_bf16(x, L->weight, L->bias, y, M, L->k, L->n, nt);
        else
            verispec_gemv_f32(x, L->weight, L->bias, y, M, L->k, L->n, nt);
        return 0;
    case 1:
        return verispec_gemv_i8(x, bf16, L->weight, L->scale, L->bias, y, M, L->k, L->n, nt);
    case 2:
        return verispec_gemv_w8a8(x, bf16, L->weight, L->scale, L->bias, y, M, L->k, L->n, nt);
    case 3: /* bf16 on AMX tiles (a model loaded with amx=True) */
        if (!bf16) return -3;
        verispec_gemv_bf16_tiles(x, L->weight, L->bias, y, M, L->k, L->n, nt);
        return 0;
    default:
        return -3;
    }
}


/* m [R, F] = dtype(dtype(silu(gate)) * up), gate and up rows of ld values each (ld = 2F for one
 * fused [gate | up] output, F for two separate ones) (torch's F.silu(gate) * up),
 * silu(g) = g / (1 + e^-g) in fp32. With AVX512F, e^x is vmath.h's polynomial (about 1 ulp) on 16
 * lanes, else the C library's expf; either may differ from torch's exp in the last bit of the fp32
 * silu, so the decoder's module path calls this same function (layer.py's silu_mul) and the two
 * paths agree bitwise. Element-wise, so a row's result does not depend on R or on the threads.
 * The R * F elements are split over nt threads in blocks of 16. */
NO_CONTRACT void verispec_silu_mul(const void *gate, const void *up, int64_t ld, void *m, int64_t R, int64_t F,
                                   int bf16, int nt) {
    const int64_t blocks = (F + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nt) if (R * F >= 4096)
    for (int64_t i = 0; i < R * blocks; i++) {
        const int64_t r = i / blocks, f0 = (i % blocks) * 16, f1 = f0 + 16 < F ? f0 + 16 : F;
#if defined(__AVX512F__)
        if (f1 - f0 == 16) {
            const int64_t g0 = r * ld + f0, o = r * F + f0;
            __m512 g, u;
            if (bf16) {
                g = bf16x16_to_f32((const uint16_t *)gate + g0);
                u = bf16x16_to_f32((const uint16_t *)up + g0);
            } else {
                g = _mm512_loadu_ps((const float *)gate + g0);
                u = _mm512_loadu_ps((const float *)up + g0);
            }
            const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            st16_any(m, o, MUL16(rnd16_any(s, bf16), u), bf16);
            continue;
        }
#endif
        for (int64_t f = f0; f < f1; f++) {
            const float g = ld_any(gate, r * ld + f, bf16), u = ld_any(up, r * ld + f, bf16);
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

/* One layer on the step's residual stream s->x (updated in place). Returns 0; -1 if scratch
 * could not be allocated; another negative code from a product kernel. */
NO_CONTRACT static int layer_step(const vs_step *s, const vs_layer *l) {
    void *x = s->x;
    const int bf16 = s->bf16, nt = s->threads;
    const int64_t B = s->B, T = s->T, E = s->E, H = s->H, H_kv = s->H_kv, D = s->D, S_max = s->S_max, F = l->F;
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
    verispec_rms_norm(x, NULL, l->norm_in, NULL, h, R, E, l->eps_in, bf16);
    STAGE(0);
    if ((rc = linear(&l->qkv, h, qkv, R, bf16, nt))) goto done;
    STAGE(1);
    verispec_rope_append(qkv, W, qkv + H * D * size, qkv + (H + H_kv) * D * size, W, s->cos, s->sin, s->positions, q,
                         l->k_cache, l->v_cache, B, T, H, H_kv, D, S_max, bf16); /* q [B,H,T,D] */
    STAGE(2);
    if ((rc = verispec_attention(q, l->k_cache, l->v_cache, s->positions, s->mask, o, B, H, H_kv, T, D, S_max,
                                 l->attn_scale, bf16, nt)))
        goto done;
    STAGE(3);
    for (int64_t b = 0; b < B; b++) /* [B, H, T, D] -> [B, T, H * D] into q's space */
        for (int64_t hh = 0; hh < H; hh++)
            for (int64_t t = 0; t < T; t++)
                memcpy(q + (((b * T + t) * H + hh) * D) * size, o + (((b * H + hh) * T + t) * D) * size,
                       (size_t)(D * size));
    STAGE(4);
    if ((rc = linear(&l->o, q, a, R, bf16, nt))) goto done;
    STAGE(5);
    verispec_rms_norm(x, a, l->norm_post, x, h, R, E, l->eps_post, bf16); /* x <- dtype(x + a); h <- norm(x) */
    STAGE(6);
    if ((rc = linear(&l->gate_up, h, gu, R, bf16, nt))) goto done;
    STAGE(7);
    verispec_silu_mul(gu, gu + F * size, 2 * F, m, R, F, bf16, nt);
    STAGE(8);
    if ((rc = linear(&l->down, m, a, R, bf16, nt))) goto done;
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

/* A step's decoder in one call (see step.h for every field): the RoPE rows from the tables (when
 * given), the embedding rows of ids (when given) into the residual stream x, s->n_layers layers,
 * then the final RMSNorm of x into y (when norm is given). Returns 0; -5 if ids[s->failed] is not
 * in [0, V); else the failing layer's code, its index in s->failed. Saves the per-layer calls
 * from Python and the embedding and norm operators, which after a layer's weight stream run with
 * cold caches: ~2 ms of a 30 ms 0.5B step. */
int verispec_step(vs_step *s, const vs_layer *layers) {
    const int64_t size = s->bf16 ? 2 : 4, R = s->B * s->T, E = s->E;
    if (s->cos_table) {
        const int64_t row = s->D * size;
        for (int64_t b = 0; b < s->B; b++)
            for (int64_t t = 0; t < s->T; t++) {
                const int64_t src = (s->positions[b] + t) * row, dst = (b * s->T + t) * row;
                memcpy((char *)s->cos + dst, (const char *)s->cos_table + src, (size_t)row);
                memcpy((char *)s->sin + dst, (const char *)s->sin_table + src, (size_t)row);
            }
    }
    if (s->ids) {
        for (int64_t r = 0; r < R; r++)
            if (s->ids[r] < 0 || s->ids[r] >= s->V) {
                s->failed = r;
                return -5;
            }
        for (int64_t r = 0; r < R; r++)
            memcpy((char *)s->x + r * E * size, (const char *)s->embed + s->ids[r] * E * size, (size_t)(E * size));
    }
    for (int64_t l = 0; l < s->n_layers; l++) {
        const int rc = layer_step(s, layers + l);
        if (rc) {
            s->failed = l;
            return rc;
        }
    }
    if (s->norm) verispec_rms_norm(s->x, NULL, s->norm, NULL, s->y, R, E, s->norm_eps, s->bf16);
    return 0;
}

#define FIELD(T, f) {#T, #f, (int64_t)offsetof(T, f), (int64_t)sizeof(((T *)0)->f)}
#define SIZE(T) {#T, "", 0, (int64_t)sizeof(T)}
static const vs_field abi_table[] = {
    SIZE(vs_linear), FIELD(vs_linear, kind), FIELD(vs_linear, weight), FIELD(vs_linear, scale),
    FIELD(vs_linear, bias), FIELD(vs_linear, n), FIELD(vs_linear, k),
    SIZE(vs_layer), FIELD(vs_layer, norm_in), FIELD(vs_layer, norm_post), FIELD(vs_layer, qkv), FIELD(vs_layer, o),
    FIELD(vs_layer, gate_up), FIELD(vs_layer, down), FIELD(vs_layer, k_cache), FIELD(vs_layer, v_cache),
    FIELD(vs_layer, F), FIELD(vs_layer, eps_in), FIELD(vs_layer, eps_post), FIELD(vs_layer, attn_scale),
    SIZE(vs_step), FIELD(vs_step, x), FIELD(vs_step, cos), FIELD(vs_step, sin), FIELD(vs_step, cos_table),
    FIELD(vs_step, sin_table), FIELD(vs_step, positions), FIELD(vs_step, mask), FIELD(vs_step, ids), FIELD(vs_step, embed),
    FIELD(vs_step, norm), FIELD(vs_step, y), FIELD(vs_step, B), FIELD(vs_step, T), FIELD(vs_step, E),
    FIELD(vs_step, H), FIELD(vs_step, H_kv), FIELD(vs_step, D), FIELD(vs_step, S_max), FIELD(vs_step, V),
    FIELD(vs_step, n_layers), FIELD(vs_step, failed), FIELD(vs_step, norm_eps), FIELD(vs_step, bf16),
    FIELD(vs_step, threads),
};

/* The layout of step.h's structs as this library was compiled: *table, and the number of rows. */
int64_t verispec_abi(const vs_field **table) {
    *table = abi_table;
    return (int64_t)(sizeof(abi_table) / sizeof(abi_table[0]));
}
