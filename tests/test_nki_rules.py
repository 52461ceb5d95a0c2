"""Each of the twelve rules of docs/nki.md: a kernel that breaks it is rejected with an error
naming the rule (or, for the storage rules 9 and 11, shows the effect the rule describes; rule 10
is the opt-in parallel-loop lint, stricter than NKI 0.6)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from verispec.kernels.nki.interp import NKIRuleError, UndefinedOutputWarning, last_stats, nki

nl, nisa = nki.language, nki.isa
F32 = nl.float32


def run(body, *arrays, **kw):
    return nki.simulate(nki.jit(body), **kw)(*arrays)


def sb(shape, dtype=F32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def ps(shape):
    return nl.ndarray(shape, dtype=F32, buffer=nl.psum)


def filled(shape, value=1.0, dtype=F32):
    t = sb(shape, dtype)
    nisa.memset(dst=t, value=value)
    return t


def rejects(rule: int, body, *arrays, match: str = "", **kw):
    with pytest.raises(NKIRuleError, match=rf"rule {rule} \(.*\).*{match}") as err:
        run(body, *arrays, **kw)
    assert err.value.rule == rule
    return err.value


# ---- five rule-breaking kernels, one per hardware rule --------------------------------------------


def test_129_partition_tile_is_rejected():
    rejects(1, lambda: sb((129, 4)), match="129 partitions > 128")


def test_matmul_with_moving_free_size_513_is_rejected():
    def k():
        # (a [4, 513] fp32 result would not even fit a PSUM bank: rule 2 guards that separately)
        nisa.nc_matmul(dst=ps((4, 512)), stationary=filled((8, 4)), moving=filled((8, 513)))

    e = rejects(4, k, match="moving free size 513 > 512")
    assert str(e).startswith("rule 4 (nc_matmul)")


def test_reduction_over_the_partition_axis_is_rejected():
    def k():
        nisa.tensor_reduce(dst=sb((1, 4)), op=nl.add, data=filled((8, 4)), axis=0)

    rejects(6, k, match="partition axis")
    rejects(6, lambda: nl.max(filled((8, 4)), axis=0))


def test_an_output_computed_from_an_unwritten_tile_is_reported():
    def k():
        t = sb((4, 4))  # allocated, never written: reading it is legal, and yields NaN
        o = nl.ndarray((4, 4), dtype=F32, buffer=nl.shared_hbm)
        u = sb((4, 4))
        nisa.tensor_copy(dst=u, src=t)
        nisa.dma_copy(dst=o, src=u)
        return o

    rejects(9, k, match=r"output 0 hbm\d*\[4, 4\]: 16 of 16 elements hold no defined value \(0 never written, "
                        r"16 computed from never-written memory\), e.g. at \[0, 0\]")
    assert np.isnan(run(k, check_outputs="off")).all()


def test_affine_range_with_a_carried_dependency_fails_the_parallel_loop_lint():
    def k(o):
        counter = nl.zeros((1, 1), dtype=F32)
        for i in nl.affine_range(8):
            nisa.dma_copy(dst=o.ap(pattern=[[8, 1], [1, 1]], offset=i), src=counter)
            nisa.tensor_scalar(dst=counter, data=counter, op0=nl.add, operand0=1.0)

    e = rejects(10, k, np.zeros((1, 8), np.float32), lint_parallel_loops=True, match="loop-carried dependency")
    assert str(e).startswith("rule 10 (parallel-loop lint, stricter than NKI)")
    o = np.zeros((1, 8), np.float32)
    run(k, o)  # NKI 0.6: affine_range runs in order, like range()
    np.testing.assert_array_equal(o, [list(range(8))])


# ---- the rest, rule by rule -----------------------------------------------------------------


def test_rule1_psum_partitions():
    rejects(1, lambda: ps((130, 2)), match="PSUM")


def test_rule2_psum_tile_and_bank_budget():
    rejects(2, lambda: ps((128, 513)), match="one bank")

    def nine_banks():
        return [ps((128, 512)) for _ in range(9)]

    rejects(2, nine_banks, match="bank 9 of 8")

    def eight_then_loop():  # tiles allocated inside a loop body are freed at its end
        keep = [ps((128, 512)) for _ in range(7)]
        for _ in nl.sequential_range(3):
            ps((128, 512))
        return None if keep else None

    run(eight_then_loop)


def big(free):
    def k():
        sb((128, free))  # free x 4 B per partition

    return k


def test_rule3_sbuf_capacity_per_target_and_lifetime():
    run(big(56 * 1024))  # the default target, trn2: 224 KiB per partition
    rejects(3, big(56 * 1024 + 1), match="229380 B > 229376 B per partition on trn2")
    run(big(64 * 1024), target="trn3")  # 256 KiB
    rejects(3, big(64 * 1024 + 1), target="trn3", match="262148 B > 262144 B per partition on trn3")

    def kept_in_a_list():  # a tile lives while the kernel references it
        kept = []
        for _ in range(4):
            kept.append(filled((128, 16 * 1024)))  # 64 KiB per partition each
        return None if kept else None

    rejects(3, kept_in_a_list, match="brings live SBUF to 262144 B > 229376 B")

    def dropped_each_iteration():
        for _ in range(6):
            filled((128, 16 * 1024))  # nothing keeps it

    run(dropped_each_iteration)
    assert last_stats().sbuf_peak_partition_bytes == 64 * 1024

    def use_after_the_loop():
        kept = []
        for i in nl.sequential_range(2):
            kept.append(filled((2, 2), float(i)))
        o = nl.ndarray((2, 2), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=kept[0])
        return o

    np.testing.assert_array_equal(run(use_after_the_loop), np.zeros((2, 2)))


@pytest.mark.parametrize("case,match", [
    ("stationary_129", "stationary free size 129 > 128"),
    ("psum_operand", "must be in SBUF"),
    ("mixed_dtypes", "float32 operand needs a float32 partner"),
    ("bf16_dst", "dst must be a float32 PSUM tile"),
    ("sbuf_dst", "dst must be a float32 PSUM tile"),
    ("contraction", "contraction"),
])
def test_rule4_nc_matmul_layout(case, match):
    def k():
        st, mv, dst = filled((8, 4)), filled((8, 6)), ps((4, 6))
        if case == "stationary_129":
            st, dst = filled((8, 129)), ps((129 // 2, 6))
        elif case == "psum_operand":
            mv = ps((8, 6))
            nisa.memset(dst=mv, value=0.0)
        elif case == "mixed_dtypes":
            mv = filled((8, 6), dtype=nl.bfloat16)
        elif case == "bf16_dst":
            dst = nl.ndarray((4, 6), dtype=nl.bfloat16, buffer=nl.psum)
        elif case == "sbuf_dst":
            dst = sb((4, 6))
        elif case == "contraction":
            mv = filled((16, 6))
        nisa.nc_matmul(dst=dst, stationary=st, moving=mv)

    rejects(4, k, match=match)


def test_rule5_compute_instructions_never_touch_hbm():
    def k(x):
        nisa.tensor_copy(dst=sb((2, 3)), src=x)

    rejects(5, k, np.ones((2, 3), np.float32), match="in HBM")

    def k2(x):
        nisa.memset(dst=x, value=0.0)

    rejects(5, k2, np.ones((2, 3), np.float32))


def test_rule7_transpose_limits():
    def pe():
        nisa.nc_transpose(dst=ps((128, 128)), data=filled((128, 129)))

    rejects(7, pe, match="at most 128 x 128")

    def ve():
        nisa.nc_transpose(dst=sb((33, 33)), data=filled((33, 33)))

    rejects(7, ve, match="at most 32 x 32")


def test_rule8_activation_bias_is_one_value_per_partition():
    def k():
        nisa.activation(dst=sb((4, 6)), op=nl.exp, data=filled((4, 6)), bias=filled((4, 2)))

    rejects(8, k, match=r"bias must be one value per partition \[4, 1\]")

    def k2():
        nisa.activation(dst=sb((4, 6)), op=nl.exp, data=filled((4, 6)), scale=filled((4, 6)))

    rejects(8, k2, match="scale")


def test_rule9_fresh_memory_is_nan_or_sentinel_and_outputs_are_checked():
    def k():
        o = nl.ndarray((2, 4), dtype=F32, buffer=nl.shared_hbm)
        i = nl.ndarray((2, 4), dtype=nl.int32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o[0:1, :], src=filled((1, 4), 3.0))  # half of o written
        return o, i

    rejects(9, k, match=r"output 0 .*: 4 of 8 elements .*\(4 never written.*e.g. at \[1, 0\], \[1, 1\].*"
                        r"output 1 .*: 8 of 8 elements")
    with pytest.warns(UndefinedOutputWarning, match="output 0"):
        o, i = run(k, check_outputs="warn")
    np.testing.assert_array_equal(o[0], [3.0] * 4)
    assert np.isnan(o[1]).all()  # what nothing wrote shows up in the result
    assert (i == np.iinfo(np.int32).min).all()

    def partial():  # reading half-written memory is legal; the unwritten half is never stored
        t = sb((4, 4))
        nisa.memset(dst=t[0:4, 0:2], value=1.0)
        u = sb((4, 4))
        nisa.tensor_scalar(dst=u, data=t, op0=nl.multiply, operand0=2.0)
        o = nl.ndarray((4, 2), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=u[0:4, 0:2])
        return o

    np.testing.assert_array_equal(run(partial), np.full((4, 2), 2.0))

    def accumulate_into_fresh_psum():  # adds to NaN: legal, and reported once it reaches an output
        acc = ps((4, 6))
        nisa.nc_matmul(dst=acc, stationary=filled((8, 4)), moving=filled((8, 6)), accumulate=True)
        r = sb((4, 6))
        nisa.tensor_copy(dst=r, src=acc)
        o = nl.ndarray((4, 6), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=r)
        return o

    rejects(9, accumulate_into_fresh_psum, match="24 computed from never-written memory")
    assert np.isnan(run(accumulate_into_fresh_psum, check_outputs="off")).all()


def test_rule10_write_after_read_and_shared_psum_accumulation():
    def war(x):  # iteration i reads element i+1, which iteration i+1 overwrites
        t = nl.load(x)
        for i in nl.affine_range(3):
            nisa.tensor_copy(dst=t[0:1, i:i + 1], src=t[0:1, i + 1:i + 2])

    rejects(10, war, np.ones((1, 4), np.float32), lint_parallel_loops=True)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    run(war, x)  # without the lint it is an ordinary in-order loop

    def accumulate(a, b):  # associative: shared PSUM accumulation across iterations is fine
        acc = ps((4, 6))
        for i in nl.affine_range(3):
            nisa.nc_matmul(dst=acc, stationary=nl.load(a[i]), moving=nl.load(b[i]))
        r = sb((4, 6))
        nisa.tensor_copy(dst=r, src=acc)
        o = nl.ndarray((4, 6), dtype=F32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=r)
        return o

    a = np.random.default_rng(0).standard_normal((3, 8, 4)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((3, 8, 6)).astype(np.float32)
    want = sum(a[i].T @ b[i] for i in range(3))
    np.testing.assert_allclose(run(accumulate, a, b, lint_parallel_loops=True), want, rtol=1e-5, atol=1e-5)


def test_rule11_bf16_values_are_stored_rounded():
    x = np.array([[1.0 + 2**-8 + 2**-10, 256.0 + 1.0, 1e-3]], np.float32)

    def k(x):
        b = sb((1, 3), nl.bfloat16)
        nisa.tensor_scalar(dst=b, data=nl.load(x), op0=nl.multiply, operand0=1.0)
        o = nl.ndarray((1, 3), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=o, src=b)
        return o

    got = run(k, x).astype(np.float64)
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float64))
    assert got[0, 1] == 256.0 and got[0, 0] == 1.0 + 2**-7  # round to nearest even at 8 significant bits


def test_rule12_out_of_bounds_dma():
    def sliced(x):
        t = sb((4, 3))
        nisa.dma_copy(dst=t, src=x[2:6, :])  # x has 5 rows

    rejects(12, sliced, np.ones((5, 3), np.float32), match="3 element\\(s\\) out of bounds")

    def runtime_offset(cache, pos):  # rows pos..pos+1 of a [2, 6, 4] cache, along axis 1 only
        p = nl.load(pos)
        nisa.dma_copy(dst=cache.ap(pattern=[[4, 2], [1, 4]], offset=0, scalar_offset=p, indirect_dim=1),
                      src=nl.full((2, 4), 1.0, dtype=F32))

    cache = np.zeros((2, 6, 4), np.float32)
    run(runtime_offset, cache, np.array([[4]], np.int32))
    assert cache[0, 4:6].sum() == 8 and cache.sum() == 8
    # slot 5 + 1 = 6 is past the slot axis even though the flat index is inside the tensor
    rejects(12, runtime_offset, cache, np.array([[5]], np.int32), match="out of bounds")
