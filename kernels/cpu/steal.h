/* Block split with stealing for the streaming kernels (gemv.c).
 *
 * A weight stream is cut into blocks; thread t owns the contiguous blocks of region t and takes
 * them front to back, so its reads stay one sequential stream that its prefetches run ahead of.
 * A thread done with its own region takes blocks from the BACK of the others' regions, where
 * their owners get last. On this kind of 2-vCPU VM one vCPU is often 10-20% slower than the
 * other for seconds at a time (a neighbour, interrupts), and with a fixed half each a decode
 * step of ~100 products waited on the slower one at every product: 3-7 ms of a 36 ms step.
 *
 * A block is computed by exactly one thread, and the kernels compute each output row (or, for
 * stream_read, each block's partial sum) in an order that does not depend on which thread runs
 * it, so results do not depend on how the blocks fall.
 *
 * Each region's remaining blocks are [front, back) packed in one 64-bit word (front in the low
 * half) on its own cache line, taken with a compare-and-swap: the owner and a thief can never
 * take the same block. */
#ifndef VERISPEC_STEAL_H
#define VERISPEC_STEAL_H
#include <stdint.h>

typedef struct {
    uint64_t span;
} __attribute__((aligned(64))) steal_region;

/* Regions r < nreg split blocks [0, nblocks) evenly. */
static inline void steal_init(steal_region *regions, int nreg, int64_t nblocks) {
    for (int r = 0; r < nreg; r++) {
        const uint64_t f = (uint64_t)(nblocks * r / nreg), b = (uint64_t)(nblocks * (r + 1) / nreg);
        regions[r].span = f | (b << 32);
    }
}

/* The next block of region r from its front (owner) or back (thief); -1 when it is empty. */
static inline int64_t steal_take(steal_region *reg, int from_back) {
    uint64_t cur = __atomic_load_n(&reg->span, __ATOMIC_RELAXED);
    for (;;) {
        const uint64_t f = cur & 0xffffffffu, b = cur >> 32;
        if (f >= b) return -1;
        const uint64_t next = from_back ? (f | ((b - 1) << 32)) : ((f + 1) | (b << 32));
        if (__atomic_compare_exchange_n(&reg->span, &cur, next, 1, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            return from_back ? (int64_t)(b - 1) : (int64_t)f;
    }
}

/* The next block for thread id: its own region's front, then the others' backs; -1 when all
 * are empty. */
static inline int64_t steal_next(steal_region *regions, int nreg, int id) {
    int64_t blk = id < nreg ? steal_take(&regions[id], 0) : -1;
    for (int j = 1; blk < 0 && j <= nreg; j++) blk = steal_take(&regions[(id + j) % nreg], 1);
    return blk;
}

#endif
