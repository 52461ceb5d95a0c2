"""The NKI interpreter's nki.language entries and runtime (jit, simulate, grids, loops, counters),
each against a NumPy expectation."""

from __future__ import annotations

import numpy as np
import pytest

from verispec.kernels.nki.interp import NKIError, last_stats, nki

nl, nisa = nki.language, nki.isa
rng = np.random.default_rng(1)


def run(body, *arrays, **kw):
    return nki.simulate(nki.jit(body), **kw)(*arrays)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def store(t):
    o = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nl.store(o, t)
    return o


def test_load_store_zeros_full_ds():
    x = f32(8, 6)

    def k(x):
        t = nl.load(x[nl.ds(2, 4), :])
        z = nl.zeros((4, 6), dtype=nl.float32)
        f = nl.full((4, 6), 1.5, dtype=nl.float32)
        return store(t), store(z), store(f)

    t, z, f = run(k, x)
    np.testing.assert_array_equal(t, x[2:6])
    np.testing.assert_array_equal(z, np.zeros((4, 6)))
    np.testing.assert_array_equal(f, np.full((4, 6), 1.5))


def test_load_with_dtype_converts():
    x = f32(2, 3)

    def k(x):
        return store(nl.load(x, dtype="bfloat16"))  # NKI dtypes may be given by name

    got = run(k, x)
    assert got.dtype == nl.bfloat16
    np.testing.assert_array_equal(got, x.astype(nl.bfloat16))


@pytest.mark.parametrize("name,fn", [
    ("exp", np.exp), ("reciprocal", lambda a: 1 / a), ("rsqrt", lambda a: 1 / np.sqrt(a)),
    ("silu", lambda a: a / (1 + np.exp(-a))),
])
def test_unary_math(name, fn):
    x = np.abs(f32(3, 4)) + 0.5

    def k(x):
        return store(getattr(nl, name)(nl.load(x)))

    np.testing.assert_allclose(run(k, x), fn(x), rtol=1e-5)


@pytest.mark.parametrize("name,fn", [
    ("add", np.add), ("subtract", np.subtract), ("multiply", np.multiply), ("divide", np.divide),
    ("maximum", np.maximum), ("minimum", np.minimum),
])
def test_binary_math_tile_column_and_scalar(name, fn):
    a, b, col = f32(3, 4), f32(3, 4) + 5.0, f32(3, 1) + 5.0
    op = getattr(nl, name)

    def k(a, b, col):
        ta, tb, tc = nl.load(a), nl.load(b), nl.load(col)
        return store(op(ta, tb)), store(op(ta, tc)), store(op(ta, 2.0)), store(op(2.0, tb))

    tt, tcol, ts, st = run(k, a, b, col)
    np.testing.assert_allclose(tt, fn(a, b), rtol=1e-6)
    np.testing.assert_allclose(tcol, fn(a, col), rtol=1e-6)
    np.testing.assert_allclose(ts, fn(a, np.float32(2.0)), rtol=1e-6)
    np.testing.assert_allclose(st, fn(np.float32(2.0), b), rtol=1e-6)


