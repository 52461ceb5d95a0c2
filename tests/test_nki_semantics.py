"""NKI 0.6 semantics the interpreter follows (regressions of issue 26), each with a minimal kernel:

1. static loops (``affine_range``, ``sequential_range``, ``static_range``) run in order, so Python
   state built in a loop body comes out in order (hoisted loads, blocked matmuls);
2. a tile lives while it is referenced: allocated in a loop body, it may be used after the loop,
   and capacity counts live tiles only;
3. an SBUF accumulator may be updated in an ``affine_range`` loop (the parallel-loop lint, stricter
   than NKI, still flags it when asked);
4. never-written memory reads as NaN/sentinel without an error; a separate check reports such
   values when they reach a kernel output;
plus the runtime loops (``fori_loop``, ``while_loop``, ``dynamic_range``) and the targets.
"""

from __future__ import annotations

import numpy as np
import pytest

from verispec.kernels.nki.interp import (
    DEFAULT_TARGET,
    TARGETS,
    NKIError,
    NKIRuleError,
    Options,
    UndefinedOutputWarning,
    last_stats,
    nki,
)

nl, nisa = nki.language, nki.isa
F32 = nl.float32
rng = np.random.default_rng(7)


def run(body, *arrays, **kw):
    return nki.simulate(nki.jit(body), **kw)(*arrays)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def out_like(t):
    o = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=o, src=t)
    return o


# ---- 1. loops run in order --------------------------------------------------------------------


@pytest.mark.parametrize("range_fn", [nl.affine_range, nl.sequential_range, nl.static_range])
def test_python_state_built_in_a_loop_comes_out_in_order(range_fn):
    seen = []

    def k():
        for i in range_fn(4):
            seen.append(i)

    run(k)
    assert seen == [0, 1, 2, 3]


