"""The cpu backend's compiled decoder (kernels/cpu/compiled.py, fused.c's verispec_step): the
module path's logits for every product kind, dtype and batch shape it takes; the module path
where it does not apply; plans rebuilt after replaced modules and parameters, new storage and
hooks; the typed C boundary checked against its mirror."""

import ctypes

import pytest
import torch

from verispec.kernels import cpu as native
from verispec.kernels.cpu import abi, compiled
from verispec.kernels.cpu.build import get_lib

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


def _both(model, ids, pos, prefix, **kw):
    """Logits of one forward over ids after ``prefix`` cached tokens (``kw``: more forward
    arguments): (module path, compiled, native calls)."""
    calls = []
    real = compiled.CompiledDecoder._step

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    out = []
    runner = model.runner
    for r in (model.decoder, runner):
        model.runner = r
        model.reset()
        model.prefill([p for p in prefix])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compiled.CompiledDecoder, "_step", counting)
            calls.clear()
            out.append(model.forward(ids, pos, **kw))
    model.runner = runner
    return out[0], out[1], len(calls)


QUANTS = [None, "int8"] + (["w8a8"] if get_lib() is not None and get_lib().verispec_w8a8_available() else [])


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("amp", ["bf16", "f32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases and a tied head
def test_compiled_step_gives_the_module_path_logits(tiny_hf, arch, amp, quant):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf(arch, **({"tie_word_embeddings": True} if arch == "qwen2" else {}))
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3, amp=amp, quant=quant)
    assert isinstance(m.runner, compiled.CompiledDecoder) and m.runner.native
    g = torch.Generator().manual_seed(0)
    prefix = [torch.randint(0, m.vocab_size, (n,), generator=g) for n in (9, 4, 13)]
    for B, T in ((1, 1), (1, 5), (3, 1), (3, 5)):  # decode and verify, one row and a batch
        ids = torch.randint(0, m.vocab_size, (B, T), generator=g)
        pos = torch.tensor([len(p) for p in prefix[:B]])
        a, b, calls = _both(m, ids, pos, prefix[:B])
        assert calls == 1, (B, T)
        if amp == "bf16":
            assert torch.equal(a, b), (B, T)
        else:  # SiLU's exp (C library vs torch) may differ in an fp32 ulp
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (B, T, (a - b).abs().max().item())


def _bf16_case(tiny_hf, seed: int, n_prefix: int, T: int, **kw):
    """A tiny bf16 llama, a cached prefix of n_prefix random tokens and T more to run after it."""
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=32, amp="bf16", **kw)
    g = torch.Generator().manual_seed(seed)
    prefix = [torch.randint(0, m.vocab_size, (n_prefix,), generator=g)]
    ids, pos = torch.randint(0, m.vocab_size, (1, T), generator=g), torch.tensor([n_prefix])
    return m, prefix, ids, pos


def _tree(rng, T: int):
    """A random token tree of T nodes (parents before children): its ancestor mask [T, T] and depths [T]."""
    parents = [-1] + [rng.randrange(0, t) for t in range(1, T)]
    mask, depth = torch.zeros(T, T, dtype=torch.bool), [0] * T
    for t in range(T):
        j = t
        while j >= 0:
            mask[t, j], j = True, parents[j]
        depth[t] = 0 if parents[t] < 0 else depth[parents[t]] + 1
    return mask, torch.tensor(depth)


@pytest.mark.parametrize("amp", ["bf16", "f32"])
def test_compiled_step_takes_token_trees(tiny_hf, amp):
    """A forward with a tree's active_mask and position_ids (RoPE at each node's depth) takes the
    native step and gives the module path's logits."""
    import random

    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3, amp=amp)
    assert isinstance(m.runner, compiled.CompiledDecoder) and m.runner.native
    g, rng = torch.Generator().manual_seed(2), random.Random(2)
    prefix = [torch.randint(0, m.vocab_size, (n,), generator=g) for n in (9, 4, 13)]
    for B, T in ((1, 1), (1, 7), (1, 16), (3, 5)):
        trees = [_tree(rng, T) for _ in range(B)]
        mask = torch.stack([t[0] for t in trees])
        ids = torch.randint(0, m.vocab_size, (B, T), generator=g)
        pos = torch.tensor([len(p) for p in prefix[:B]])
        position_ids = pos[:, None] + torch.stack([t[1] for t in trees])
        a, b, calls = _both(m, ids, pos, prefix[:B], active_mask=mask, position_ids=position_ids)
        assert calls == 1, (B, T)
        if amp == "bf16":
            assert torch.equal(a, b), (B, T)
        else:  # SiLU's exp (C library vs torch) may differ in an fp32 ulp
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (B, T, (a - b).abs().max().item())
    # the tree's logits are not the causal chain's: the mask reached the attention
    mask = torch.eye(4, dtype=torch.bool)[None]
    ids = torch.randint(0, m.vocab_size, (1, 4), generator=g)
    tree, _, _ = _both(m, ids, torch.tensor([9]), prefix[:1], active_mask=mask, position_ids=torch.full((1, 4), 9))
    chain, _, _ = _both(m, ids, torch.tensor([9]), prefix[:1])
    assert torch.equal(tree[0, 0], chain[0, 0]) and not torch.equal(tree[0, 1:], chain[0, 1:])