def test_where_max_sum():
    x, c = f32(4, 5), (f32(4, 5) > 0).astype(np.uint8)

    def k(x, c):
        tx = nl.load(x)
        return (store(nl.where(nl.load(c), tx, -1.0)), store(nl.max(tx, axis=1, keepdims=True)),
                store(nl.sum(tx, axis=1)))

    w, mx, sm = run(k, x, c)
    np.testing.assert_array_equal(w, np.where(c > 0, x, -1.0))
    np.testing.assert_array_equal(mx, x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(sm, x.sum(axis=1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("transpose_x", [False, True])
def test_matmul_and_transpose(transpose_x):
    x = f32(32, 16) if transpose_x else f32(16, 32)  # [K, M] or [M, K]
    y = f32(32, 24)

    def k(x, y):
        ps = nl.matmul(nl.load(x), nl.load(y), transpose_x=transpose_x)
        tr = nl.transpose(nl.load(y))
        a, b = nl.ndarray(ps.shape, nl.float32), nl.ndarray(tr.shape, nl.float32)
        nisa.tensor_copy(dst=a, src=ps)
        nisa.tensor_copy(dst=b, src=tr)
        return store(a), store(b)

    mm, tr = run(k, x, y)
    np.testing.assert_allclose(mm, (x.T if transpose_x else x) @ y, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tr, y.T)
    assert last_stats().ops["nc_matmul"] == 1
    assert last_stats().ops["nc_transpose"] == (1 if transpose_x else 2)  # x is transposed first


def _visit_order(range_fn, seen):
    """A kernel that records, in Python, the order its loop's iterations ran in."""

    def k():
        for i in range_fn(16):
            seen.append(i)

    return k


@pytest.mark.parametrize("range_fn", [nl.affine_range, nl.sequential_range, nl.static_range, range])
def test_every_static_loop_runs_in_order(range_fn):
    seen = []
    run(_visit_order(range_fn, seen), seed=3)
    assert seen == list(range(16))
    assert list(range_fn(2, 9, 3)) == [2, 5, 8]  # range's signature, also outside a kernel


def test_the_parallel_loop_lint_shuffles_affine_range_by_seed():
    orders = {}
    for seed in (3, 3, 4):
        seen = []
        run(_visit_order(nl.affine_range, seen), seed=seed, lint_parallel_loops=True)
        orders.setdefault(seed, []).append(seen)
    assert sorted(orders[3][0]) == list(range(16)) and orders[3][0] != list(range(16))
    assert orders[3][0] == orders[3][1]  # seeded: reproducible
    assert orders[4][0] != orders[3][0]
    seen = []
    run(_visit_order(nl.sequential_range, seen), seed=3, lint_parallel_loops=True)
    assert seen == list(range(16))  # the lint leaves the other loops alone


def test_static_range_tiles_hold_memory_while_referenced():
    def k():
        o = nl.ndarray((1, 4), dtype=nl.float32, buffer=nl.shared_hbm)
        for i in nl.static_range(4):
            nisa.dma_copy(dst=o[0:1, i:i + 1], src=nl.full((1, 1), float(i), dtype=nl.float32))
        return o

    np.testing.assert_array_equal(run(k), [[0, 1, 2, 3]])
    assert last_stats().sbuf_peak_partition_bytes == 4  # each tile is dropped after its DMA

    def kept():
        tiles = [nl.full((1, 1), float(i), dtype=nl.float32) for i in nl.static_range(4)]
        o = nl.ndarray((1, 4), dtype=nl.float32, buffer=nl.shared_hbm)
        for i, t in enumerate(tiles):
            nisa.dma_copy(dst=o[0:1, i:i + 1], src=t)
        return o

    np.testing.assert_array_equal(run(kept), [[0, 1, 2, 3]])
    assert last_stats().sbuf_peak_partition_bytes == 16  # four tiles live at once


def test_spmd_grid_program_ids_share_outputs():
    x = f32(3, 2, 4)

    def body(x):
        o = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        i, j = nl.program_id(0), nl.program_id(1)
        assert (nl.num_programs(0), nl.num_programs(1), nl.num_programs(), nl.program_ndim()) == (3, 2, 6, 2)
        t = nl.ndarray((1, 4), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[i, j:j + 1, :])
        doubled = nl.multiply(t, 2.0)
        nisa.dma_copy(dst=o[i, j:j + 1, :], src=doubled)
        return o

    kernel = nki.jit(body)
    np.testing.assert_array_equal(nki.simulate(kernel[3, 2])(x), 2 * x)
    assert last_stats().ops["dma_copy"] == 12  # 6 programs x (load + store)


def test_targets_and_counters_reported():
    def k():
        t = nl.ndarray((128, 60 * 1024), dtype=nl.float32, buffer=nl.sbuf)  # 240 KiB per partition
        nisa.memset(dst=t, value=0.0)

    with pytest.raises(Exception, match="rule 3"):
        run(k)  # the default target, trn2: 224 KiB
    assert last_stats().target == "trn2"
    run(k, target="trn3")  # 256 KiB
    s = last_stats()
    assert s.target == "trn3" and s.sbuf_peak_partition_bytes == 240 * 1024
    assert s.as_dict()["instructions"] == {"tensor": 0, "vector": 1, "scalar": 0, "gpsimd": 0, "sync": 0, "dma": 0}


def test_runtime_values_cannot_drive_python_control_flow():
    def k(x):
        t = nl.load(x)
        if t:  # a runtime value is not known while the kernel is traced
            pass

    with pytest.raises(NKIError, match="runtime values"):
        run(k, f32(2, 2))


def test_unknown_target_and_instructions_outside_a_kernel():
    with pytest.raises(NKIError, match="unknown target"):
        run(lambda: None, target="trn9")
    with pytest.raises(NKIError, match=r"unknown target 'trn1'; NKI 0.6 supports \['trn2', 'trn3'\]"):
        run(lambda: None, target="trn1")  # NKI 0.6 supports Trainium2 and Trainium3 only
    with pytest.raises(NKIError, match="inside a kernel"):
        nl.ndarray((2, 2), dtype=nl.float32)


def test_returning_an_on_chip_tile_is_an_error():
    with pytest.raises(NKIError, match="returns HBM tensors"):
        run(lambda x: nl.load(x), f32(2, 2))


def test_tile_size_constants_and_hbm_scratch():
    assert (nl.tile_size.pmax, nl.tile_size.psum_fmax) == (128, 512)
    assert (nl.tile_size.gemm_stationary_fmax, nl.tile_size.gemm_moving_fmax) == (128, 512)
    x = f32(3, 5)

    def k(x):
        scratch = nl.ndarray((3, 5), dtype=nl.float32, buffer=nl.hbm)  # kernel-private HBM
        nisa.dma_copy(dst=scratch, src=x)
        return store(nl.load(scratch))

    np.testing.assert_array_equal(run(k, x), x)
    assert last_stats().hbm_read_bytes == 2 * 60 and last_stats().hbm_write_bytes == 2 * 60


def test_fresh_on_chip_tiles_hold_nan_or_sentinel():
    seen = {}

    def k():
        for name, dt in (("f32", nl.float32), ("bf16", nl.bfloat16), ("i32", nl.int32), ("u8", nl.uint8)):
            seen[name] = nl.ndarray((2, 3), dtype=dt, buffer=nl.sbuf).alloc.data.copy()  # what an engine would read
        seen["psum"] = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.psum).alloc.data.copy()

    run(k)
    for name in ("f32", "bf16", "psum"):
        assert np.isnan(seen[name].astype(np.float32)).all(), name
    assert (seen["i32"] == np.iinfo(np.int32).min).all() and (seen["u8"] == 255).all()