def test_hoisted_loads_and_a_blocked_free_dimension_matmul():
    """Loads hoisted out of the matmul loop into a Python list, the free dimension in blocks of
    512 (the shape of AWS's matmul tutorials): right only if the list is in loop order."""
    a_t, b = f32(256, 64), f32(256, 1024)  # a_t [K, M], b [K, N]

    def k(a_t, b):
        K, M = a_t.shape
        N = b.shape[1]
        out = nl.ndarray((M, N), dtype=F32, buffer=nl.shared_hbm)
        a_tiles = []  # [128, M] per contraction block, loaded once
        for kb in nl.affine_range(K // 128):
            t = nl.ndarray((128, M), dtype=F32, buffer=nl.sbuf)
            nisa.dma_copy(dst=t, src=a_t[kb * 128:(kb + 1) * 128, :])
            a_tiles.append(t)
        for nb in nl.affine_range(N // 512):
            acc = nl.ndarray((M, 512), dtype=F32, buffer=nl.psum)
            for kb in nl.affine_range(K // 128):
                bt = nl.ndarray((128, 512), dtype=F32, buffer=nl.sbuf)
                nisa.dma_copy(dst=bt, src=b[kb * 128:(kb + 1) * 128, nb * 512:(nb + 1) * 512])
                nisa.nc_matmul(dst=acc, stationary=a_tiles[kb], moving=bt)
            res = nl.ndarray((M, 512), dtype=F32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=res, src=acc)
            nisa.dma_copy(dst=out[:, nb * 512:(nb + 1) * 512], src=res)
        return out

    np.testing.assert_allclose(run(k, a_t, b), a_t.T.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


# ---- 2. liveness ------------------------------------------------------------------------------


def test_a_tile_allocated_in_a_loop_body_is_usable_after_the_loop():
    x = f32(3, 2, 5)

    def k(x):
        for i in nl.affine_range(3):
            last = nl.ndarray((2, 5), dtype=F32, buffer=nl.sbuf)
            nisa.dma_copy(dst=last, src=x[i])
        return out_like(last)

    np.testing.assert_array_equal(run(k, x), x[2])


def test_capacity_counts_live_tiles_only():
    def kept(n):
        def k():
            tiles = []
            for _ in range(n):
                t = nl.ndarray((128, 512), dtype=F32, buffer=nl.psum)  # one 2 KiB bank each
                nisa.memset(dst=t, value=0.0)
                tiles.append(t)

        return k

    run(kept(8))
    with pytest.raises(NKIRuleError, match=r"rule 2 .*PSUM bank 9 of 8"):
        run(kept(9))

    def dropped():
        for _ in range(20):
            t = nl.ndarray((128, 512), dtype=F32, buffer=nl.psum)
            nisa.memset(dst=t, value=0.0)

    run(dropped)
    assert last_stats().psum_peak_banks == 2  # the previous iteration's tile is still named while the next is made


# ---- 3. an accumulator in an affine_range loop ------------------------------------------------


def _accumulate(x):
    acc = nl.ndarray((2, 5), dtype=F32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    for i in nl.affine_range(x.shape[0]):
        t = nl.ndarray((2, 5), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[i])
        nisa.tensor_tensor(dst=acc, data1=acc, data2=t, op=nl.add)
    return out_like(acc)


def test_an_sbuf_accumulator_updated_in_affine_range_is_valid():
    x = f32(4, 2, 5)
    np.testing.assert_allclose(run(_accumulate, x), x.sum(0), rtol=1e-6)


def test_the_parallel_loop_lint_is_opt_in_and_stricter_than_nki():
    x = f32(4, 2, 5)
    assert Options().lint_parallel_loops is False
    with pytest.raises(NKIRuleError, match=r"rule 10 \(parallel-loop lint, stricter than NKI\): .*loop-carried"):
        run(_accumulate, x, lint_parallel_loops=True)


# ---- 4. never-written memory ------------------------------------------------------------------


def test_a_whole_tensor_copy_of_a_partly_written_tensor_is_legal():
    x = f32(4, 8)

    def k(x):
        scratch = nl.ndarray((8, 8), dtype=F32, buffer=nl.hbm)
        nisa.dma_copy(dst=scratch[0:4, :], src=x)  # rows 4..7 never written
        t = nl.ndarray((8, 8), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=scratch)  # the whole tensor: reads the unwritten rows as NaN
        return out_like(t[0:4, :])

    np.testing.assert_array_equal(run(k, x), x)


def test_a_partly_written_output_copied_whole_is_reported_not_raised_by_the_copy():
    x = f32(4, 8)

    def k(x):
        o = nl.ndarray((8, 8), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o[0:4, :], src=x)
        o2 = nl.ndarray((8, 8), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o2, src=o)  # legal: copies NaN rows along
        return o, o2

    with pytest.raises(NKIRuleError, match=r"rule 9 .*output 0 hbm\d+\[8, 8\]: 32 of 64 .*\(32 never written, 0 computed.*"
                                           r"output 1 hbm\d+\[8, 8\]: 32 of 64 .*\(0 never written, 32 computed from "
                                           r"never-written memory\), e.g. at \[4, 0\]"):
        run(k, x)
    o, o2 = run(k, x, check_outputs="off")
    for a in (o, o2):
        np.testing.assert_array_equal(a[:4], x)
        assert np.isnan(a[4:]).all()


def test_compute_over_a_partly_loaded_tile_whose_extra_rows_are_never_stored():
    x = f32(100, 8)

    def k(x):
        t = nl.ndarray((128, 8), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:100, :], src=x)  # partitions 100..127 hold NaN
        e = nl.ndarray((128, 8), dtype=F32, buffer=nl.sbuf)
        nisa.activation(dst=e, op=nl.exp, data=t)
        s = nl.ndarray((128, 1), dtype=F32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=s, op=nl.add, data=e, axis=1)
        o = nl.ndarray((100, 1), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=s[0:100, :])
        return o

    np.testing.assert_allclose(run(k, x), np.exp(x).sum(1, keepdims=True), rtol=1e-5)

    def stores_the_extra_rows(x):
        t = nl.ndarray((128, 8), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:100, :], src=x)
        e = nl.ndarray((128, 8), dtype=F32, buffer=nl.sbuf)
        nisa.activation(dst=e, op=nl.exp, data=t)
        return out_like(e)

    with pytest.raises(NKIRuleError, match=r"224 of 1024 elements .*\(0 never written, 224 computed .* e.g. at \[100, 0\]"):
        run(stores_the_extra_rows, x)
    with pytest.warns(UndefinedOutputWarning, match="224 of 1024"):
        got = run(stores_the_extra_rows, x, check_outputs="warn")
    assert np.isnan(got[100:]).all() and np.isfinite(got[:100]).all()


def test_undefined_values_follow_matmul_rows_and_columns():
    a, b = f32(8, 4), f32(8, 6)

    def k(a, b, store_rows):
        st = nl.ndarray((8, 4), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=st[:, 0:3], src=a[:, 0:3])  # stationary column 3 never written
        mv = nl.ndarray((8, 6), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=mv, src=b)
        acc = nl.ndarray((4, 6), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=st, moving=mv)
        r = nl.ndarray((4, 6), dtype=F32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=r, src=acc)
        return out_like(r[0:store_rows, :])

    np.testing.assert_allclose(run(k, a, b, 3), (a.T @ b)[:3], rtol=1e-5, atol=1e-5)  # output row 3 not stored
    with pytest.raises(NKIRuleError, match=r"6 of 24 elements .* e.g. at \[3, 0\]"):
        run(k, a, b, 4)


def test_undefined_values_follow_a_transpose():
    x = f32(3, 8)

    def k(x, cols):
        t = nl.ndarray((4, 8), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:3, :], src=x)  # partition 3 never written
        tp = nl.ndarray((8, 4), dtype=F32, buffer=nl.psum)
        nisa.nc_transpose(dst=tp, data=t)
        r = nl.ndarray((8, 4), dtype=F32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=r, src=tp)
        return out_like(r[:, 0:cols])

    np.testing.assert_array_equal(run(k, x, 3), x.T)
    with pytest.raises(NKIRuleError, match=r"8 of 32 elements .* e.g. at \[0, 3\], \[1, 3\]"):
        run(k, x, 4)


def test_an_input_written_in_place_from_never_written_memory_is_reported():
    def k(cache):
        t = nl.ndarray((1, 4), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=cache[1:2, :], src=t)

    with pytest.raises(NKIRuleError, match=r"input arg0 \(written in place\) arg0\[3, 4\]: 4 of 12 .* e.g. at \[1, 0\]"):
        run(k, np.zeros((3, 4), np.float32))


def test_a_runtime_offset_must_be_defined():
    def k(x):
        pos = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)  # never written
        t = nl.ndarray((1, 4), dtype=F32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x.ap(pattern=[[4, 1], [1, 4]], offset=0, scalar_offset=pos, indirect_dim=0))

    with pytest.raises(NKIRuleError, match="rule 9 .*supplies a runtime index or bound, but 1 of its 1 element"):
        run(k, f32(3, 4))


# ---- runtime loops ----------------------------------------------------------------------------


def _count_tile(n):
    return np.array([[n]], np.int32)


def test_fori_loop_with_a_runtime_bound_and_a_register_offset():
    x = f32(1, 10)

    def k(x, n_hbm):
        n_sb = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=n_sb, src=n_hbm)
        n = nisa.register_alloc()
        nisa.register_load(n, n_sb)
        o = nl.ndarray((1, 10), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=nl.zeros((1, 10), dtype=F32, buffer=nl.sbuf))
        tmp = nl.ndarray((1, 1), dtype=F32, buffer=nl.sbuf)

        def body(i):
            nisa.dma_copy(dst=tmp, src=x.ap([[10, 1], [1, 1]], scalar_offset=i, indirect_dim=1))
            nisa.dma_copy(dst=o.ap([[10, 1], [1, 1]], scalar_offset=i, indirect_dim=1), src=tmp)

        nl.fori_loop(0, n, body)
        return o

    for n in (0, 4, 10):
        got = run(k, x, _count_tile(n))
        np.testing.assert_array_equal(got[0, :n], x[0, :n])
        assert not got[0, n:].any()
    assert last_stats().ops["fori_loop"] == 1 and last_stats().ops["dma_copy"] == 2 + 2 * 10