def test_module_path_where_the_step_does_not_apply(tiny_hf):
    m, prefix, _, pos = _bf16_case(tiny_hf, seed=1, n_prefix=6, T=1)
    g = torch.Generator().manual_seed(1)
    _, _, calls = _both(m, torch.randint(0, m.vocab_size, (1, 17), generator=g), pos, prefix)  # T > 16
    assert calls == 0
    m.reset()
    m.prefill(prefix)
    mask = torch.ones(1, 2, 2, dtype=torch.uint8)  # not a bool mask: the module path, whose kernels reject it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled.CompiledDecoder, "_step", lambda *a, **k: pytest.fail("native step with a bad mask"))
        with pytest.raises(ValueError, match="active_mask must be a bool tensor"):
            m.forward(torch.randint(0, m.vocab_size, (1, 2), generator=g), pos, active_mask=mask)
    t, *_ = _bf16_case(tiny_hf, seed=1, n_prefix=6, T=1, kernel_backend="torch")
    assert t.runner is t.decoder  # no compiler: the decoder itself


def test_plan_follows_replaced_modules(tiny_hf):
    from verispec.kernels.cpu.quant import Int8Linear, quantize_weights

    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=2, n_prefix=4, T=2)
    before, _, _ = _both(m, ids, pos, prefix)
    quantize_weights(m.decoder, "int8")  # swaps every linear layer for an Int8Linear
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b) and not torch.equal(a, before)
    assert m.runner._plan.layers[0].qkv.kind == 1 and isinstance(m.decoder.model.layers[0].mlp.down_proj, Int8Linear)


def test_plan_follows_weights_given_new_storage(tiny_hf):
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=3, n_prefix=5, T=3)
    before, _, _ = _both(m, ids, pos, prefix)
    with torch.no_grad():
        for layer in m.decoder.model.layers:  # same Parameter objects, new storage and values
            for lin in (layer.mlp.down_proj, layer.self_attn.k_proj):
                lin.weight.data = (lin.weight.data * 2).clone()
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b) and not torch.equal(a, before)
    k = m.decoder.model.layers[0].self_attn.k_proj.weight  # laid out with q and v again
    assert k.data_ptr() == m.decoder.model.layers[0].self_attn.q_proj.weight.data_ptr() + \
        m.decoder.model.layers[0].self_attn.q_proj.weight.nbytes


def test_plan_follows_a_replaced_projection_parameter(tiny_hf):
    """A q projection given a new Parameter object: the native step reads it, and from then on
    the registered parameter (the same object) views the fused buffer, so later in-place edits
    of it are seen too."""
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=4, n_prefix=4, T=2)
    before, _, _ = _both(m, ids, pos, prefix)
    attn = m.decoder.model.layers[0].self_attn
    new = torch.nn.Parameter(-attn.q_proj.weight.detach().clone(), requires_grad=False)
    attn.q_proj.weight = new
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b) and not torch.equal(a, before)
    assert attn.q_proj.weight is new
    with torch.no_grad():
        new.mul_(0.5)
    a2, b2, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a2, b2) and not torch.equal(a2, a)


