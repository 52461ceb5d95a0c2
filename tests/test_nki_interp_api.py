"""The NKI 0.6 API surface the interpreter grew for AWS's current kernels (docs/nki-api.md):
tensor views, fp8 dtypes, nisa enums and target queries, the instructions of isa_vector.py and
isa_dma.py, the nl math functions, and what kernel modules touch at import. Each test compares a
kernel run through nki.simulate with a NumPy expectation written from the API docs' semantics,
or checks that a constraint the docs state is refused."""

from __future__ import annotations

import importlib.util
import math

import ml_dtypes
import numpy as np
import pytest

from verispec.kernels.nki.interp import NKIError, NKIRuleError, last_stats, nki

nl, nisa = nki.language, nki.isa
rng = np.random.default_rng(7)
FP32_MIN = float(np.finfo(np.float32).min)


def run(body, *arrays, target="trn2", **kw):
    return nki.simulate(nki.jit(body), target=target, **kw)(*arrays)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def sb(shape, dtype=np.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def load(src):
    t = sb(src.shape, src.dtype)
    nisa.dma_copy(dst=t, src=src)
    return t


def store(t):
    o = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=o, src=t)
    return o


def copy_out(view):
    """An HBM/SBUF view -> a fresh SBUF tile of its shape -> HBM output."""
    t = sb(view.shape, view.dtype)
    nisa.dma_copy(dst=t, src=view)
    return store(t)


# ---- tensor views ---------------------------------------------------------------------------


@pytest.mark.parametrize("index", [
    (slice(None), slice(1, 8, 3)),  # strided slice
    (slice(-3, None), slice(None, -1)),  # negative bounds
    (slice(0, 5, 2), slice(2, 9, 2)),
], ids=["step", "negative", "both-strided"])
def test_strided_and_negative_slices_of_hbm(index):
    x = f32(6, 9)
    np.testing.assert_array_equal(run(lambda x: copy_out(x[index]), x), x[index])


def test_nested_indexing_and_integer_index_semantics():
    x = f32(4, 6, 5)

    def k(x):
        a = copy_out(x[1:4][:, 2:6][1])  # HBM: an integer index removes its dimension -> [4, 5]
        t = load(x[0])  # [6, 5] on chip
        row = t[2]  # on chip, an integer index on the partition axis keeps it: [1, 5]
        assert row.shape == (1, 5) and x[1].shape == (6, 5)
        r = sb((1, 5))
        nisa.tensor_copy(dst=r, src=row)
        return a, store(r)

    a, r = run(k, x)
    np.testing.assert_array_equal(a, x[1:4][:, 2:6][1])
    np.testing.assert_array_equal(r, x[0, 2:3])


def test_slice_and_select_methods():
    x = f32(5, 8, 6)

    def k(x):
        return copy_out(x.slice(1, 1, 7, 2).select(2, 4)), copy_out(x.select(0, 3).slice(1, 0, 6, 5))

    a, b = run(k, x)
    np.testing.assert_array_equal(a, x[:, 1:7:2, 4])
    np.testing.assert_array_equal(b, x[3, :, 0:6:5])


def test_select_with_a_runtime_index_reads_it_when_the_dma_runs():
    x = f32(4, 3, 5)  # pick x[idx] at run time
    idx = np.array([[2]], np.int32)

    def k(x, idx):
        i = load(idx)
        return copy_out(x.select(0, i))

    np.testing.assert_array_equal(run(k, x, idx), x[2])
    with pytest.raises(NKIRuleError, match="rule 12"):  # index 4 is past axis 0 (size 4)
        run(k, x, np.array([[4]], np.int32))


def test_vector_select_gathers_rows_per_partition():
    table = f32(10, 3, 4)  # [rows, a, b]
    rows = np.array([[7], [0], [7], [3]], np.int32)

    def k(table, rows):
        r = load(rows)
        return copy_out(table.vector_select(0, r))

    np.testing.assert_array_equal(run(k, table, rows), table[rows[:, 0]])


