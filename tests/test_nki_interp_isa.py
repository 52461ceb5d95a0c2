"""The NKI interpreter's instructions (nki.isa), one by one, each against a NumPy expectation
written from the semantics in docs/nki.md."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from verispec.kernels.nki.interp import NKIError, last_stats, nki

nl, nisa = nki.language, nki.isa
BF16 = ml_dtypes.bfloat16
rng = np.random.default_rng(0)


def run(body, *arrays, **kw):
    """Run ``body(*hbm_tensors)`` as a kernel; it returns HBM tensors."""
    return nki.simulate(nki.jit(body), **kw)(*arrays)


def sb(shape, dtype=np.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def out(shape, dtype=np.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.shared_hbm)


def load(src, dtype=None):
    t = sb(src.shape, src.dtype)
    nisa.dma_copy(dst=t, src=src)
    return t


def store(t):
    o = out(t.shape, t.dtype)
    nisa.dma_copy(dst=o, src=t)
    return o


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- DMA ------------------------------------------------------------------------------------


def test_dma_copy_slices_and_counts_bytes():
    x = f32(6, 10)

    def k(x):
        t = sb((4, 3))
        nisa.dma_copy(dst=t, src=x[1:5, 2:5])
        return store(t)

    np.testing.assert_array_equal(run(k, x), x[1:5, 2:5])
    s = last_stats()
    assert s.instructions["dma"] == 2 and s.dma_bytes == 2 * 12 * 4
    assert s.hbm_read_bytes == 48 and s.hbm_write_bytes == 48


def test_dma_copy_access_pattern_transposes():
    x = f32(5, 8)  # read x.T [8, 5] by walking elements with stride 1 across partitions

    def k(x):
        t = sb((8, 5))
        nisa.dma_copy(dst=t, src=x.ap(pattern=[[1, 8], [8, 5]], offset=0))
        return store(t)

    np.testing.assert_array_equal(run(k, x), x.T)


def test_dma_copy_scalar_offset_moves_along_indirect_dim():
    cache = f32(2, 3, 10, 4)  # [B, H, S, D]
    pos = np.array([6], np.int32)

    def k(cache, pos):
        p = sb((1, 1), np.int32)
        nisa.dma_copy(dst=p, src=pos.ap(pattern=[[1, 1], [1, 1]], offset=0))
        t = sb((3, 2, 4))  # rows pos, pos+1 of every head of batch row 1
        src = cache.ap(pattern=[[40, 3], [4, 2], [1, 4]], offset=1 * 120, scalar_offset=p, indirect_dim=2)
        nisa.dma_copy(dst=t, src=src)
        return store(t)

    np.testing.assert_array_equal(run(k, cache, pos), cache[1, :, 6:8, :])


def test_dma_copy_vector_offset_gathers_rows():
    table = f32(9, 6)
    idx = np.array([[7], [0], [3]], np.int32)

    def k(table, idx):
        i = load(idx)
        t = sb((3, 4))
        nisa.dma_copy(dst=t, src=table.ap(pattern=[[6, 3], [1, 4]], offset=2, vector_offset=i, indirect_dim=0))
        return store(t)

    np.testing.assert_array_equal(run(k, table, idx), table[[7, 0, 3], 2:6])


def test_dma_copy_oob_skip_drops_out_of_range_rows():
    table = f32(4, 3)
    idx = np.array([[1], [9], [3]], np.int32)  # 9 is past the table

    def k(table, idx):
        i = load(idx)
        t = sb((3, 3))
        nisa.memset(dst=t, value=-5.0)
        nisa.dma_copy(dst=t, src=table.ap(pattern=[[3, 3], [1, 3]], vector_offset=i, indirect_dim=0),
                      oob_mode=nisa.oob_mode.skip)
        return store(t)

    got = run(k, table, idx)
    np.testing.assert_array_equal(got[[0, 2]], table[[1, 3]])
    np.testing.assert_array_equal(got[1], [-5.0] * 3)
    assert last_stats().hbm_read_bytes == 3 * 4 + 2 * 3 * 4  # idx + the two rows moved


def test_dma_copy_into_hbm_in_place():
    x = np.zeros((4, 4), np.float32)
    v = np.full((2, 4), 7.0, np.float32)

    def k(x, v):
        nisa.dma_copy(dst=x[1:3, :], src=v)

    run(k, x, v)
    np.testing.assert_array_equal(x, np.array([[0] * 4, [7] * 4, [7] * 4, [0] * 4], np.float32))


def test_dma_copy_rejects_dtype_change():
    def k(x):
        t = sb((2, 2), BF16)
        nisa.dma_copy(dst=t, src=x)

    with pytest.raises(NKIError, match="DMA does not convert"):
        run(k, f32(2, 2))


# ---- copies, constants ----------------------------------------------------------------------


def test_tensor_copy_casts_and_rounds_to_bf16():
    x = np.array([[1.0 + 2**-9, 3.0, -0.1]], np.float32)

    def k(x):
        t = load(x)
        b = sb((1, 3), BF16)
        nisa.tensor_copy(dst=b, src=t)
        return store(b)

    got = run(k, x)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.astype(np.float32), x.astype(BF16).astype(np.float32))
    assert got[0, 0] == 1.0  # 1 + 2^-9 is below bf16's resolution at 1


def test_memset_and_iota():
    def k():
        a = sb((3, 4))
        nisa.memset(dst=a, value=2.5)
        b = sb((3, 2, 4), np.int32)
        nisa.iota(dst=b, pattern=[[10, 2], [1, 4]], offset=5, channel_multiplier=100)
        return store(a), store(b)

    a, b = run(k)
    np.testing.assert_array_equal(a, np.full((3, 4), 2.5, np.float32))
    p, i, j = np.meshgrid(np.arange(3), np.arange(2), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(b, 5 + 100 * p + 10 * i + j)
    assert last_stats().instructions["gpsimd"] == 1


# ---- tensor engine --------------------------------------------------------------------------


def test_nc_matmul_is_stationary_transposed_times_moving():
    st, mv = f32(64, 16), f32(64, 40)

    def k(st, mv):
        ps = nl.ndarray((16, 40), dtype=np.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(st), moving=load(mv))
        r = sb((16, 40))
        nisa.tensor_copy(dst=r, src=ps)
        return store(r)

    np.testing.assert_allclose(run(k, st, mv), st.T @ mv, rtol=1e-5, atol=1e-5)
    assert last_stats().instructions["tensor"] == 1


@pytest.mark.parametrize("accumulate", [None, True, False])
def test_nc_matmul_accumulate_modes(accumulate):
    a1, b1, a2, b2 = f32(8, 4), f32(8, 5), f32(8, 4), f32(8, 5)

    def k(a1, b1, a2, b2):
        ps = nl.ndarray((4, 5), dtype=np.float32, buffer=nl.psum)
        first = accumulate is not True  # accumulate=True needs a written tile to add to
        nisa.nc_matmul(dst=ps, stationary=load(a1), moving=load(b1), accumulate=None if first else False)
        nisa.nc_matmul(dst=ps, stationary=load(a2), moving=load(b2), accumulate=accumulate)
        r = sb((4, 5))
        nisa.tensor_copy(dst=r, src=ps)
        return store(r)

    want = a2.T @ b2 if accumulate is False else a1.T @ b1 + a2.T @ b2
    np.testing.assert_allclose(run(k, a1, b1, a2, b2), want, rtol=1e-5, atol=1e-5)


def test_nc_matmul_bf16_operands_accumulate_in_fp32():
    a = rng.standard_normal((128, 8)).astype(BF16)
    b = rng.standard_normal((128, 8)).astype(BF16)

    def k(a, b):
        ps = nl.ndarray((8, 8), dtype=np.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps, stationary=load(a), moving=load(b))
        r = sb((8, 8))
        nisa.tensor_copy(dst=r, src=ps)
        return store(r)

    want = a.astype(np.float64).T @ b.astype(np.float64)  # bf16 products are exact in fp32
    np.testing.assert_allclose(run(k, a, b), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("where", ["psum", "sbuf"])
def test_nc_transpose_on_tensor_and_vector_engine(where):
    x = f32(20, 30) if where == "psum" else f32(7, 32)

    def k(x):
        dst = nl.ndarray(x.shape[::-1], dtype=np.float32, buffer=nl.psum if where == "psum" else nl.sbuf)
        nisa.nc_transpose(dst=dst, data=load(x))
        r = sb(x.shape[::-1])
        nisa.tensor_copy(dst=r, src=dst)
        return store(r)

    np.testing.assert_array_equal(run(k, x), x.T)
    engine = "tensor" if where == "psum" else "vector"
    assert last_stats().ops["nc_transpose"] == 1 and last_stats().instructions[engine] >= 1


# ---- vector and scalar engines --------------------------------------------------------------

BINARY = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide,
          "maximum": np.maximum, "minimum": np.minimum,
          # comparisons: 1.0 where true, 0.0 where false
          "equal": lambda a, b: (a == b) * 1.0, "not_equal": lambda a, b: (a != b) * 1.0,
          "greater": lambda a, b: (a > b) * 1.0, "greater_equal": lambda a, b: (a >= b) * 1.0,
          "less": lambda a, b: (a < b) * 1.0, "less_equal": lambda a, b: (a <= b) * 1.0}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_tensor_tensor_ops(name):
    a, b = f32(4, 6), f32(4, 6) + 3.0
    b[0, :3] = a[0, :3]  # some equal elements for the comparisons

    def k(a, b):
        r = sb((4, 6))
        nisa.tensor_tensor(dst=r, data1=load(a), data2=load(b), op=getattr(nl, name))
        return store(r)

    np.testing.assert_allclose(run(k, a, b), BINARY[name](a, b), rtol=1e-6)


def test_tensor_scalar_vector_operand_reverse_and_two_ops():
    x, col = f32(5, 7), f32(5, 1)

    def k(x, col):
        r = sb((5, 7))
        nisa.tensor_scalar(dst=r, data=load(x), op0=nl.subtract, operand0=load(col), reverse0=True,
                           op1=nl.multiply, operand1=3.0)
        return store(r)

    np.testing.assert_allclose(run(k, x, col), (col - x) * 3.0, rtol=1e-6)


@pytest.mark.parametrize("op,fn", [("maximum", np.max), ("add", np.sum), ("max", np.max), ("sum", np.sum)])
def test_tensor_reduce_free_axes(op, fn):
    x = f32(6, 3, 5)

    def k(x):
        r = sb((6, 1))
        nisa.tensor_reduce(dst=r, op=getattr(nl, op), data=load(x), axis=(1, 2), negate=True)
        return store(r)

    np.testing.assert_allclose(run(k, x), -fn(x, axis=(1, 2))[:, None], rtol=1e-5)


def test_tensor_reduce_keepdims_last_axis():
    x = f32(4, 3, 5)

    def k(x):
        r = sb((4, 3, 1))
        nisa.tensor_reduce(dst=r, op=nl.maximum, data=load(x), axis=2, keepdims=True)
        return store(r)

    np.testing.assert_array_equal(run(k, x), x.max(axis=2, keepdims=True))


@pytest.mark.parametrize("name,fn", [
    ("exp", np.exp), ("silu", lambda v: v / (1 + np.exp(-v))), ("copy", lambda v: v),
    ("rsqrt", lambda v: 1 / np.sqrt(v)), ("reciprocal", lambda v: 1 / v),
])
def test_activation_functions_with_scale_and_bias_tile(name, fn):
    x, bias = np.abs(f32(4, 6)) + 0.5, np.abs(f32(4, 1))

    def k(x, bias):
        r = sb((4, 6))
        total = sb((4, 1))
        nisa.activation(dst=r, op=getattr(nl, name), data=load(x), bias=load(bias), scale=0.5,
                        reduce_op=nl.add, reduce_res=total)
        return store(r), store(total)

    got, total = run(k, x, bias)
    want = fn(x * 0.5 + bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(total, want.sum(axis=1, keepdims=True), rtol=1e-5)
    assert last_stats().instructions["scalar"] == 1


def test_activation_scale_tile():
    x, scale = f32(3, 4), f32(3, 1)

    def k(x, scale):
        r = sb((3, 4))
        nisa.activation(dst=r, op=nl.copy, data=load(x), scale=load(scale))
        return store(r)

    np.testing.assert_allclose(run(k, x, scale), x * scale, rtol=1e-6)


def test_reciprocal():
    x = f32(3, 5) + 4.0

    def k(x):
        r = sb((3, 5))
        nisa.reciprocal(dst=r, data=load(x))
        return store(r)

    np.testing.assert_allclose(run(k, x), 1.0 / x, rtol=1e-6)
