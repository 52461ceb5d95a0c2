/* The arguments of a native decoder step (fused.c's verispec_step), defined once.
 *
 * Python mirrors these structs with ctypes (kernels/cpu/abi.py) and checks the mirror against
 * verispec_abi()'s table of sizes and offsets when the library is loaded: a field added,
 * removed, retyped or reordered on one side only is an error at load, never memory read
 * through the wrong offset. Change both sides together.
 */
#ifndef VERISPEC_STEP_H
#define VERISPEC_STEP_H
#include <stdint.h>

/* One linear layer, y [M, n] = x [M, k] . W^T (+ bias). */
typedef struct {
    int64_t kind;       /* 0: weight in the activation dtype; 1: int8 weight + fp32 row scale; 2: W8A8; 3: bf16 on AMX tiles */
    const void *weight; /* [n, k] (int8 for kinds 1 and 2) */
    const float *scale; /* [n] row scales (kinds 1, 2), else NULL */
    const void *bias;   /* [n] in the activation dtype, or NULL */
    int64_t n, k;
} vs_linear;

/* One decoder layer: its weights (static) and its KV cache (set when the cache changes). */
typedef struct {
    const void *norm_in, *norm_post; /* [E] RMSNorm weights */
    vs_linear qkv;                   /* q, k and v rows in one [(H + 2 H_kv) D, E] weight */
    vs_linear o;                     /* [E, H D] */
    vs_linear gate_up;               /* gate and up rows in one [2 F, E] weight */
    vs_linear down;                  /* [E, F] */
    void *k_cache, *v_cache;         /* [>= B, H_kv, S_max, D] */
    int64_t F;                       /* intermediate size */
    float eps_in, eps_post, attn_scale;
} vs_layer;

/* One step: what changes from call to call, and the shapes every layer shares. */
typedef struct {
    void *x;                            /* residual stream [R = B T, E], updated in place */
    void *cos, *sin;                    /* [B, T, D] RoPE rows every layer reads */
    const void *cos_table, *sin_table;  /* [S, D] tables whose rows positions[b] + t are copied into
                                           cos/sin first, or NULL (rows given) */
    const int64_t *positions;           /* [B] first cache slot per row, positions[b] + T <= S_max */
    const uint8_t *mask;                /* [B, T, T] token-tree mask (query t sees new slot j iff
                                           mask[b, t, j]), or NULL: causal */
    const int64_t *ids;                 /* [R] token ids whose embedding rows start x, or NULL */
    const void *embed;                  /* [V, E] embedding table (with ids) */
    const void *norm;                   /* [E] final RMSNorm weight, or NULL */
    void *y;                            /* [R, E] final norm of x (with norm) */
    int64_t B, T, E, H, H_kv, D, S_max, V;
    int64_t n_layers;
    int64_t failed;                     /* out: the failing layer, or the row of a bad id */
    float norm_eps;
    int32_t bf16;                       /* 1: bf16 activations and weights; 0: fp32 */
    int32_t threads;
} vs_step;

/* A row of verispec_abi()'s layout table: one struct's size (field "") or one field's offset and size. */
typedef struct {
    const char *type, *field;
    int64_t offset, size;
} vs_field;

int64_t verispec_abi(const vs_field **table);
int verispec_step(vs_step *s, const vs_layer *layers);

#endif
