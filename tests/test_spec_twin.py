"""Tier 2: the batched acceptors equal slow per-row references written here from the papers,
decision for decision, on the same explicit random numbers (awkward cases included: q(x) = 0,
p(x) = 0, p = q, one-hot rows, V = 1, g = 0)."""

import pytest
import torch

from spec_helpers import FixedRandomness
from verispec.kernels import available_backends, get_backend
from verispec.spec import (
    DefaultTokenAcceptor,
    GreedyTokenAcceptor,
    SampleMatchAcceptor,
    rejection_sample,
)


def reference_rejection_row(draft, q, p, u, e):
    """Leviathan et al. Algorithm 1 for one row, position by position (fp32 scalars)."""
    g = len(draft)
    for i in range(g):
        x = int(draft[i])
        if u[i] * q[i, x] < p[i, x]:  # accept with probability min(1, p/q)
            continue
        residual = torch.clamp(p[i] - q[i], min=0.0)
        r = residual if residual.sum() > 0 else p[i]
        return i, [int(t) for t in draft[:i]] + [race_row(r, e)]
    return g, [int(t) for t in draft] + [race_row(p[g], e)]


def race_row(weights, e):
    best, best_v = None, None
    for v in range(len(weights)):
        score = weights[v] / e[v]
        if best is None or score > best:  # strict: the lowest id wins ties
            best, best_v = score, v
    return best_v


def random_case(gen, B, g, V):
    """p and q with exact zeros, one-hot rows and p = q rows; drafts include q(x) = 0 ones."""
    def dist(shape):
        w = torch.rand(shape, generator=gen)
        w = torch.where(torch.rand(shape, generator=gen) < 0.3, 0.0, w)  # holes
        w[..., 0] += 1e-3 * (w.sum(-1) == 0)  # never an all-zero row
        onehot = torch.rand(shape[:-1], generator=gen) < 0.15
        w = torch.where(onehot[..., None], torch.nn.functional.one_hot(w.argmax(-1), V).float(), w)
        return w / w.sum(-1, keepdim=True)

    q = dist((B, g, V))
    p = dist((B, g + 1, V))
    same = torch.rand(B, generator=gen) < 0.2
    p[:, :g] = torch.where(same[:, None, None], q, p[:, :g])
    sampled = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, g) if g else torch.zeros(B, 0, dtype=torch.long)
    anywhere = torch.randint(0, V, (B, g), generator=gen)  # may have q(x) = 0
    draft = torch.where(torch.rand(B, g, generator=gen) < 0.2, anywhere, sampled)
    u = torch.rand(B, g, generator=gen)
    u = torch.where(torch.rand(B, g, generator=gen) < 0.05, 0.0, u)
    e = torch.empty(B, V).exponential_(generator=gen).clamp_min(1e-12)
    return draft, q, p, u, e


CASES = [(B, g, V) for V in (1, 2, 5, 37) for g in (0, 1, 3, 6) for B in (1, 48)]


@pytest.mark.parametrize("B,g,V", CASES)
def test_rejection_sample_equals_per_row_reference(B, g, V):
    gen = torch.Generator().manual_seed(1000 * V + 10 * g + B)
    draft, q, p, u, e = random_case(gen, B, g, V)
    accepted, tokens = rejection_sample(draft, q, p, u, e)
    acc2, tok2 = DefaultTokenAcceptor()(draft, q, p, FixedRandomness(u, e))
    assert torch.equal(accepted, acc2) and torch.equal(tokens, tok2)
    for b in range(B):
        a, toks = reference_rejection_row(draft[b], q[b], p[b], u[b], e[b])
        assert int(accepted[b]) == a, b
        assert tokens[b, : a + 1].tolist() == toks and (tokens[b, a + 1 :] == -1).all()


def _extra_kernels():
    names = []
    for name in available_backends():
        try:
            if get_backend(name).get("accept_reject") is not None:
                names.append(name)
        except Exception:  # a backend that cannot load here (no CUDA, no nki) has nothing to compare
            continue
    return names


@pytest.mark.parametrize("backend", _extra_kernels() or [None])
def test_backend_accept_reject_kernels_equal_reference(backend):
    if backend is None:
        pytest.skip("no loadable backend on this machine carries an accept_reject kernel")
    kernel = get_backend(backend).get("accept_reject")
    gen = torch.Generator().manual_seed(7)
    for B, g, V in CASES:
        draft, q, p, u, e = random_case(gen, B, g, V)
        a1, t1 = rejection_sample(draft, q, p, u, e)
        a2, t2 = kernel(draft, q, p, u, e)
        assert torch.equal(a1, a2.cpu()) and torch.equal(t1, t2.cpu())


@pytest.mark.parametrize("B,g,V", CASES)
def test_sample_match_and_greedy_equal_per_row_reference(B, g, V):
    gen = torch.Generator().manual_seed(5000 + 1000 * V + 10 * g + B)
    draft, q, p, u, _ = random_case(gen, B, g, V)
    e = torch.empty(B, g + 1, V).exponential_(generator=gen).clamp_min(1e-12)
    accepted, tokens = SampleMatchAcceptor()(draft, q, p, FixedRandomness(exponentials=e))
    g_acc, g_tok = GreedyTokenAcceptor()(draft, q, p, None)
    for b in range(B):
        samples = [race_row(p[b, i], e[b, i]) for i in range(g + 1)]
        choice = [race_row(p[b, i], torch.ones(V)) for i in range(g + 1)]  # argmax, lowest id on ties
        for acc, tok, target in ((accepted, tokens, samples), (g_acc, g_tok, choice)):
            a = 0
            while a < g and int(draft[b, a]) == target[a]:
                a += 1
            assert int(acc[b]) == a
            assert tok[b, : a + 1].tolist() == [int(t) for t in draft[b, :a]] + [target[a]]
