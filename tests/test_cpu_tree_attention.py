"""The ``cpu`` backend's verify attention with a token tree's ``active_mask`` (attention.c's mask
argument): random trees' ancestor masks and arbitrary masks against the torch reference, a
causal mask bitwise the mask-free kernel, rows that see nothing, and the mask's errors."""

import random

import pytest
import torch

from verispec.kernels import cpu as native
from verispec.kernels import reference
from verispec.kernels.cpu.attention import MAX_T, verify_attention

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


def tree_mask(parents: list[int]) -> torch.Tensor:
    """[T, T] ancestor mask of a tree given each node's parent (-1: a child of the cached prefix;
    parents come before their children): node t sees node j iff j is t or one of its ancestors."""
    T = len(parents)
    m = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        j = t
        while j >= 0:
            m[t, j] = True
            j = parents[j]
    return m


def random_parents(rng: random.Random, T: int) -> list[int]:
    return [-1] + [rng.randrange(-1, t) if rng.random() < 0.1 else rng.randrange(0, t) for t in range(1, T)]


def _inputs(B, H, H_kv, T, D, S_max, dtype, g):
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, H_kv, S_max, D, generator=g).to(dtype)
    v = torch.randn(B, H_kv, S_max, D, generator=g).to(dtype)
    return q, k, v


def _assert_as_reference(q, k, v, pos, mask, scale):
    with pytest.MonkeyPatch.context() as mp:  # the native kernel, not the reference, answers
        mp.setattr(reference, "verify_attention", lambda *a, **k: pytest.fail("a tree mask went to the reference"))
        out = verify_attention(q, k, v, pos, scale, mask)
    ref = reference.verify_attention(q, k, v, pos, scale, mask)
    ref64 = reference.verify_attention(q.double(), k.double(), v.double(), pos, scale, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    nan = torch.isnan(ref64)
    assert torch.equal(torch.isnan(out), nan) and torch.equal(torch.isnan(ref), nan)
    # no further from float64 than the reference plus one output rounding
    ulp = torch.finfo(q.dtype).eps * ref64.nan_to_num().abs().max().item()
    err = (out.double() - ref64).nan_to_num().abs().max()
    assert err <= (ref.double() - ref64).nan_to_num().abs().max() + ulp + 1e-6, err.item()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 24])  # fast path (64, 128), generic path
@pytest.mark.parametrize("kind", ["tree", "random", "diagonal"])
def test_tree_masks_give_the_reference(dtype, D, kind):
    rng, g = random.Random(f"{dtype}{D}{kind}"), torch.Generator().manual_seed(D)
    for _ in range(8):
        B, T, H_kv, G = rng.randint(1, 3), rng.randint(1, MAX_T), rng.choice([1, 2]), rng.choice([1, 3])
        S_max = rng.randint(T, 90)
        pos = torch.tensor([rng.randint(0, S_max - T) for _ in range(B)])
        if kind == "tree":
            mask = torch.stack([tree_mask(random_parents(rng, T)) for _ in range(B)])
        elif kind == "random":  # any pattern: rows may skip themselves or see later tokens
            mask = torch.rand(B, T, T, generator=g) < 0.5
        else:
            mask = torch.eye(T, dtype=torch.bool).expand(B, T, T)  # non-contiguous, each token itself only
        q, k, v = _inputs(B, H_kv * G, H_kv, T, D, S_max, dtype, g)
        _assert_as_reference(q, k, v, pos, mask, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 24])
def test_a_causal_mask_is_bitwise_the_mask_free_kernel(dtype, D):
    T = 11  # more than two of the fast path's p . V groups
    q, k, v = _inputs(3, 4, 2, T, D, 80, dtype, torch.Generator().manual_seed(3))
    pos = torch.tensor([0, 29, 80 - T])  # rows cross 32-slot blocks
    causal = torch.ones(3, T, T, dtype=torch.bool).tril()
    assert torch.equal(verify_attention(q, k, v, pos, D**-0.5, causal), verify_attention(q, k, v, pos, D**-0.5))


@pytest.mark.parametrize("D", [64, 24])
def test_rows_that_see_no_new_token(D):
    """An all-false row sees the prior slots only; at position 0 it sees nothing: NaN, as in the reference."""
    q, k, v = _inputs(2, 2, 1, 4, D, 16, torch.bfloat16, torch.Generator().manual_seed(4))
    mask = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    mask[:, 2] = False
    out = _assert_as_reference(q, k, v, torch.tensor([0, 5]), mask, 0.3)
    assert torch.isnan(out[0, :, 2]).all() and not torch.isnan(out[1]).any() and not torch.isnan(out[0, :, 1]).any()


def test_bad_masks_are_rejected_as_by_the_reference():
    q, k, v = _inputs(2, 2, 1, 3, 64, 16, torch.float32, torch.Generator().manual_seed(5))
    pos = torch.tensor([1, 2])
    for bad in (torch.ones(2, 3, 2, dtype=torch.bool), torch.ones(1, 3, 3, dtype=torch.bool),
                torch.ones(2, 3, 3, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="active_mask must be a bool tensor"):
            verify_attention(q, k, v, pos, 0.2, bad)