def test_fori_loop_lower_upper_step_and_its_register_is_not_a_python_int():
    def k():
        o = nl.ndarray((1, 10), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=nl.zeros((1, 10), dtype=F32, buffer=nl.sbuf))
        one = nl.full((1, 1), 1.0, dtype=F32, buffer=nl.sbuf)
        nl.fori_loop(2, 9, lambda i: nisa.dma_copy(dst=o.ap([[10, 1], [1, 1]], scalar_offset=i, indirect_dim=1), src=one),
                      step=3)
        return o

    np.testing.assert_array_equal(run(k)[0], [0, 0, 1, 0, 0, 1, 0, 0, 1, 0])

    def python_if_on_the_register():
        nl.fori_loop(0, 2, lambda i: 1 if i else 0)

    with pytest.raises(NKIError, match="register holds a runtime value"):
        run(python_if_on_the_register)

    def negative_step():
        nl.fori_loop(0, 2, lambda i: None, step=-1)

    with pytest.raises(NKIError, match="step must be a positive compile-time integer"):
        run(negative_step)


def test_while_loop_runs_until_its_condition_register_is_zero():
    def k(count_hbm):
        acc = nl.zeros((1, 1), dtype=F32, buffer=nl.sbuf)
        count = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=count, src=count_hbm)
        one = nl.full((1, 1), 1, dtype=nl.int32, buffer=nl.sbuf)
        reg = nisa.register_alloc()
        nisa.register_load(reg, count)

        def body(r):
            nisa.tensor_scalar(dst=acc, data=acc, op0=nl.add, operand0=2.5)
            nisa.tensor_tensor(dst=count, data1=count, data2=one, op=nl.subtract)
            nisa.register_load(r, count)
            return r

        nl.while_loop(reg, body)
        return out_like(acc)

    assert run(k, _count_tile(3))[0, 0] == 7.5
    assert run(k, _count_tile(0))[0, 0] == 0.0  # checked before the first iteration

    def returns_nothing():
        nl.while_loop(nisa.register_alloc(1), lambda r: None)

    with pytest.raises(NKIError, match="must return the next condition register"):
        run(returns_nothing)


