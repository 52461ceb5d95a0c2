"""Hypothesis strategy for accept/reject inputs that stress exactness: zeros, one-hot rows,
p == q, drafts q gives no mass, boundary uniforms, tied and overflowing race keys."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

ALMOST_ONE = 1.0 - 2.0**-24  # largest fp32 below 1


def _distributions(gen, shape, kind):
    """Rows of probabilities [..., V] of a given kind."""
    V = shape[-1]
    x = torch.rand(shape, generator=gen) ** 3
    if kind == "sparse":
        x = x * (torch.rand(shape, generator=gen) < 0.4)
        x[..., 0] += (x.sum(-1) == 0).float()  # keep at least one token possible
    elif kind == "onehot":
        x = torch.nn.functional.one_hot(torch.randint(0, V, shape[:-1], generator=gen), V).float()
    return x / x.sum(-1, keepdim=True)


@st.composite
def acceptor_inputs(draw, vocab_sizes=(1, 2, 3, 5, 8, 31, 200)):
    B = draw(st.integers(1, 4))
    g = draw(st.integers(0, 6))
    V = draw(st.sampled_from(vocab_sizes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q_kind = draw(st.sampled_from(["dense", "sparse", "onehot"]))
    p_kind = draw(st.sampled_from(["dense", "sparse", "onehot", "equal", "mixed"]))
    draft_probs = _distributions(gen, (B, g, V), q_kind)  # [B, g, V]
    target_probs = _distributions(gen, (B, g + 1, V), "dense" if p_kind in ("equal", "mixed") else p_kind)
    if p_kind == "equal":
        target_probs[:, :g] = draft_probs  # p == q: every residual is empty
    elif p_kind == "mixed":  # some positions equal, some not
        same = torch.rand(B, g, 1, generator=gen) < 0.5
        target_probs[:, :g] = torch.where(same, draft_probs, target_probs[:, :g])
    if g and draw(st.booleans()):  # drafts sampled from q (the normal case)
        draft_ids = torch.multinomial(draft_probs.reshape(B * g, V), 1, generator=gen).reshape(B, g)
    else:  # any ids, including ones q gives no mass
        draft_ids = torch.randint(0, V, (B, g), generator=gen)
    u_kind = draw(st.sampled_from(["random", "zero", "almost_one", "boundary"]))
    uniforms = torch.rand(B, g, generator=gen)
    if u_kind == "zero":
        uniforms.zero_()
    elif u_kind == "almost_one":
        uniforms.fill_(ALMOST_ONE)
    elif u_kind == "boundary" and g:  # u = p(x)/q(x) and its fp32 neighbours: u*q lands on p
        idx = draft_ids[..., None]
        ratio = torch.gather(target_probs[:, :g], 2, idx)[..., 0] / torch.gather(draft_probs, 2, idx)[..., 0]
        step = torch.randint(-1, 2, (B, g), generator=gen).float()
        ratio = torch.nextafter(ratio, ratio + step) if draw(st.booleans()) else ratio
        uniforms = torch.where(torch.isfinite(ratio) & (ratio < 1), ratio, uniforms).clamp(0, ALMOST_ONE)
    e_kind = draw(st.sampled_from(["random", "ones", "few_values", "tiny"]))
    exponentials = -torch.log1p(-torch.rand(B, V, generator=gen))  # Exp(1)
    if e_kind == "ones":
        exponentials.fill_(1.0)  # equal keys wherever r is equal: the lowest id must win
    elif e_kind == "few_values":
        exponentials = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (B, V), generator=gen)]
    elif e_kind == "tiny":
        exponentials = exponentials * 1e-38  # r / E overflows to inf for many ids
    exponentials = exponentials.clamp_min(torch.finfo(torch.float32).tiny * 2**-10)  # > 0 (subnormal at worst)
    return draft_ids, draft_probs, target_probs, uniforms.float(), exponentials.float()
