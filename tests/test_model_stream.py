"""LlamaForSampling.stream (target-only, step by step) and fork (same weights, own KV cache):
what the step-interleaved e2e benchmark decodes with."""

import itertools

import torch

from verispec.model import LlamaForSampling
from verispec.spec import SpeculativeGenerator


def _model(tiny_hf, seed=3, **kw):
    path, _ = tiny_hf("llama", seed=seed)
    return LlamaForSampling.from_pretrained(path, n_positions=64, amp="f32", **kw)


def test_stream_yields_the_tokens_sample_returns(tiny_hf):
    model = _model(tiny_hf, batch_size=3)
    prompts = [torch.tensor([5, 3, 8, 1]), torch.tensor([2, 9]), torch.tensor([7, 7, 7, 4, 1])]
    out = model.sample(prompts, 20, temperature=0.9, seed=11, eos_token_id=13)
    made = {b: [] for b in range(3)}
    for step in model.stream(prompts, 20, temperature=0.9, seed=11, eos_token_id=13):
        assert step and all(len(t) == 1 for t in step.values())  # one token per live row per step
        for b, t in step.items():
            made[b] += t
    for b, p in enumerate(prompts):
        new = out[b, len(p):].tolist()
        if 13 in new:  # a row ended by EOS: nothing streamed past it
            new = new[: new.index(13) + 1]
        assert made[b] == new
    assert model.last_stats["new_tokens"] == sum(len(m) for m in made.values())
    assert model.last_stats["decode_s"] > 0 and model.last_stats["prefill_s"] > 0


def test_forks_decode_in_turns_as_if_alone(tiny_hf):
    """Two forks stepped alternately give what each gives alone: each has its own KV cache (with a
    shared cache the second prompt's prefill would overwrite the first's K/V)."""
    model = _model(tiny_hf)
    a, b = model.fork(), model.fork()
    assert a.decoder is model.decoder and a.cache is not model.cache and a.cache is not b.cache
    pa, pb = torch.tensor([[5, 3, 8, 1, 9, 2]]), torch.tensor([[4, 4]])
    ref_a, ref_b = model.sample(pa, 24, temperature=0), model.sample(pb, 24, temperature=0)
    sa, sb = a.stream(pa, 24, temperature=0), b.stream(pb, 24, temperature=0)
    got_a, got_b = [], []
    for x, y in itertools.zip_longest(sa, sb, fillvalue={0: []}):
        got_a += x[0]
        got_b += y[0]
    assert got_a == ref_a[0, 6:].tolist() and got_b == ref_b[0, 2:].tolist()
    assert ref_a[0, 6:].tolist() != ref_b[0, 2:].tolist()  # different texts, so a mix-up would show


def test_speculative_generators_on_forks_interleave_exactly(tiny_hf):
    """Speculative paths on forks of one target and draft, stepped in turns on different prompts,
    each make the target's greedy text of its prompt (the step-interleaved benchmark's setting)."""
    target, draft = _model(tiny_hf, seed=3), _model(tiny_hf, seed=5)
    prompts = [torch.tensor([[5, 3, 8, 1]]), torch.tensor([[9, 9, 2]]), torch.tensor([[1, 6, 4, 4, 7]])]
    refs = [target.sample(p, 30, temperature=0)[0, p.shape[1]:].tolist() for p in prompts]
    gens = [SpeculativeGenerator(draft.fork(), target.fork(), k) for k in (2, 4, "auto")]
    streams = [g.stream(p, 30, temperature=0) for g, p in zip(gens, prompts)]
    made = [[] for _ in gens]
    live = set(range(len(gens)))
    while live:
        for j in sorted(live):
            step = next(streams[j], None)
            if step is None:
                live.discard(j)
            else:
                made[j] += step.per_row()[0]
    assert made == refs and len({tuple(r) for r in refs}) == 3
