"""The triton backend compiled on a real CUDA GPU: conformance, bit-identical accept/reject
decisions against the torch twin computed on the CPU, the positions host cache, the decoder,
and a short run of the roofline benchmark."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _compiled_mode():
    triton_backend = pytest.importorskip("verispec.kernels.triton", reason="needs the triton package (a test dependency)")
    assert not triton_backend.interpreting(), "GPU tests check the compiled kernels: unset TRITON_INTERPRET"


def test_conformance_on_cuda():
    from verispec.kernels.testing import check_backend

    report = check_backend("triton", device="cuda", dtypes=(torch.float32, torch.bfloat16, torch.float16))
    assert report.passed, str(report)


def test_accept_reject_on_cuda_equals_twin_on_cpu():
    from hypothesis import HealthCheck, given, settings
    from triton_modes.acceptor_inputs import acceptor_inputs

    from verispec.kernels.triton import accept_reject
    from verispec.spec.rejection import rejection_sample

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(acceptor_inputs(vocab_sizes=(1, 3, 31, 1000, 4099, 151936)))
    def check(inputs):
        want = rejection_sample(*inputs)
        got = accept_reject(*(x.cuda() for x in inputs))
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])

    check()


def test_positions_are_read_once_per_tensor_version():
    from verispec.kernels.triton.launch import positions_on_host

    pos = torch.tensor([3, 5], device="cuda")
    first = positions_on_host(pos)
    assert positions_on_host(pos) is first  # same tensor, same version: no new device read
    pos.add_(1)  # in-place change bumps the version
    assert positions_on_host(pos).tolist() == [4, 6]
    assert positions_on_host(torch.tensor([7, 8], device="cuda")).tolist() == [7, 8]


def test_decoder_on_cuda_matches_torch_backend(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("qwen2", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    logits = {}
    for name in ("torch", "triton"):
        m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=2, kernel_backend=name, device="cuda")
        ids = torch.arange(18).reshape(2, 9) % 97
        a = m.forward(ids, torch.tensor([0, 0]))
        b = m.forward(ids[:, :5], torch.tensor([9, 4]))
        logits[name] = torch.cat([a.flatten(), b.flatten()])
    assert (logits["torch"] - logits["triton"]).abs().max().item() < 1e-3


def test_default_backend_on_cuda_is_triton(monkeypatch, tiny_hf):
    from verispec.model import LlamaForSampling

    monkeypatch.delenv("VERISPEC_KERNELS", raising=False)
    path, _ = tiny_hf("llama")
    assert LlamaForSampling.from_pretrained(path, n_positions=16, device="cuda").kernels.name == "triton"
    assert LlamaForSampling.from_pretrained(path, n_positions=16, device="cuda", kernel_backend="torch").kernels.name == "torch"


def test_roofline_benchmark_runs(tmp_path):
    from verispec.cli import main

    rc = main(["bench", "kernels-cuda", "--T", "1,5", "--cache-lengths", "512,4096", "--model-lengths", "512",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "kernels_cuda.json").read_text())
    assert len(data["attention"]) == 4 and all(r["triton_GBps"] > 0 for r in data["attention"])
    assert all(r["sdpa_gqa_max_abs_diff"] < 2e-2 for r in data["attention"] if "sdpa_gqa_max_abs_diff" in r)
    assert (tmp_path / "kernels_cuda.png").exists()