def test_permute_reshape_reshape_dim_flatten_rearrange():
    x = f32(4, 6)

    def k(x):
        a = copy_out(x.reshape((4, 2, 3)).permute((0, 2, 1)))  # [4, 3, 2]
        b = copy_out(x.reshape_dim(1, (3, -1)).flatten_dims(0, 1))  # [12, 2]
        c = copy_out(x.rearrange(("b", ("h", "w")), ("b", "w", "h"), {"h": 2}))  # [4, 3, 2]
        d = copy_out(x.reshape((24,)).reshape((3, 8)))
        return a, b, c, d

    a, b, c, d = run(k, x)
    np.testing.assert_array_equal(a, x.reshape(4, 2, 3).transpose(0, 2, 1))
    np.testing.assert_array_equal(b, x.reshape(4, 3, 2).reshape(12, 2))
    np.testing.assert_array_equal(c, x.reshape(4, 2, 3).transpose(0, 2, 1))
    np.testing.assert_array_equal(d, x.reshape(3, 8))


def test_broadcast_and_expand_dim_feed_an_instruction():
    x, col = f32(4, 3, 5), f32(4, 1)

    def k(x, col):
        t, c = load(x), load(col)
        o = sb((4, 3, 5))
        # col [4, 1] -> [4, 1, 1] -> [4, 3, 1] -> [4, 3, 5]: one value per partition, repeated (stride 0)
        wide = c.expand_dim(2).broadcast(1, 3).broadcast(2, 5)
        assert wide.get_pattern()[1:] == [[0, 3], [0, 5]]
        nisa.tensor_tensor(dst=o, data1=t, data2=wide, op=nl.add)
        return store(o)

    np.testing.assert_array_equal(run(k, x, col), x + col[:, :, None])


def test_pattern_queries():
    def k(x):
        t = sb((8, 4, 6))
        assert t.get_pattern() == [[24, 8], [6, 4], [1, 6]] and t.is_contiguous()
        assert not t.permute((0, 2, 1)).is_contiguous() and not t[:, :, 0:6:2].is_contiguous()
        assert t[:, 1:3].is_contiguous() and not t[:, :, 1:3].is_contiguous() and t[:, 1].is_contiguous()
        assert x.strides == (5, 1) and x[1:, 2:].offset == 7 and x.size == 15 and not x.is_indirect()
        assert x.select(0, 1).ndim == 1 and x.select(0, 1).get_pattern() == [[1, 5]]

    run(k, np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("bad", [
    lambda t: t.permute((1, 0, 2)),  # moves the partition axis
    lambda t: t.broadcast(2, 4),  # dimension 2 is not size 1
    lambda t: t.broadcast(0, 4),
    lambda t: t.expand_dim(0),
    lambda t: t.reshape((16, 24)),  # partition axis must stay
    lambda t: t.permute((0, 2, 1)).reshape((8, 24)),  # layout cannot be walked with one stride per dim
    lambda t: t.slice(1, 2, 9),  # end past the dimension
    lambda t: t.slice(1, 3, 3),
    lambda t: t[:, 0:9],  # on-chip out of bounds
    lambda t: t.select(0, 1),  # would drop the partition axis
    lambda t: t.flatten_dims(0, 1),
    lambda t: t.view(nl.int32),  # dtype reinterpretation: not in the interpreter
], ids=["permute-p", "broadcast-non1", "broadcast-p", "expand-p", "reshape-p", "reshape-layout", "slice-end",
        "slice-empty", "index-oob", "select-p", "flatten-p", "view"])
def test_view_constraints_from_the_docs(bad):
    def k():
        bad(sb((8, 4, 6)))

    with pytest.raises(NKIError):
        run(k)


def test_runtime_select_of_the_partition_axis_is_refused():
    def k(idx):
        bad = sb((8, 4))
        bad.select(0, load(idx))

    with pytest.raises(NKIError, match="partition"):
        run(k, np.array([[1]], np.int32))


# ---- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ml", [("float8_e4m3", ml_dtypes.float8_e4m3), ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
                                     ("float8_e5m2", ml_dtypes.float8_e5m2)])
