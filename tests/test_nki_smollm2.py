"""SmolLM2-135M (a real checkpoint, fetched once into the model cache) through the NKI kernels,
interpreted: greedy output token-for-token equal to the torch backend's."""

from __future__ import annotations

import pytest
import torch

from verispec.model import LlamaForSampling

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_pair():
    ref = LlamaForSampling.from_pretrained("smollm2-135m", n_positions=64, kernel_backend="torch")
    nki = LlamaForSampling.from_pretrained("smollm2-135m", n_positions=64, kernel_backend="nki")
    assert nki.kernels.name == "nki" and nki.kernels.fallbacks == ()
    return ref, nki


def test_smollm2_greedy_through_nki_equals_torch(smollm2_pair):
    ref, nki = smollm2_pair
    prompt = [torch.tensor(ref.tokenizer.encode("The capital of France is"))]
    n = len(prompt[0]) + 8
    want = ref.sample(prompt, sequence_length=n, temperature=0.0)
    got = nki.sample(prompt, sequence_length=n, temperature=0.0)
    assert torch.equal(got, want), (got.tolist(), want.tolist())


def test_smollm2_verify_pass_logits_match(smollm2_pair):
    """A 4-token verify pass after a prompt: the logits the speculative loop would judge."""
    ref, nki = smollm2_pair
    prompt = [torch.tensor([504, 3575, 282, 4649, 314])]
    ref.prefill(prompt), nki.prefill(prompt)
    ids, pos = torch.tensor([[7042, 30, 198, 198]]), torch.tensor([5])
    a, b = ref.forward(ids, pos), nki.forward(ids, pos)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
