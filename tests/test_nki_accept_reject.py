"""The accept/reject NKI kernel makes the same decisions as spec.rejection.rejection_sample
given the same random numbers, including its edge cases (q(x) = 0, p = q, one-hot p, ties)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nki_lanes import LANES

from verispec.kernels import get_backend
from verispec.spec.rejection import rejection_sample


def _inputs(B, g, V, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(B, g + 1, V, generator=gen), -1)
    q = torch.softmax(3 * torch.randn(B, g, V, generator=gen), -1)
    if mode == "p_equals_q":  # every residual is empty: the token comes from p
        q = p[:, :g].clone()
    elif mode == "one_hot_p":
        p = torch.nn.functional.one_hot(torch.randint(0, V, (B, g + 1), generator=gen), V).float()
    elif mode == "zero_q" and V > 1:  # drafts a token q gives no mass to
        q[..., : V // 2] = 0
        q = q / q.sum(-1, keepdim=True)
    if g and mode == "zero_q" and V > 1:
        ids = torch.randint(0, V // 2, (B, g), generator=gen)
    elif g:
        ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, g)
    else:
        ids = torch.zeros(B, 0, dtype=torch.long)
    u = torch.rand(B, g, generator=gen)
    e = torch.empty(B, V).exponential_(generator=gen)
    if mode == "ties":  # equal scores everywhere: the lowest id wins
        p = torch.full((B, g + 1, V), 1.0 / V)
        e = torch.ones(B, V)
    return ids, q, p, u, e


@pytest.mark.parametrize("lane", LANES)
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 5), g=st.integers(0, 5), V=st.sampled_from([1, 2, 7, 300, 2049, 4500]),
       mode=st.sampled_from(["random", "p_equals_q", "one_hot_p", "zero_q", "ties"]), seed=st.integers(0, 2**16))
def test_same_decisions_as_rejection_sample(lane, B, g, V, mode, seed):
    args = _inputs(B, g, V, mode, seed)
    want_acc, want_tok = rejection_sample(*args)
    got_acc, got_tok = get_backend("nki").get("accept_reject")(*args)
    assert torch.equal(got_acc, want_acc) and torch.equal(got_tok, want_tok), (mode, got_tok, want_tok)


@pytest.mark.parametrize("lane", LANES)
def test_golden_boundaries_and_more_rows_than_partitions(lane):
    ar = get_backend("nki").get("accept_reject")
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    q = torch.tensor([[[0.25, 0.5, 0.25]]])
    e = torch.tensor([[1.0, 1.0, 1.0]])
    # u * q(x) < p(x): 0.4 * 0.5 = 0.2 < 0.3 accepts; 0.6 * 0.5 = 0.3 is not < 0.3, rejects
    acc, tok = ar(torch.tensor([[1]]), q, p, torch.tensor([[0.4]]), e)
    assert acc.tolist() == [1] and tok.tolist() == [[1, 2]]  # bonus from p_1: argmax 0.8
    acc, tok = ar(torch.tensor([[1]]), q, p, torch.tensor([[0.6]]), e)
    assert acc.tolist() == [0] and tok.tolist() == [[0, -1]]  # residual max(p-q, 0) = [.25, 0, 0]
    args = _inputs(200, 3, 40, "random", 7)  # 200 rows: two partition blocks
    want = rejection_sample(*args)
    got = ar(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_shapes_are_rejected():
    ar = get_backend("nki").get("accept_reject")
    ids, q, p, u, e = _inputs(2, 2, 5, "random", 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        ar(ids, q, p[:, :2], u, e)
    with pytest.raises(ValueError, match="uniforms must be"):
        ar(ids, q, p, u[:, :1], e)