def test_fp8_tiles_store_rounded_values(name, ml):
    x = np.array([[0.1, -1.3, 3.7, 100.0, 250.0, 300.0, 1e-3, -7e4]], np.float32)

    def k(x):
        t = sb(x.shape, getattr(nl, name))
        nisa.tensor_copy(dst=t, src=load(x))
        back = sb(x.shape)
        nisa.tensor_copy(dst=back, src=t)  # fp8 -> float32 is exact
        return store(back)

    got = run(k, x)
    want = x.astype(ml).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_fp8_formats_differ_as_nki_documents():
    """float8_e4m3 is Trainium's IEEE-like FP8 (max 240, has inf); float8_e4m3fn is OCP (max 448)."""
    assert ml_dtypes.finfo(nl.float8_e4m3).max == 240 and ml_dtypes.finfo(nl.float8_e4m3fn).max == 448
    x = np.array([[300.0]], np.float32)

    def k(x, dt):
        t = sb((1, 1), dt)
        nisa.tensor_copy(dst=t, src=load(x))
        back = sb((1, 1))
        nisa.tensor_copy(dst=back, src=t)
        return store(back)

    assert np.isinf(run(lambda x: k(x, nl.float8_e4m3), x)[0, 0])
    assert run(lambda x: k(x, nl.float8_e4m3fn), x)[0, 0] == 288.0


def test_float_to_int_rounds_to_nearest_even_and_saturates():
    x = np.array([[300.0, -5.0, 2.5, 3.5, -2.5, 254.6]], np.float32)

    def k(x, dt):
        t = sb(x.shape, dt)
        nisa.tensor_copy(dst=t, src=load(x))
        return store(t)

    np.testing.assert_array_equal(run(lambda x: k(x, nl.uint8), x), [[255, 0, 2, 4, 0, 255]])
    np.testing.assert_array_equal(run(lambda x: k(x, nl.int16), x), [[300, -5, 2, 4, -2, 255]])


def test_fp8_matmul_and_its_dtype_rules():
    a, b = f32(16, 8), f32(16, 12)
    a8, b8 = a.astype(ml_dtypes.float8_e4m3), b.astype(ml_dtypes.float8_e5m2)

    def k(a, b):
        acc = nl.ndarray((8, 12), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=load(a), moving=load(b))
        o = sb((8, 12))
        nisa.tensor_copy(dst=o, src=acc)
        return store(o)

    want = a8.astype(np.float32).T @ b8.astype(np.float32)
    np.testing.assert_allclose(run(k, a8, b8), want, rtol=1e-6, atol=1e-6)
    fn = a.astype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(NKIRuleError, match="rule 4.*float8_e4m3fn"):  # OCP fp8 is a trn3 input only
        run(k, fn, b8, target="trn2")
    with pytest.raises(NKIRuleError, match="rule 4.*mixed"):
        run(k, fn, b.astype(ml_dtypes.float8_e4m3), target="trn3")
    np.testing.assert_allclose(run(k, fn, b8, target="trn3"),
                               fn.astype(np.float32).T @ b8.astype(np.float32), rtol=1e-6, atol=1e-6)


# ---- enums and target queries -----------------------------------------------------------------


def test_engine_constants_pick_the_counted_engine():
    x = f32(4, 8)

    def k(x, eng):
        o = sb((4, 8))
        nisa.tensor_copy(dst=o, src=load(x), engine=eng)
        return store(o)

    for eng, name in ((nisa.engine.scalar, "scalar"), (nisa.gpsimd_engine, "gpsimd"), (nisa.vector_engine, "vector")):
        np.testing.assert_array_equal(run(lambda x: k(x, eng), x), x)
        assert last_stats().instructions[name] == 1
    with pytest.raises(NKIError, match="engine"):
        run(lambda x: k(x, nisa.engine.tensor), x)
    assert {m.name for m in nisa.dge_mode} == {"unknown", "swdge", "hwdge", "none"}
    assert nisa.reduce_cmd.reset_reduce.value == 3 and nisa.matmul_perf_mode.none.value == "none"


