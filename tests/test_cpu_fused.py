"""One native call per decoder layer (kernels/cpu/fused.c, fused.py): the same logits as the
module path for every product kind, dtype and batch shape it takes, the fallbacks where it does
not apply, and plans rebuilt when a layer's modules are replaced."""

import pytest
import torch

from verispec.kernels import cpu as native
from verispec.kernels.cpu import fused
from verispec.kernels.cpu.build import get_lib

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


def _both(model, ids, pos, prefix):
    """Logits of one forward over ids after ``prefix`` cached tokens: (module path, fused path, calls)."""
    calls = []
    real = fused.run_layers

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    out = []
    for on in (False, True):
        model.decoder.fused_layers = on
        model.reset()
        model.prefill([p for p in prefix])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused, "run_layers", counting)
            out.append(model.forward(ids, pos))
    return out[0], out[1], len(calls)


QUANTS = [None, "int8"] + (["w8a8"] if get_lib() is not None and get_lib().verispec_w8a8_available() else [])


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("amp", ["bf16", "f32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases and a tied head
def test_fused_layers_give_the_module_path_logits(tiny_hf, arch, amp, quant):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf(arch, **({"tie_word_embeddings": True} if arch == "qwen2" else {}))
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3, amp=amp, quant=quant)
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


def test_fused_path_is_skipped_where_it_does_not_apply(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=64, amp="bf16")
    g = torch.Generator().manual_seed(1)
    prefix = [torch.randint(0, m.vocab_size, (6,), generator=g)]
    pos = torch.tensor([6])
    _, _, calls = _both(m, torch.randint(0, m.vocab_size, (1, 17), generator=g), pos, prefix)  # T > 16
    assert calls == 0
    t = LlamaForSampling.from_pretrained(path, n_positions=64, amp="bf16", kernel_backend="torch")
    _, _, calls = _both(t, torch.randint(0, t.vocab_size, (1, 2), generator=g), pos, prefix)  # another backend
    assert calls == 0
    m.decoder.fused_layers = True
    m.reset()
    m.prefill(prefix)
    mask = torch.ones(1, 2, 2, dtype=torch.bool).tril()  # a token tree: the module path
    assert fused.applies(m.kernels, torch.zeros(1, 2, 8, dtype=torch.bfloat16), mask) is False


def test_plans_follow_replaced_modules(tiny_hf):
    from verispec.kernels.cpu.quant import Int8Linear, quantize_weights
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=32, amp="bf16")
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    m.forward(ids, pos)
    first = m.decoder.__dict__["_fused_plans"][torch.bfloat16]
    quantize_weights(m.decoder, "int8")  # swaps every linear layer for an Int8Linear
    m.reset()
    m.forward(ids, pos)
    plans = m.decoder.__dict__["_fused_plans"][torch.bfloat16]
    assert plans is not first and all(p.words is not None and p.words[0] == 1 for p in plans)
    assert isinstance(m.decoder.model.layers[0].mlp.down_proj, Int8Linear)


def _bf16_case(tiny_hf, seed: int, n_prefix: int, T: int):
    """A tiny bf16 llama, a cached prefix of n_prefix random tokens and T more to run after it."""
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    m = LlamaForSampling.from_pretrained(path, n_positions=32, amp="bf16")
    g = torch.Generator().manual_seed(seed)
    prefix = [torch.randint(0, m.vocab_size, (n_prefix,), generator=g)]
    ids, pos = torch.randint(0, m.vocab_size, (1, T), generator=g), torch.tensor([n_prefix])
    return m, prefix, ids, pos


def test_plans_follow_weights_given_new_storage(tiny_hf):
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=2, n_prefix=5, T=3)
    _both(m, ids, pos, prefix)  # plans built
    with torch.no_grad():
        for layer in m.decoder.model.layers:  # same Parameter objects, new storage and values
            w = layer.mlp.down_proj.weight
            w.data = (w.data * 2).clone()
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b)


def test_plans_follow_a_replaced_weight_parameter(tiny_hf):
    """A linear layer given a new Parameter object (not just new storage): the plans see it."""
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=3, n_prefix=4, T=2)
    before, _, _ = _both(m, ids, pos, prefix)  # plans built
    for layer in m.decoder.model.layers:
        o = layer.self_attn.o_proj
        o.weight = torch.nn.Parameter(-o.weight.detach().clone(), requires_grad=False)
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b) and not torch.equal(a, before)


def test_fused_step_embedding_rows_and_errors(tiny_hf):
    """The fused step copies the embedding rows itself; an embedding module it does not know
    (here a subclass) runs as a module and the layers still fuse; an id outside the table is an
    IndexError naming it on both paths, not a read past the table."""
    class Embedding(torch.nn.Embedding):
        pass

    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=4, n_prefix=4, T=3)
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
    for on in (True, False):
        m.decoder.fused_layers = on
        m.reset()
        with pytest.raises(IndexError, match=str(m.vocab_size) if on else "out of range"):
            m.forward(bad, pos)


