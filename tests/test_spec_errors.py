"""Bad input to the speculative loop: each a clear error naming the problem."""

import pytest
import torch

from verispec.model import LlamaForSampling
from verispec.spec import SpeculativeGenerator, rejection_sample
from verispec.testing import MarkovChainLM


def chain(V=6, seed=0, B=4, n_positions=32, order=1):
    return MarkovChainLM.random(V, seed, order=order, n_positions=n_positions, batch_size=B)


PROMPT = torch.zeros(2, 3, dtype=torch.long)


@pytest.mark.parametrize("k,exc,msg", [(0, ValueError, "k must be >= 1"), (-3, ValueError, "k must be >= 1"),
                                       (True, TypeError, "k must be an int"), ("4", TypeError, "k must be an int"),
                                       (32, ValueError, "too large"), (40, ValueError, "too large")])
def test_bad_k(k, exc, msg):
    with pytest.raises(exc, match=msg):
        SpeculativeGenerator(chain(seed=1), chain(), k)


def test_vocabulary_mismatch_toy():
    with pytest.raises(ValueError, match="vocabulary mismatch.*5 tokens.*6"):
        SpeculativeGenerator(chain(V=5), chain(V=6), 3)


def test_vocabulary_mismatch_real_models(tiny_hf):
    t = LlamaForSampling.from_pretrained(tiny_hf()[0], n_positions=32)
    d = LlamaForSampling.from_pretrained(tiny_hf(vocab_size=101)[0], n_positions=32)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        SpeculativeGenerator(d, t, 3)


@pytest.mark.parametrize("kw,msg", [(dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                                    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
                                    (dict(top_k=2.5), "top_k"), (dict(seed=-1), "seed"), (dict(eos_token_id=99), "eos")])
def test_bad_sampling_parameters(kw, msg):
    gen = SpeculativeGenerator(chain(seed=1), chain(), 3)
    with pytest.raises(ValueError, match=msg):
        gen.sample(PROMPT, 8, **kw)


@pytest.mark.parametrize("prompts,seq_len,msg", [
    ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 8, "prompt 1 is empty"),
    ([], 8, "empty batch"),
    (torch.zeros(2, 0, dtype=torch.long), 8, "empty"),
    ([torch.tensor([1, 2, 3])], 2, "more than sequence_length"),
    (torch.zeros(2, 3, dtype=torch.long), 33, "longer than n_positions"),
    (torch.full((3, 2), 6), 8, "outside the vocabulary"),
    ([torch.tensor([0, 7])], 8, "outside the vocabulary"),
    (torch.zeros(5, 2, dtype=torch.long), 8, "exceeds batch_size"),
])
def test_bad_prompts(prompts, seq_len, msg):
    gen = SpeculativeGenerator(chain(seed=1), chain(), 3)
    with pytest.raises(ValueError, match=msg):
        gen.sample(prompts, seq_len)


def test_draft_batch_smaller_than_the_prompts():
    gen = SpeculativeGenerator(chain(seed=1, B=2), chain(B=4), 3)
    with pytest.raises(ValueError, match="exceeds batch_size=2"):
        gen.sample(torch.zeros(3, 2, dtype=torch.long), 8)


def nan_chain(seed):
    c = chain(seed=seed)
    c.layer_logits[0, :, 1] = float("nan")  # every context
    return c


@pytest.mark.parametrize("temperature", [1.0, 0.0])  # 0: the greedy path's own NaN check
def test_nan_logits_from_the_target(temperature):
    with pytest.raises(FloatingPointError, match="target model produced NaN"):
        SpeculativeGenerator(chain(seed=1), nan_chain(0), 3).sample(PROMPT, 8, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_nan_logits_from_the_draft(temperature):
    with pytest.raises(FloatingPointError, match="draft model produced NaN"):
        SpeculativeGenerator(nan_chain(1), chain(), 3).sample(PROMPT, 8, temperature=temperature)


@pytest.mark.parametrize("draft,exc,msg", [
    ("self:0", ValueError, "self:N"), ("self:3", ValueError, "more layers than the target has"),
    ("ngram:x", ValueError, "ngram:N"), ("beam", ValueError, "unknown draft"),
    ("no_such_module_xyz:thing", ValueError, "cannot import"), (42, TypeError, "draft must be"),
    (None, ValueError, "a draft is needed"),
])
def test_bad_drafts(draft, exc, msg):
    with pytest.raises(exc, match=msg):
        SpeculativeGenerator(draft, chain(), 3)


def test_the_target_as_its_own_draft_model():
    t = chain()
    with pytest.raises(ValueError, match="self:N"):
        SpeculativeGenerator(t, t, 3)


@pytest.mark.parametrize("acceptor,exc,msg", [("fastest", ValueError, "unknown acceptor"), (3, TypeError, "callable"),
                                              ("verispec.spec:nothing_here", ValueError, "no attribute")])
def test_bad_acceptor_names(acceptor, exc, msg):
    with pytest.raises(exc, match=msg):
        SpeculativeGenerator(chain(seed=1), chain(), 3, acceptor=acceptor)


def test_acceptor_that_overcounts():
    def overcount(draft_ids, draft_probs, target_probs, rng):
        a, t = rejection_sample(draft_ids, draft_probs, target_probs, rng.uniforms(*draft_ids.shape),
                                rng.exponentials(draft_ids.shape[0], target_probs.shape[-1]))
        return a + 5, t

    with pytest.raises(ValueError, match="accepted count outside"):
        SpeculativeGenerator(chain(seed=1), chain(), 3, acceptor=overcount).sample(PROMPT, 8)


def test_acceptor_that_rewrites_accepted_drafts():
    def rewrite(draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        tokens = torch.full((B, g + 1), 0)
        tokens[:, :g] = (draft_ids + 1) % target_probs.shape[-1]
        return torch.full((B,), g), tokens

    with pytest.raises(ValueError, match="changed an accepted draft"):
        SpeculativeGenerator(chain(seed=1), chain(), 3, acceptor=rewrite).sample(PROMPT, 8)


class WrongShapeDraft:
    def propose(self, tokens, lengths, g, params, uniforms):
        return torch.zeros(len(lengths), g + 1, dtype=torch.long), torch.zeros(len(lengths), g + 1, 6)


def test_draft_provider_with_wrong_shapes():
    with pytest.raises(ValueError, match="draft provider returned"):
        SpeculativeGenerator(WrongShapeDraft(), chain(), 3).sample(PROMPT, 8)
