/* Greedy decoding's argmax over the vocabulary, row by row, on CPU.
 *
 * torch's argmax over one row of a 151936-token vocabulary costs about 0.25 ms here (0.55 ms on
 * bf16 logits), and the NaN check before it another 0.2 ms: at a 30 ms decode step of a small
 * model that is a few percent of every token. This reads the row once in 16-lane blocks,
 * keeping each lane's first maximum, and flags any NaN on the way.
 *
 * out[r] = the lowest index of the maximum of row r (torch.argmax's choice on ties), or -1 where
 * the row holds a NaN. x: R rows of V values, fp32 (bf16 = 0) or bf16 (bf16 = 1). Returns the
 * number of rows that hold a NaN.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include "bf16.h"
#include "vmath.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static int64_t argmax_row(const void *x, int64_t V, int bf16, int *nan) {
    int64_t i = 0, best_i = 0;
    float best = -INFINITY;
    int seen = 0, has_nan = 0;
#if defined(__AVX512F__)
    if (V >= 16) {
        __m512 bv = bf16 ? bf16x16_to_f32((const uint16_t *)x) : _mm512_loadu_ps((const float *)x);
        __m512i bi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nanm = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
        __m512i idx = bi;
        const __m512i step = _mm512_set1_epi32(16);
        for (i = 16; i + 16 <= V; i += 16) {
            idx = _mm512_add_epi32(idx, step);
            const __m512 v = bf16 ? bf16x16_to_f32((const uint16_t *)x + i) : _mm512_loadu_ps((const float *)x + i);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ); /* strictly greater: first max kept */
            nanm |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            bv = _mm512_mask_mov_ps(bv, gt, v);
            bi = _mm512_mask_mov_epi32(bi, gt, idx);
        }
        if (nanm) has_nan = 1;
        float vals[16];
        int32_t ids[16];
        _mm512_storeu_ps(vals, bv);
        _mm512_storeu_si512((void *)ids, bi);
        for (int l = 0; l < 16; l++) /* the largest value; on ties the lowest index */
            if (!seen || vals[l] > best || (vals[l] == best && ids[l] < best_i)) {
                best = vals[l];
                best_i = ids[l];
                seen = 1;
            }
    }
#endif
    for (; i < V; i++) { /* the tail (or the whole row): indices above every lane's */
        const float v = ld_any(x, i, bf16);
        if (v != v) has_nan = 1;
        if (!seen || v > best) {
            best = v;
            best_i = i;
            seen = 1;
        }
    }
    *nan = has_nan;
    return best_i;
}

#define SPLIT_MIN 32768 /* values per call from which the threads share the work */
#define MAX_PARTS 64

/* Rows over nt threads; a single row is cut into nt parts at multiples of 16, each part's
 * first maximum found as above and the parts taken in order, a later one only where strictly
 * greater: the lowest index of the maximum, the same id for any nt. The logits come from the LM
 * head's product, whose blocks both threads wrote; one thread reading them all back took 0.1 ms
 * of a step at 151936 values. */
int64_t verispec_argmax(const void *x, int64_t R, int64_t V, int bf16, int64_t *out, int nt) {
    int64_t n_nan = 0;
    const int64_t esize = bf16 ? 2 : 4;
    if (nt > MAX_PARTS) nt = MAX_PARTS;
    if (R == 1 && nt > 1 && V >= SPLIT_MIN) {
        int64_t best[MAX_PARTS];
        int nan[MAX_PARTS], parts = 1;
#pragma omp parallel num_threads(nt)
        {
            const int n = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t c0 = V * id / n / 16 * 16, c1 = id + 1 == n ? V : V * (id + 1) / n / 16 * 16;
            nan[id] = 0;
            best[id] = c0 + argmax_row((const char *)x + c0 * esize, c1 - c0, bf16, &nan[id]);
            if (id == 0) parts = n; /* the threads the runtime gave */
        }
        int64_t i = best[0];
        int any_nan = nan[0];
        for (int j = 1; j < parts; j++) {
            any_nan |= nan[j];
            if (ld_any(x, best[j], bf16) > ld_any(x, i, bf16)) i = best[j];
        }
        out[0] = any_nan ? -1 : i;
        return any_nan;
    }
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : n_nan) if (R > 1 && R * V >= SPLIT_MIN)
    for (int64_t r = 0; r < R; r++) {
        int nan = 0;
        const int64_t i = argmax_row((const char *)x + r * V * esize, V, bf16, &nan);
        out[r] = nan ? -1 : i;
        n_nan += nan;
    }
    return n_nan;
}

/* The drafting gate's confidence: the softmax probability, at temperature 1, of one id per row.
 *
 * out[r] = exp(x[r, ids[r]] - logsumexp(x[r])), from the row's maximum m (argmax_row, with its
 * NaN check) and the sum of e^(x - m): two reads of a row that stays in cache. torch's gather + logsumexp + exp over a
 * 151936-token row costs about 0.5 ms here, paid after every draft the gate judges.
 * Returns the number of rows whose maximum is not finite (+inf, NaN, or every value -inf): the
 * caller computes those with torch, whose conventions for them it keeps.
 */
static double row_sum_exp(const void *x, int64_t V, int bf16, float m) {
    int64_t i = 0;
    double total = 0.0;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    int64_t since = 0;
    for (; i + 16 <= V; i += 16) {
        const __m512 v = bf16 ? bf16x16_to_f32((const uint16_t *)x + i) : _mm512_loadu_ps((const float *)x + i);
        acc = _mm512_add_ps(acc, exp512(_mm512_sub_ps(v, mv)));
        if (++since == 256) { /* fp32 lanes summed into double every 4096 values */
            total += _mm512_reduce_add_ps(acc);
            acc = _mm512_setzero_ps();
            since = 0;
        }
    }
    total += _mm512_reduce_add_ps(acc);
#endif
    for (; i < V; i++) total += expf(ld_any(x, i, bf16) - m);
    return total;
}

int64_t verispec_softmax_at(const void *x, int64_t R, int64_t V, int bf16, const int64_t *ids, float *out) {
    int64_t bad = 0;
    const int64_t esize = bf16 ? 2 : 4;
    for (int64_t r = 0; r < R; r++) {
        const void *row = (const char *)x + r * V * esize;
        int nan = 0;
        const float m = ld_any(row, argmax_row(row, V, bf16, &nan), bf16); /* the row's maximum */
        if (nan || !isfinite(m)) {
            out[r] = NAN;
            bad++;
            continue;
        }
        const double total = row_sum_exp(row, V, bf16, m);
        out[r] = (float)(exp((double)(ld_any(row, ids[r], bf16) - m)) / total);
    }
    return bad;
}