@pytest.mark.parametrize("target,version,sbuf", [("trn2", 3, 224 * 1024), ("trn3", 4, 256 * 1024)])
def test_nc_version_and_tile_size_follow_the_target(target, version, sbuf):
    seen = {}

    def k():
        seen["v"] = nisa.get_nc_version()
        seen["sbuf"] = nl.tile_size.total_available_sbuf_size
        seen["total"] = nl.tile_size.sbuf_size_bytes

    run(k, target=target)
    assert seen["v"] == version and seen["v"] >= nisa.nc_version.gen3
    assert seen["sbuf"] == sbuf and seen["total"] == 128 * sbuf
    assert nl.tile_size.psum_bank_fmax == 512 and nl.tile_size.psum_num_banks == 8 and nl.tile_size.pmax == 128


IMPORT_SURFACE = '''
from dataclasses import dataclass

from verispec.kernels.nki.interp import nki

nl, nisa = nki.language, nki.isa

SBUF_BUDGET = nl.tile_size.total_available_sbuf_size  # read at import
NC = nisa.get_nc_version()
DMA_MODE = nisa.dge_mode.none


@dataclass(frozen=True)
class TileConfig(nl.NKIObject):
    rows: int
    cols: int


class Loose(nl.NKIObject):
    pass


@nki.jit
def scale_rows(x):
    cfg = TileConfig(rows=x.shape[0], cols=x.shape[1])
    loose = Loose(factor=2.0)
    t = nl.ndarray((cfg.rows, cfg.cols), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x, dge_mode=DMA_MODE)
    o = nl.ndarray((cfg.rows, cfg.cols), dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.tensor_scalar(dst=t, data=t, op0=nl.multiply, operand0=loose.factor)
    nisa.dma_copy(dst=o, src=t, dge_mode=nisa.dge_mode.hwdge)
    return o
'''


def test_a_kernel_module_that_touches_the_import_surface(tmp_path):
    path = tmp_path / "surface_kernel.py"
    path.write_text(IMPORT_SURFACE)
    spec = importlib.util.spec_from_file_location("surface_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.SBUF_BUDGET > 0 and int(mod.NC) >= 2
    x = f32(4, 6)
    np.testing.assert_array_equal(nki.simulate(mod.scale_rows)(x), 2 * x)


# ---- dma_transpose --------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axes", [((16, 40), (1, 0)), ((3, 5, 7), (2, 1, 0)), ((2, 3, 4, 5), (3, 1, 2, 0))])
def test_dma_transpose_default_permutations(shape, axes):
    x = f32(*shape)

    def k(x):
        t = sb(tuple(shape[a] for a in axes))
        nisa.dma_transpose(dst=t, src=x)
        return store(t)

    np.testing.assert_array_equal(run(k, x), np.transpose(x, axes))
    assert last_stats().instructions["dma"] == 2


def test_dma_transpose_gathers_rows_through_vector_offsets_and_skips_bad_ones():
    table = rng.standard_normal((20, 8)).astype(ml_dtypes.bfloat16)  # 2-byte elements, as the docs require
    idx = np.array([[5], [19], [0], [25]], np.int32)  # row 25 does not exist

    def k(table, idx, skip):
        i = load(idx)
        t = sb((8, 4), table.dtype)
        nisa.memset(dst=t, value=-1.0)
        src = table.ap(pattern=[[8, 4], [1, 8]], vector_offset=i, indirect_dim=0)  # [4 rows, 8]
        nisa.dma_transpose(dst=t, src=src, axes=(1, 0), oob_mode=nisa.oob_mode.skip if skip else nisa.oob_mode.error)
        return store(t)

    got = run(lambda t, i: k(t, i, True), table, idx).astype(np.float32)
    want = np.full((8, 4), -1.0, np.float32)
    want[:, :3] = table[[5, 19, 0]].astype(np.float32).T
    np.testing.assert_array_equal(got, want)
    with pytest.raises(NKIRuleError, match="rule 12"):
        run(lambda t, i: k(t, i, False), table, idx)


@pytest.mark.parametrize("bad", ["dst-shape", "hwdge-partitions", "dtype", "swdge-direct"])
def test_dma_transpose_constraints(bad):
    x = rng.standard_normal((8, 16)).astype(ml_dtypes.bfloat16)

    def k(x):
        if bad == "dst-shape":
            nisa.dma_transpose(dst=sb((8, 16), x.dtype), src=x)
        elif bad == "hwdge-partitions":  # 2-D hardware-DGE transposes need src.shape[0] == 16
            nisa.dma_transpose(dst=sb((16, 8), x.dtype), src=x, dge_mode=nisa.dge_mode.hwdge)
        elif bad == "dtype":
            nisa.dma_transpose(dst=sb((16, 8), nl.float32), src=x)
        else:
            nisa.dma_transpose(dst=sb((16, 8), x.dtype), src=x, dge_mode=nisa.dge_mode.swdge)

    with pytest.raises(NKIError, match="dma_transpose"):
        run(k, x)


# ---- vector / gpsimd instructions -------------------------------------------------------------


@pytest.mark.parametrize("reverse0,reverse1", [(False, False), (True, False), (False, True)])
def test_scalar_tensor_tensor(reverse0, reverse1):
    x, col, y = f32(6, 10), f32(6, 1), f32(6, 10)

    def k(x, col, y):
        o = sb((6, 10))
        nisa.scalar_tensor_tensor(dst=o, data=load(x), op0=nl.subtract, operand0=load(col), op1=nl.subtract,
                                  operand1=load(y), reverse0=reverse0, reverse1=reverse1)
        return store(o)

    t = col - x if reverse0 else x - col
    want = y - t if reverse1 else t - y
    np.testing.assert_allclose(run(k, x, col, y), want, rtol=1e-6)


def test_scalar_tensor_tensor_operands_not_both_in_psum():
    def k(x):
        a = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.psum)
        b = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.tensor_copy(dst=a, src=load(x))
        nisa.tensor_copy(dst=b, src=load(x))
        nisa.scalar_tensor_tensor(dst=sb((4, 8)), data=a, op0=nl.add, operand0=1.0, op1=nl.add, operand1=b)

    with pytest.raises(NKIError, match="PSUM"):
        run(k, f32(4, 8))


