"""``kernel_backend="torch"`` runs PyTorch only: loading, target-only sampling and speculative
decoding (greedy and sampled, model and n-gram drafts) with the native library replaced by a
tripwire that fails on any use; the cpu backend, loaded the same way, does use it."""

import pytest
import torch

from verispec.kernels.cpu import build


class Tripwire:
    """Stands in for the native library: any attribute read is a native call attempted."""

    def __init__(self):
        self.touched = []

    def __getattr__(self, name):
        self.touched.append(name)
        raise AssertionError(f"the native library was used: {name}")


@pytest.fixture
def tripwire(monkeypatch):
    wire = Tripwire()
    build.get_lib()  # settle the real build first (a background build would overwrite the stand-in)
    monkeypatch.setattr(build, "_lib", wire)
    monkeypatch.setattr(build, "_error", None)
    return wire


def _run_everything(path, backend):
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    target = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2, amp="bf16", kernel_backend=backend)
    draft = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2, amp="bf16", kernel_backend=backend)
    prompts = torch.randint(0, target.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    out = [target.sample(prompts, 12, temperature=0.0), target.sample(prompts, 12, temperature=0.8, seed=1)]
    for d in (draft, "ngram"):
        gen = SpeculativeGenerator(d, target, k=3)
        out += [gen.sample(prompts, 14, temperature=0.0), gen.sample(prompts, 14, temperature=0.9, top_k=20, seed=2)]
    return target, out


def test_torch_backend_never_calls_native_code(tiny_hf, tripwire):
    path, _ = tiny_hf("llama")
    target, outs = _run_everything(path, "torch")
    assert tripwire.touched == []
    assert all(o.shape[0] == 2 for o in outs)
    from verispec.kernels.cpu import SkinnyLinear

    assert not any(isinstance(m, SkinnyLinear) for m in target.decoder.modules())  # plain torch modules
    assert target.runner is target.decoder


def test_the_tripwire_catches_the_cpu_backend(tiny_hf, tripwire):
    """The check above can fail: the cpu backend, whose products and step are native, trips it."""
    from verispec.kernels import get_backend

    path, _ = tiny_hf("llama")
    with pytest.raises(AssertionError, match="native library was used"):
        get_backend("cpu")  # resolving the backend checks the library
        _run_everything(path, "cpu")
    assert tripwire.touched


def test_quantized_weights_need_the_cpu_backend(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    with pytest.raises(ValueError, match="needs kernel_backend='cpu'"):
        LlamaForSampling.from_pretrained(path, n_positions=16, quant="int8", kernel_backend="torch")
