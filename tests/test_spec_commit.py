"""The loop's two commit paths (vectorised for large batches, host lists for a few rows and
tokens) leave the same state: committed tokens, counts, lengths, finished rows and output."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verispec.model.sampling import SamplingParams
from verispec.spec import SpeculativeGenerator
from verispec.spec import generator as G
from verispec.testing import MarkovChainLM


def _state_after_commit(small: bool, B, m, prompt_len, seq_len, eos, accepted, new):
    target = MarkovChainLM.random(6, 0, n_positions=64, batch_size=B)
    gen = SpeculativeGenerator("ngram", target, m, measure_decode_step=False)  # m = k tokens a step at most
    prompts = torch.arange(B * prompt_len).reshape(B, prompt_len) % 6
    gen._begin(prompts, seq_len, SamplingParams(1.0), 0, eos)
    saved = G.SMALL_COMMIT
    G.SMALL_COMMIT = 10**9 if small else -1
    try:
        step = gen._commit(torch.tensor(accepted), torch.tensor(new))
    finally:
        G.SMALL_COMMIT = saved
    finished = [gen._out[r].tolist() for r in range(B) if r not in gen._rows.tolist()]
    return (step.rows.tolist(), step.tokens.tolist(), step.counts.tolist(), gen._lengths.tolist(), gen._rows.tolist(),
            gen._tokens.tolist(), gen._stats.new_tokens, finished)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_small_and_vectorised_commits_agree(data):
    B = data.draw(st.integers(1, 5))
    m = data.draw(st.integers(2, 6))
    prompt_len = data.draw(st.integers(1, 4))
    seq_len = prompt_len + data.draw(st.integers(1, 8))
    eos = data.draw(st.sampled_from([None, 2, [1, 4]]))
    accepted = [data.draw(st.integers(0, m - 1)) for _ in range(B)]
    new = [[data.draw(st.integers(0, 5)) for _ in range(m)] for _ in range(B)]
    a = _state_after_commit(True, B, m, prompt_len, seq_len, eos, accepted, new)
    b = _state_after_commit(False, B, m, prompt_len, seq_len, eos, accepted, new)
    assert a == b