def test_tensor_copy_predicated_keeps_unselected_elements():
    x, old = f32(4, 6), f32(4, 6)
    pred = (rng.random((4, 6)) < 0.5).astype(np.uint8)

    def k(x, old, pred, reverse):
        d = load(old)
        nisa.tensor_copy_predicated(dst=d, src=load(x), predicate=load(pred), reverse_pred=reverse)
        e = load(old)
        nisa.tensor_copy_predicated(dst=e, src=7.5, predicate=load(pred))
        return store(d), store(e)

    d, e = run(lambda x, o, p: k(x, o, p, False), x, old, pred)
    np.testing.assert_array_equal(d, np.where(pred != 0, x, old))
    np.testing.assert_array_equal(e, np.where(pred != 0, np.float32(7.5), old))
    d, _ = run(lambda x, o, p: k(x, o, p, True), x, old, pred)
    np.testing.assert_array_equal(d, np.where(pred == 0, x, old))
    with pytest.raises(NKIError, match="predicate must be"):
        run(lambda x, o, p: k(x, o, p, False), x, old, pred.astype(np.float32))


def test_activation_reduce_and_reduce_registers():
    x, y = f32(5, 12), f32(5, 7)

    def k(x, y):
        a, b = sb((5, 12)), sb((5, 7))
        mx, total = sb((5, 1)), sb((5, 1))
        nisa.activation_reduce(dst=a, op=nl.exp, data=load(x), reduce_op=nl.maximum, reduce_res=mx, scale=0.5)
        # a running sum over two instructions, read out by the second
        nisa.activation(dst=a, op=nl.square, data=load(x), reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reset_reduce)
        nisa.activation(dst=b, op=nl.square, data=load(y), reduce_op=nl.add, reduce_res=total,
                        reduce_cmd=nisa.reduce_cmd.reduce)
        return store(mx), store(total)

    mx, total = run(k, x, y)
    np.testing.assert_allclose(mx[:, 0], np.exp(0.5 * x).max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(total[:, 0], (x**2).sum(axis=1) + (y**2).sum(axis=1), rtol=1e-5)


def test_tensor_scalar_reduce_commands():
    x, y, init = f32(4, 9), f32(4, 5), f32(4, 1)

    def k(x, y, init):
        d1, d2 = sb((4, 9)), sb((4, 5))
        r1, r2, r3 = sb((4, 1)), sb((4, 1)), sb((4, 1))
        nisa.tensor_scalar_reduce(dst=d1, data=load(x), op0=nl.multiply, operand0=2.0, reduce_op=nl.add,
                                  reduce_res=r1, reduce_res_negate=True)
        nisa.tensor_scalar_reduce(dst=d2, data=load(y), op0=nl.add, operand0=1.0, reduce_op=nl.add,
                                  reduce_cmd=nisa.reduce_cmd.reduce, reduce_res=r2)  # adds to the registers
        nisa.tensor_scalar_reduce(dst=d2, data=load(y), op0=nl.abs, operand0=None, reduce_op=nl.max, reduce_res=r3,
                                  reduce_cmd=nisa.reduce_cmd.load_reduce, reduce_init=load(init))
        return store(d1), store(r1), store(r2), store(d2), store(r3)

    d1, r1, r2, d2, r3 = run(k, x, y, init)
    np.testing.assert_allclose(d1, 2 * x, rtol=1e-6)
    np.testing.assert_allclose(r1[:, 0], -(2 * x).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(r2[:, 0], (2 * x).sum(axis=1) + (y + 1).sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(d2, np.abs(y))
    np.testing.assert_array_equal(r3[:, 0], np.maximum(init[:, 0], np.abs(y).max(axis=1)))

    def reverse(x):
        nisa.tensor_scalar_reduce(dst=sb((4, 9)), data=load(x), op0=nl.subtract, operand0=1.0, reduce_op=nl.add,
                                  reverse0=True)

    with pytest.raises(NKIError, match="reverse0"):
        run(reverse, x)


def test_tensor_tensor_scan_is_a_linear_recurrence():
    a, b, h0 = rng.random((3, 16)).astype(np.float32), f32(3, 16), f32(3, 1)

    def k(a, b, h0, rev):
        o = sb((3, 16))
        nisa.tensor_tensor_scan(dst=o, data0=load(a), data1=load(b), initial=load(h0), op0=nl.multiply, op1=nl.add)
        s = sb((3, 16))
        nisa.tensor_tensor_scan(dst=s, data0=load(a), data1=load(b), initial=0.5, op0=nl.subtract, op1=nl.subtract,
                                reverse0=rev, reverse1=rev)
        return store(o), store(s)

    o, s = run(lambda a, b, h: k(a, b, h, False), a, b, h0)
    h, want, hs, want_s = h0[:, 0].copy(), np.empty_like(a), np.full(3, 0.5, np.float32), np.empty_like(a)
    for i in range(16):
        h = a[:, i] * h + b[:, i]
        hs = (a[:, i] - hs) - b[:, i]
        want[:, i], want_s[:, i] = h, hs
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-6)
    _, s = run(lambda a, b, h: k(a, b, h, True), a, b, h0)
    hs = np.full(3, 0.5, np.float32)
    for i in range(16):
        hs = b[:, i] - (hs - a[:, i])
        want_s[:, i] = hs
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)


def test_affine_select_causal_mask():
    x = f32(8, 8)

    def k(x, cmp):
        o = sb((8, 8))
        # keep column j of row p where p - j >= 0 (causal), else -inf-ish fill
        nisa.affine_select(dst=o, pattern=[[-1, 8]], channel_multiplier=1, on_true_tile=load(x),
                           on_false_value=-1e9, cmp_op=cmp)
        return store(o)

    p, j = np.arange(8)[:, None], np.arange(8)[None, :]
    np.testing.assert_array_equal(run(lambda x: k(x, nl.greater_equal), x), np.where(p - j >= 0, x, np.float32(-1e9)))
    np.testing.assert_array_equal(run(lambda x: k(x, nl.equal), x), np.where(p == j, x, np.float32(-1e9)))

    def bad(x):
        nisa.affine_select(dst=sb((8, 8)), pattern=[[1, 7]], channel_multiplier=0, on_true_tile=load(x),
                           on_false_value=0.0)

    with pytest.raises(NKIError, match="pattern covers 7"):
        run(bad, x)


def test_range_select_masks_a_window_and_takes_the_row_max():
    x, lo, hi = f32(4, 10), np.array([[0], [3], [5], [9]], np.float32), np.array([[4], [6], [5], [12]], np.float32)

    def k(x, lo, hi):
        o, m = sb((4, 10)), sb((4, 1))
        nisa.range_select(dst=o, on_true_tile=load(x), comp_op0=nl.greater_equal, comp_op1=nl.less,
                          bound0=load(lo), bound1=load(hi), reduce_res=m, range_start=2)
        return store(o), store(m)

    o, m = run(k, x, lo, hi)
    idx = 2 + np.arange(10)[None, :]
    want = np.where((idx >= lo) & (idx < hi), x, np.float32(FP32_MIN))
    np.testing.assert_array_equal(o, want)
    np.testing.assert_array_equal(m[:, 0], want.max(axis=1))

    def bad(x, lo, hi):
        nisa.range_select(dst=sb((4, 10)), on_true_tile=load(x), comp_op0=nl.add, comp_op1=nl.less,
                          bound0=load(lo), bound1=load(hi))

    with pytest.raises(NKIError, match="comp_op0"):
        run(bad, x, lo, hi)


def test_nc_stream_shuffle_within_quadrants():
    x, old = f32(64, 3), f32(64, 3)
    mask = [(i + 5) % 32 for i in range(32)]
    mask[7] = 255  # partition 7 (and 39) keeps what dst held

    def k(x, old):
        d = load(old)
        nisa.nc_stream_shuffle(dst=d, src=load(x), shuffle_mask=mask)
        return store(d)

    want = old.copy()
    for p in range(64):
        if mask[p % 32] != 255:
            want[p] = x[(p // 32) * 32 + mask[p % 32]]
    np.testing.assert_array_equal(run(k, x, old), want)

    def misplaced(x):
        t = load(x)
        nisa.nc_stream_shuffle(dst=sb((64, 3))[0:40], src=t[8:48], shuffle_mask=list(range(32)))

    with pytest.raises(NKIError, match="start at"):
        run(misplaced, x)


def test_max8_and_nc_find_index8():
    x = f32(5, 40)
    x[0, 3] = x[0, 9] = 10.0  # a repeated maximum

    def k(x):
        top, idx = sb((5, 8)), sb((5, 8), nl.uint32)
        t = load(x)
        nisa.max8(dst=top, src=t)
        nisa.nc_find_index8(dst=idx, data=t, vals=top)
        return store(top), store(idx)

    top, idx = run(k, x)
    want = -np.sort(-x, axis=1)[:, :8]
    np.testing.assert_array_equal(top, want)
    assert idx[0, 0] == 3 and idx[0, 1] == 9  # duplicates advance through successive occurrences
    np.testing.assert_array_equal(np.take_along_axis(x, idx.astype(np.int64), axis=1), want)

    def missing(x, v):
        idx = sb((5, 8), nl.uint16)
        nisa.nc_find_index8(dst=idx, data=load(x), vals=load(v))
        return store(idx)

    vals = x[:, :8].copy()
    vals[:, 5] = 1e6
    got = run(missing, x, vals)
    assert (got[:, 5] == 0xFFFF).all() and (got[:, 0] == 0).all()
    with pytest.raises(NKIError, match="8 to 16384"):
        run(lambda x: nisa.max8(dst=sb((5, 8)), src=load(x)), f32(5, 6))


# ---- registers --------------------------------------------------------------------------------


def test_registers_load_move_store_and_offset_a_dma():
    cache = f32(10, 4)
    pos = np.array([[6]], np.int32)

    def k(cache, pos):
        r = nisa.register_alloc()
        nisa.register_load(r, load(pos))
        r2 = nisa.register_alloc(0)
        nisa.register_move(r2, r)
        out = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.shared_hbm)
        nisa.register_store(out, r2)
        rows = sb((2, 4))
        nisa.dma_copy(dst=rows, src=cache.ap(pattern=[[4, 2], [1, 4]], offset=0, scalar_offset=r, indirect_dim=0))
        return out, store(rows)

    out, rows = run(k, cache, pos)
    assert out[0, 0] == 6
    np.testing.assert_array_equal(rows, cache[6:8])

    def unset():
        r = nisa.register_alloc()
        nisa.register_store(nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.shared_hbm), r)

    with pytest.raises(NKIError, match="before"):
        run(unset)


# ---- nl math ----------------------------------------------------------------------------------


def _sig(x):
    return 1 / (1 + np.exp(-x))


_erf = np.vectorize(math.erf)
UNARY = {
    "abs": np.abs, "square": np.square, "log": lambda x: np.log(np.abs(x) + 1), "sigmoid": _sig, "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0), "sqrt": lambda x: np.sqrt(np.abs(x) + 1), "negative": np.negative,
    "sign": np.sign, "sin": np.sin, "arctan": np.arctan, "softplus": lambda x: np.log1p(np.exp(x)),
    "gelu": lambda x: x * 0.5 * (1 + _erf(x / np.sqrt(2))), "erf": _erf,
    "gelu_apprx_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "gelu_apprx_sigmoid": lambda x: x * _sig(1.702 * x), "silu_dx": lambda x: _sig(x) * (1 + x * (1 - _sig(x))),
    "mish": lambda x: x * np.tanh(np.log1p(np.exp(x))), "floor": np.floor, "ceil": np.ceil, "trunc": np.trunc,
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_math(name):
    x = f32(4, 16) * 2
    arg = np.abs(x) + 1 if name in ("log", "sqrt") else x

    def k(x):
        return store(getattr(nl, name)(load(x)))

    np.testing.assert_allclose(run(k, arg), UNARY[name](x).astype(np.float32), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("name,fn,ints", [
    ("power", lambda a, b: np.abs(a) ** b, False), ("abs_max", lambda a, b: np.where(np.abs(a) > np.abs(b), a, b), False),
    ("abs_min", lambda a, b: np.where(np.abs(a) < np.abs(b), a, b), False),
    ("logical_and", lambda a, b: ((a > 0) & (b > 0)).astype(np.float32), False),
    ("bitwise_and", np.bitwise_and, True), ("bitwise_xor", np.bitwise_xor, True), ("left_shift", np.left_shift, True),
])
def test_binary_math(name, fn, ints):
    if ints:
        a, b = rng.integers(0, 1000, (4, 8)).astype(np.int32), rng.integers(0, 5, (4, 8)).astype(np.int32)
    else:
        a, b = f32(4, 8), f32(4, 8)
        a, b = (np.abs(a), b) if name == "power" else (a, b)
        a, b = ((a > 0).astype(np.float32), (b > 0).astype(np.float32)) if name == "logical_and" else (a, b)

    def k(a, b):
        return store(getattr(nl, name)(load(a), load(b)))

    np.testing.assert_allclose(run(k, a, b), fn(a, b), rtol=1e-6)


def test_bitvec_ops_refuse_float_operands():
    with pytest.raises(NKIError, match="bitvec"):
        run(lambda a: nl.bitwise_and(load(a), load(a)), f32(2, 4))


def test_reductions_min_prod_mean_and_copy():
    x = f32(4, 6)

    def k(x):
        t = load(x)
        return (store(nl.min(t, axis=1, keepdims=True)), store(nl.prod(t, axis=1, keepdims=True)),
                store(nl.mean(t, axis=1, keepdims=True)), store(nl.copy(t)))

    mn, pr, me, cp = run(k, x)
    np.testing.assert_array_equal(mn[:, 0], x.min(axis=1))
    np.testing.assert_allclose(pr[:, 0], x.prod(axis=1), rtol=1e-5)
    np.testing.assert_allclose(me[:, 0], x.mean(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(cp, x)
    assert last_stats().ops["tensor_copy"] >= 1