def test_dynamic_range_is_deprecated_but_runs():
    def k():
        acc = nl.zeros((1, 1), dtype=F32, buffer=nl.sbuf)
        start, stop = nisa.register_alloc(1), nisa.register_alloc(7)
        for _ in nl.dynamic_range(start, stop, 2):  # 1, 3, 5
            nisa.tensor_scalar(dst=acc, data=acc, op0=nl.add, operand0=1.0)
        return out_like(acc)

    with pytest.warns(DeprecationWarning, match="fori_loop"):
        assert run(k)[0, 0] == 3.0


def test_static_loops_take_compile_time_bounds_only():
    def k():
        for _ in nl.static_range(nisa.register_alloc(3)):
            pass

    with pytest.raises(NKIError, match="compile-time integer.*use nl.fori_loop"):
        run(k)


# ---- targets ----------------------------------------------------------------------------------


def test_trn2_is_the_default_and_trn3_is_the_other_target():
    assert DEFAULT_TARGET == "trn2" and Options().target == "trn2" and sorted(TARGETS) == ["trn2", "trn3"]
    run(lambda: None)
    assert last_stats().target == "trn2"
    MiB = 1 << 20
    # AWS's NKI architecture guides: SBUF 28 MiB (trn2) and 32 MiB (trn3) in 128 partitions; PSUM 2 MiB in 8 banks
    assert 128 * TARGETS["trn2"].sbuf_partition_bytes == 28 * MiB and 128 * TARGETS["trn3"].sbuf_partition_bytes == 32 * MiB
    for t in TARGETS.values():
        assert 128 * t.psum_partition_bytes == 2 * MiB and t.psum_banks == 8
    assert (TARGETS["trn2"].nc_version, TARGETS["trn3"].nc_version) == (3, 4)
