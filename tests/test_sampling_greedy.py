"""Greedy decoding's argmax (kernels/cpu/sampling.c via model.sampling.greedy_ids): the id torch's
argmax picks (lowest on ties) for every dtype, shape and awkward value, the NaN check folded into
the same pass, and the greedy paths that use it against sampling the one-hot distribution; and the drafting gate's
native draft confidence (softmax_at) against torch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verispec.kernels import cpu as native
from verispec.kernels.cpu import sampling as native_sampling
from verispec.model.sampling import SamplingParams, greedy_ids, logits_to_probs, one_hot, sample_categorical

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")

DTYPES = [torch.float32, torch.bfloat16]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=st.integers(1, 5), V=st.integers(1, 700), dtype=st.sampled_from(DTYPES), levels=st.sampled_from([0, 3, 50]))
def test_native_argmax_is_torchs(rows, V, dtype, levels):
    g = torch.Generator().manual_seed(rows * 1000 + V)
    x = torch.randn(rows, V, generator=g)
    if levels:  # few distinct values: many ties, in every lane and in the tail
        x = torch.randint(0, levels, (rows, V), generator=g).float()
    x = x.to(dtype)
    ids, has_nan = native_sampling.argmax(x)
    assert not has_nan and ids.dtype == torch.int64 and ids.shape == (rows,)
    assert torch.equal(ids, x.float().argmax(-1))


def test_native_argmax_infinities_shapes_and_fallbacks():
    for dtype in DTYPES:
        x = torch.full((4, 37), float("-inf"), dtype=dtype)
        x[1, 20] = float("inf")
        x[2, 36] = -1e30
        x[3, 5] = x[3, 33] = 7.0  # a tie between a lane and the tail: the lower id
        ids, has_nan = native_sampling.argmax(x)
        assert not has_nan and ids.tolist() == [0, 20, 36, 5] == x.float().argmax(-1).tolist()
        y = torch.randn(2, 3, 40).to(dtype)  # any leading shape
        assert torch.equal(native_sampling.argmax(y)[0], y.float().argmax(-1))
        t = torch.randn(40, 3).to(dtype).t()  # non-contiguous
        assert torch.equal(native_sampling.argmax(t)[0], t.float().argmax(-1))
    assert native_sampling.argmax(torch.zeros(2, 5, dtype=torch.float16)) is None  # not a native dtype
    assert native_sampling.argmax(torch.zeros(2, 0)) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [0, 7, 15, 16, 100, 150, 160])  # first block, a later block, the tail
def test_native_argmax_flags_nan_rows(dtype, where):
    x = torch.randn(3, 161).to(dtype)
    x[1, where] = float("nan")
    ids, has_nan = native_sampling.argmax(x)
    assert has_nan and ids[1] == -1
    assert torch.equal(ids[[0, 2]], x[[0, 2]].float().argmax(-1))
    with pytest.raises(FloatingPointError, match="draft model produced NaN"):
        greedy_ids(x, "draft model")


def test_greedy_ids_without_the_native_kernel(monkeypatch):
    x = torch.randn(3, 300).bfloat16()
    fast = greedy_ids(x)
    monkeypatch.setattr(native_sampling, "argmax", lambda t: None)
    assert torch.equal(greedy_ids(x), fast)
    x[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="target model produced NaN"):
        greedy_ids(x, "target model")


def test_greedy_probs_and_ids_are_what_sampling_the_one_hot_gives():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (6, 2, 50), generator=g).float().bfloat16()  # ties
    probs = logits_to_probs(logits, SamplingParams(0.0))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.float().argmax(-1), 50).float())
    ids = greedy_ids(logits)
    assert torch.equal(one_hot(ids, 50), probs)
    u = torch.rand(12, generator=g, dtype=torch.float64)
    assert torch.equal(sample_categorical(probs.reshape(12, 50), u), ids.reshape(12))


def test_target_only_greedy_shortcut_gives_the_sampled_text(tiny_hf, monkeypatch):
    """sample() at temperature 0 takes the argmax instead of sampling the one-hot distribution
    (the default acceptor's greedy-id shortcut): the text is the one the sampling path gives
    (forced here by disabling the shortcut: the acceptor then samples the one-hot p)."""
    from verispec.model import LlamaForSampling
    from verispec.spec.acceptors import DefaultTokenAcceptor

    path, _ = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2, amp="bf16")
    ids = torch.randint(0, m.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    fast = m.sample(ids, 30, temperature=0.0, seed=3)
    monkeypatch.setattr(DefaultTokenAcceptor, "accepts_greedy_ids", False)
    assert torch.equal(m.sample(ids, 30, temperature=0.0, seed=3), fast)


def _torch_softmax_at(x, ids):
    x = x.float()
    return (x.gather(1, ids[:, None])[:, 0] - torch.logsumexp(x, -1)).exp()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=st.integers(1, 4), V=st.integers(1, 9000), dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.1, 4.0, 60.0]))
def test_native_softmax_at_is_torchs(rows, V, dtype, scale):
    """The gate's draft confidence: the softmax probability at temperature 1 of one id per row,
    within float rounding of torch's gather - logsumexp - exp (the argmax, and random ids)."""
    g = torch.Generator().manual_seed(rows * 10000 + V)
    x = (torch.randn(rows, V, generator=g) * scale).to(dtype)
    ids = torch.randint(0, V, (rows,), generator=g)
    ids[0] = x[0].float().argmax()
    got = native_sampling.softmax_at(x, ids)
    want = _torch_softmax_at(x, ids)
    assert got is not None and got.dtype == torch.float32 and got.shape == (rows,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30)


def test_native_softmax_at_edges_fall_back_to_torch():
    from verispec.spec.drafts import _confidence

    for dtype in DTYPES:
        x = torch.randn(3, 50).to(dtype)
        x[1, :] = float("-inf")
        x[1, 7] = 3.0  # one finite value: probability 1
        x[2, 9] = -1e30  # underflows to probability 0
        ids = torch.tensor([4, 7, 9])
        got = native_sampling.softmax_at(x, ids)
        assert got is not None and got[1].item() == 1.0 and got[2].item() == 0.0
        for bad in (float("inf"), float("nan")):  # rows the native pass declines: torch's answer
            y = x.clone()
            y[0, 3] = bad
            assert native_sampling.softmax_at(y, ids) is None
            torch.testing.assert_close(_confidence(y, ids), _torch_softmax_at(y, ids), equal_nan=True)
        y = torch.full((1, 20), float("-inf"), dtype=dtype)  # every value -inf
        assert native_sampling.softmax_at(y, torch.tensor([0])) is None
        with pytest.raises(IndexError, match=r"\[0, 50\)"):
            native_sampling.softmax_at(x, torch.tensor([0, 50, 1]))
        assert native_sampling.softmax_at(x[0], ids[:1]) is None  # not [R, V]: the caller's torch path
        assert native_sampling.softmax_at(x, ids[:2]) is None
        torch.testing.assert_close(_confidence(x, ids), _torch_softmax_at(x, ids), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_argmax_of_a_long_row_is_the_same_for_any_thread_count(dtype):
    """A row of >= 32768 values is cut over the threads: the lowest id of the maximum whatever the
    thread count, with ties and NaN on either side of every cut, as torch picks it."""
    V = 151936
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(V, generator=g)]
    tie = torch.randint(0, 3, (V,), generator=g).float()  # ties in every part
    rows.append(tie)
    late = torch.full((V,), -1.0)
    late[V - 1] = 5.0  # the maximum in the last part, its tail
    rows.append(late)
    edge = torch.zeros(V)
    edge[V // 2] = edge[V // 2 - 1] = 2.0  # a tie at the two-thread cut: the lower id
    rows.append(edge)
    rows.append(torch.full((V,), float("-inf")))
    threads = torch.get_num_threads()
    try:
        for x in rows:
            x = x[None].to(dtype)
            want = x.float().argmax(-1)
            for nt in (1, 2, 3, 7):
                torch.set_num_threads(nt)
                ids, has_nan = native_sampling.argmax(x)
                assert not has_nan and torch.equal(ids, want), nt
        for where in (0, V // 3, V // 2, V - 1):
            x = torch.randn(1, V, generator=g).to(dtype)
            x[0, where] = float("nan")
            for nt in (1, 2, 3):
                torch.set_num_threads(nt)
                ids, has_nan = native_sampling.argmax(x)
                assert has_nan and ids.tolist() == [-1], (where, nt)
        x = torch.randn(4, V, generator=g).to(dtype)  # several long rows: rows over the threads
        x[2, 9] = float("nan")
        torch.set_num_threads(2)
        ids, has_nan = native_sampling.argmax(x)
        assert has_nan and ids[2] == -1 and torch.equal(ids[[0, 1, 3]], x[[0, 1, 3]].float().argmax(-1))
    finally:
        torch.set_num_threads(threads)
