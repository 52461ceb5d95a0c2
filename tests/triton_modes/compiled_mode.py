"""The triton backend in a process that imported Triton without the interpreter (the normal
mode on a CUDA machine): CPU tensors are refused with an error that says what to do.

Run by tests/test_triton_modes.py in a child process whose environment has no TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest
import torch

from verispec.kernels.triton import TritonBackendUnavailable, accept_reject, interpreting, kv_append, verify_attention


@pytest.fixture(autouse=True)
def _check_compiled_mode(monkeypatch):
    assert not interpreting(), "run this file without TRITON_INTERPRET"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _small():
    q = torch.zeros(1, 2, 1, 16)  # [B, H, T, D]
    k = torch.zeros(1, 2, 4, 16)  # [B, H_kv, S_max, D]
    return q, k, k.clone(), torch.tensor([2])


def test_cpu_tensors_are_refused_with_a_hint():
    q, k, v, pos = _small()
    with pytest.raises(TritonBackendUnavailable, match="kernel_backend='torch'.*TRITON_INTERPRET=1 before triton"):
        verify_attention(q, k, v, pos, 0.25)
    with pytest.raises(TritonBackendUnavailable, match="runs on CUDA tensors, got tensors on cpu"):
        kv_append(k, v, k[:, :, :1], v[:, :, :1], pos)
    probs = torch.full((1, 1, 4), 0.25)
    with pytest.raises(TritonBackendUnavailable, match="accept_reject"):
        accept_reject(torch.zeros(1, 0, dtype=torch.long), probs[:, :0], probs, torch.zeros(1, 0), torch.ones(1, 4))


def test_setting_the_variable_after_import_is_explained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, pos = _small()
    with pytest.raises(TritonBackendUnavailable, match="imported triton before it was set"):
        verify_attention(q, k, v, pos, 0.25)