def _counting_holds(mp):
    """Patch _Fingerprint.holds to count its calls; return the list that grows by one per call."""
    calls = []
    real = fused._Fingerprint.holds

    def holds(self, decoder):
        calls.append(1)
        return real(self, decoder)

    mp.setattr(fused._Fingerprint, "holds", holds)
    return calls


def test_hold_plans_checks_once_per_block_and_per_thread(tiny_hf):
    """sample() checks the plans at its first fused forward, not at each; a forward outside the
    block, or on another thread while the block is open, checks as before; the block's end
    restores the outer state."""
    import threading

    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=6, n_prefix=4, T=1)
    m.forward(ids, torch.tensor([0]))  # plans built
    with pytest.MonkeyPatch.context() as mp:
        calls = _counting_holds(mp)
        m.sample(prefix[0][None], 4 + 6, temperature=0.0)  # prefill (4 tokens: fused) + 5 decode steps
        assert len(calls) == 1
        for _ in range(3):
            m.forward(ids, torch.tensor([0]))
        assert len(calls) == 4
        with fused.hold_plans():
            m.forward(ids, torch.tensor([0]))
            m.forward(ids, torch.tensor([0]))
            assert len(calls) == 5
            t = threading.Thread(target=lambda: m.forward(ids, torch.tensor([1])))
            t.start()
            t.join()
            assert len(calls) == 6  # the other thread is not inside this block
            with fused.hold_plans():  # a nested block checks once more, then holds
                m.forward(ids, torch.tensor([0]))
                m.forward(ids, torch.tensor([0]))
            assert len(calls) == 7
        assert getattr(fused._held, "scope", None) is None
        m.forward(ids, torch.tensor([0]))
        assert len(calls) == 8


def test_replacements_between_sample_calls_are_seen(tiny_hf):
    """A weight Parameter replaced between two sample() calls: the second call's plans use it
    (the same tokens as the module path), though each call checks only once."""
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=7, n_prefix=5, T=1)
    prompt = prefix[0][None]
    m.sample(prompt, 5 + 8, temperature=0.0)
    first = m.decoder.__dict__["_fused_plans"][torch.bfloat16]
    for layer in m.decoder.model.layers:
        d = layer.mlp.down_proj
        d.weight = torch.nn.Parameter(-d.weight.detach().clone(), requires_grad=False)
    fused_out = m.sample(prompt, 5 + 8, temperature=0.0)
    assert m.decoder.__dict__["_fused_plans"][torch.bfloat16] is not first
    m.decoder.fused_layers = False
    assert torch.equal(fused_out, m.sample(prompt, 5 + 8, temperature=0.0))


def test_speculative_generate_checks_each_decoder_once(tiny_hf):
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("llama")
    target = LlamaForSampling.from_pretrained(path, n_positions=64, amp="bf16")
    draft = LlamaForSampling.from_pretrained(path, n_positions=64, amp="bf16")
    target.enable_speculative_decoder(4)
    gen = SpeculativeGenerator(draft, target, 4)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    gen.sample(prompt, 5 + 12, temperature=0.0)  # plans built
    with pytest.MonkeyPatch.context() as mp:
        calls = _counting_holds(mp)
        out = gen.sample(prompt, 5 + 12, temperature=0.0)
        assert len(calls) == 2  # the target's and the draft's decoder
        assert len(list(gen.stream(prompt, 5 + 12, temperature=0.0))) > 2
        assert len(calls) > 4  # a stream checks at every forward: its caller runs between steps
    assert torch.equal(out, target.sample(prompt, 5 + 12, temperature=0.0))


def test_fused_rope_rows_from_tables_and_from_position_ids(tiny_hf):
    """The native step copies RoPE rows positions + t from the decoder's cast tables; explicit
    position ids give the module path's logits too; tables replaced (e.g. a device move) are cast
    again; a table without the rows a step needs is an IndexError, not a read past it."""
    m, prefix, ids, pos = _bf16_case(tiny_hf, seed=8, n_prefix=6, T=3)
    a, b, calls = _both(m, ids, pos, prefix)
    assert calls == 1 and torch.equal(a, b)
    shifted = pos[:, None] + torch.tensor([[0, 2, 5]])  # explicit, not positions + t
    outs = []
    for on in (False, True):
        m.decoder.fused_layers = on
        m.reset()
        m.prefill(prefix)
        outs.append(m.forward(ids, pos, position_ids=shifted))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], a)
    dec = m.decoder
    cos, sin = dec.rope_tables(torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, dec.rope_cos.to(torch.bfloat16))
    dec.rope_cos, dec.rope_sin = dec.rope_cos[:8].clone(), dec.rope_sin[:8].clone()  # rows 0..7 only
    assert dec.rope_tables(torch.bfloat16)[0].shape[0] == 8
    m.reset()
    m.prefill(prefix)
    with pytest.raises(IndexError, match="RoPE table of 8 positions"):
        m.forward(ids, pos)  # slots 6..8
