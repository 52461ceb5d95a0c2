"""Every weight a forward reads is a registered parameter: editing it in place, replacing it,
loading a state dict into it (copy or ``assign=True``) changes the logits, on the ``torch`` and
``cpu`` backends, for one row and for a batch; a state dict round trip restores them exactly. On
the ``cpu`` backend the compiled step and the module path still agree after each edit."""

import pytest
import torch

from verispec.kernels import available_backends
from verispec.kernels.cpu import available as native_available

BACKENDS = ["torch"] + (["cpu"] if native_available() and "cpu" in available_backends() else [])
WEIGHTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import build_tiny_hf

    path, _ = build_tiny_hf(tmp_path_factory.mktemp("edits") / "qwen2", "qwen2")  # q/k/v biases
    return path


def _load(path, backend):
    from verispec.model import LlamaForSampling

    return LlamaForSampling.from_pretrained(path, n_positions=32, batch_size=2, amp="bf16", kernel_backend=backend)


def _logits(m, B):
    """Logits of a decode step after a 5-token prefix, rows 0..B-1 (a step the cpu backend compiles)."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, m.vocab_size, (5,), generator=g) for _ in range(B)]
    m.reset()
    m.prefill(prompts)
    ids = torch.randint(0, m.vocab_size, (B, 1), generator=g)
    return m.forward(ids, torch.full((B,), 5))


def _module_path_agrees(m, B, got):
    if m.runner is m.decoder:
        return True
    runner, m.runner = m.runner, m.decoder
    try:
        return torch.equal(_logits(m, B), got)
    finally:
        m.runner = runner


def _target(m, name: str, layer: int = 1) -> torch.nn.Module:
    mod = m.decoder.model.layers[layer]
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("how", ["in_place", "replace", "load_copy", "load_assign"])
def test_every_weight_edit_moves_the_logits(tiny_dir, backend, B, how):
    m = _load(tiny_dir, backend)
    names = [f"model.layers.1.{w}.weight" for w in WEIGHTS] + ["lm_head.weight", "model.norm.weight"]
    for name in names:
        clean = _logits(m, B)
        sd = {k: v.clone() for k, v in m.decoder.state_dict().items()}
        assert name in sd, name
        new = torch.randn(sd[name].shape, generator=torch.Generator().manual_seed(len(name))).to(sd[name].dtype)
        owner = m.decoder.get_submodule(name.rsplit(".", 1)[0])
        with torch.no_grad():
            if how == "in_place":
                owner.weight.copy_(new)
            elif how == "replace":
                owner.weight = torch.nn.Parameter(new, requires_grad=False)
            elif how == "load_copy":
                m.decoder.load_state_dict({name: new}, strict=False)
            else:
                m.decoder.load_state_dict({name: new}, strict=False, assign=True)
        edited = _logits(m, B)
        assert not torch.equal(edited, clean), (name, how)
        assert _module_path_agrees(m, B, edited), (name, how)
        assert torch.equal(m.decoder.state_dict()[name], new), name  # the state dict shows what the forward reads
        with torch.no_grad():
            m.decoder.load_state_dict(sd)  # the round trip restores every logit
        assert torch.equal(_logits(m, B), clean), (name, how)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_edits_and_named_parameters_cover_the_forward(tiny_dir, backend):
    m = _load(tiny_dir, backend)
    params = dict(m.decoder.named_parameters())
    for w in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{w}.bias" in params
    clean = _logits(m, 2)
    with torch.no_grad():
        params["model.layers.0.self_attn.v_proj.bias"].add_(1.0)
    assert not torch.equal(_logits(m, 2), clean)
    # every byte the forward reads is in named_parameters (no hidden second copy of any weight)
    n_model = sum(p.numel() for p in m.decoder.parameters())
    n_ckpt = sum(t.numel() for t in m.decoder.state_dict().values())
    assert n_model == n_ckpt - (m.decoder.lm_head.weight.numel() if m.config.tie_word_embeddings else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_assign_of_the_whole_model(tiny_dir, backend):
    """``load_state_dict(sd, assign=True)`` with every tensor new: the forward reads the new ones."""
    m = _load(tiny_dir, backend)
    clean = _logits(m, 2)
    sd = {k: (v.clone() * 1.5).to(v.dtype) for k, v in m.decoder.state_dict().items()}
    m.decoder.load_state_dict(sd, assign=True)
    scaled = _logits(m, 2)
    assert not torch.equal(scaled, clean) and _module_path_agrees(m, 2, scaled)
    fresh = _load(tiny_dir, backend)
    with torch.no_grad():
        fresh.decoder.load_state_dict(sd)  # the same values by copy: the same logits
    assert torch.equal(_logits(fresh, 2), scaled)


def test_weight_edits_on_the_nki_backend(tiny_dir):
    """The NKI backend (through the interpreter here) replaces attention and the cache append
    only; the projections it reads are the same registered parameters."""
    m = _load(tiny_dir, "nki")
    clean = _logits(m, 2)
    attn = m.decoder.model.layers[0].self_attn
    attn.q_proj.weight = torch.nn.Parameter(torch.zeros_like(attn.q_proj.weight), requires_grad=False)
    replaced = _logits(m, 2)
    assert not torch.equal(replaced, clean)
    with torch.no_grad():
        m.decoder.model.layers[1].mlp.down_proj.weight.mul_(-1)
    assert not torch.equal(_logits(m, 2), replaced)