def test_forward_hooks_run_on_the_module_path(tiny_hf):
    """A forward hook on any module of the model (activation patching) sends the forward through
    the modules, where the hook runs; removing it brings the native step back."""
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=5, n_prefix=4, T=1)
    clean, _, calls = _both(m, ids, pos, prefix)
    assert calls == 1
    seen = []

    def patch(mod, args, out):
        seen.append(out.shape)
        return out * 0

    handle = m.decoder.model.layers[1].mlp.down_proj.register_forward_hook(patch)
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 0 and len(seen) == 4 and torch.equal(a, b) and not torch.equal(a, clean)  # prefill + step, twice
    handle.remove()
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(b, clean)


def test_embedding_rows_and_errors(tiny_hf):
    """The step copies the embedding rows itself; an embedding module it does not know (here a
    subclass) runs as a module and the layers still take the step; an id outside the table is an
    IndexError naming it on both paths, not a read past the table."""
    class Embedding(torch.nn.Embedding):
        pass

    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=6, n_prefix=4, T=3)
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b)
    old = m.decoder.model.embed_tokens
    sub = Embedding(old.num_embeddings, old.embedding_dim)
    sub.weight = old.weight
    m.decoder.model.embed_tokens = sub
    a2, b2, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a2, b2) and torch.equal(a2, a)
    m.decoder.model.embed_tokens = old
    bad = ids.clone()
    bad[0, 1] = m.vocab_size
    for runner in (m.runner, m.decoder):
        saved, m.runner = m.runner, runner
        m.reset()
        with pytest.raises(IndexError, match=str(m.vocab_size) if runner is saved else "out of range"):
            m.forward(bad, pos)
        m.runner = saved


def test_recompile_after_a_change_the_checks_cannot_see(tiny_hf):
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=7, n_prefix=3, T=1)
    before, _, _ = _both(m, ids, pos, prefix)
    for layer in m.decoder.model.layers:
        layer.input_layernorm.eps = 0.5  # a constant the native plan copied
    m.recompile()
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b) and not torch.equal(a, before)


def test_the_c_structs_match_their_python_mirror():
    lib = get_lib()
    abi.check_layout(lib)  # as at load
    c = abi.library_layout(lib)
    assert c == abi.python_layout() and ("vs_step", "threads") in c and ("vs_layer", "qkv") in c

    class Shifted(ctypes.Structure):  # the mirror with two fields swapped
        _fields_ = [("k", ctypes.c_int64), ("kind", ctypes.c_int64), *abi.VsLinear._fields_[1:5]]

    class Short(ctypes.Structure):  # a field missing
        _fields_ = abi.VsStep._fields_[:-1]

    for name, wrong, field in (("vs_linear", Shifted, "vs_linear.kind"), ("vs_step", Short, "vs_step.threads")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(abi.STRUCTS, name, wrong)
            with pytest.raises(abi.ABIMismatch, match=field.replace(".", r"\.")):
                abi.check_layout(lib)


def test_tree_loop_verifies_on_the_native_step_up_to_16_tokens(tiny_hf, monkeypatch):
    """In the speculative loop with a token tree: one row's [2, 2, 1, 1] pass (15 tokens with its
    mask and depth positions) runs the native step; three rows (45 tokens) take the module path.
    Both give the target's greedy text."""
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("llama")
    other, _ = tiny_hf("llama", seed=1, num_hidden_layers=1)
    target = LlamaForSampling.from_pretrained(path, n_positions=96, batch_size=3)
    draft = LlamaForSampling.from_pretrained(other, n_positions=96, batch_size=3)
    assert target.runner.native
    seen = []
    real = compiled.CompiledDecoder._step

    def counting(self, plan, input_ids, positions, cache, position_ids, active_mask, n):
        if self is target.runner:
            seen.append((tuple(input_ids.shape), active_mask is not None))
        return real(self, plan, input_ids, positions, cache, position_ids, active_mask, n)

    monkeypatch.setattr(compiled.CompiledDecoder, "_step", counting)
    g = torch.Generator().manual_seed(0)
    for rows, native in ((1, True), (3, False)):
        ps = [torch.randint(0, target.vocab_size, (n,), generator=g) for n in (6, 9, 4)[:rows]]
        expected = target.sample(ps, 9 + 20, temperature=0)
        seen.clear()
        gen = SpeculativeGenerator(draft, target, tree=[2, 2, 1, 1], children="top")
        assert torch.equal(gen.sample(ps, 9 + 20, temperature=0), expected)
        tree_passes = [s for s in seen if s[1] and s[0][1] == 15]
        assert bool(tree_passes) == native, (rows, seen)
