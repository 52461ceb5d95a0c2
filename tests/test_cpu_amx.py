"""bf16 products on AMX tiles (gemv.c's tile kernel, ``amx=True`` models): a token's product does
not depend on the other rows of the pass, on the thread count or on the block split; the accuracy
of torch's own product; the native step gives the module path's logits; a speculative loop on an
amx target reproduces the target's own greedy text; and ``amx=True`` is refused, with the reason,
where it cannot run. The kernel tests need a CPU and kernel that grant AMX tiles (this project's
benchmark machine does); the refusals run everywhere."""

import pytest
import torch

from verispec.kernels import cpu as native
from verispec.kernels.cpu import compiled
from verispec.kernels.cpu.build import tiles_available
from verispec.kernels.cpu.linear import TileLinear, skinny_linear

needs_tiles = pytest.mark.skipif(not (native.available() and tiles_available()),
                                 reason="no AMX-BF16 tiles on this CPU (or no C compiler)")


def _bound(x, w, b, got):
    """|got - float64 product| <= 2x torch's own error + one bf16 output ulp."""
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    theirs = (torch.nn.functional.linear(x, w, b).double() - ref).abs().max().item()
    mag = x.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    ulp = torch.finfo(torch.bfloat16).eps * mag.max().item()
    return (got.double() - ref).abs().max().item() <= 2 * theirs + ulp + 1e-6


@needs_tiles
def test_tile_rows_are_bitwise_independent_of_the_other_rows():
    """Every row count a call takes (and more, split into calls of 16); N with rows past the last
    whole tile (N % 16) and K with a tail past 32 columns; the vector kernel's results differ."""
    g = torch.Generator().manual_seed(0)
    differs = False
    for K, N in ((64, 301), (1000, 48), (96, 17), (40, 16)):
        w = torch.randn(N, K, generator=g).bfloat16()
        b = torch.randn(N, generator=g).bfloat16()
        for M in range(1, 21):
            x = torch.randn(M, K, generator=g).bfloat16()
            together = skinny_linear(x, w, b, tiles=True)
            alone = torch.cat([skinny_linear(x[i:i + 1], w, b, tiles=True) for i in range(M)])
            assert torch.equal(together, alone), (K, N, M)
            assert _bound(x, w, b, together), (K, N, M)
            differs |= not torch.equal(together, skinny_linear(x, w, b))
            wide = skinny_linear(x, w, b, out_f32=True, tiles=True)
            assert torch.equal(wide.view(torch.int32), together.float().view(torch.int32)), (K, N, M)
    assert differs  # the tiles ran: their roundings are not the vector kernel's


@needs_tiles
@pytest.mark.parametrize("M,K,N", [(1, 64, 5003), (2, 96, 4099), (16, 1536, 700), (5, 20, 9)])
def test_tile_products_do_not_depend_on_the_thread_count(M, K, N):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    before = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3, 7):
            torch.set_num_threads(nt)
            outs.append(skinny_linear(x, w, b, tiles=True))
    finally:
        torch.set_num_threads(before)
    assert _bound(x, w, b, outs[0])
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@needs_tiles
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_amx_model_step_gives_the_module_path_logits(tiny_hf, arch):
    """Every linear is a TileLinear; the native step (kind 3 products) and the module path agree
    bitwise for decode, verify and tree passes, and a token's logits in a 16-token pass are its
    one-token step's."""
    from verispec.model import LlamaForSampling
    from test_cpu_compiled import _both

    path, _ = tiny_hf(arch, **({"tie_word_embeddings": True} if arch == "qwen2" else {}))
    m = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3, amp="bf16", amx=True)
    linears = [mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(type(mod) is TileLinear for mod in linears)
    assert m.runner.native
    layer = m.runner._current().layers[0]
    assert {layer.qkv.kind, layer.o.kind, layer.gate_up.kind, layer.down.kind} == {3}  # tile products
    plain = LlamaForSampling.from_pretrained(path, n_positions=64, batch_size=3, amp="bf16")
    g = torch.Generator().manual_seed(0)
    prefix = [torch.randint(0, m.vocab_size, (n,), generator=g) for n in (9, 4, 13)]
    for B, T in ((1, 1), (1, 16), (3, 5)):
        ids = torch.randint(0, m.vocab_size, (B, T), generator=g)
        pos = torch.tensor([len(p) for p in prefix[:B]])
        a, b, calls = _both(m, ids, pos, prefix[:B])
        assert calls == 1 and torch.equal(a, b), (B, T)
        other, _, _ = _both(plain, ids, pos, prefix[:B])
        assert torch.allclose(a, other, atol=0.05), (B, T)  # the vector kernel's logits, up to rounding
    mask = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    mask[8:, 1:8] = False  # two branches after the first node
    depth = torch.tensor([list(range(8)) + list(range(1, 9))])
    ids = torch.randint(0, m.vocab_size, (1, 16), generator=g)
    a, b, calls = _both(m, ids, torch.tensor([9]), prefix[:1], active_mask=mask[None], position_ids=9 + depth)
    assert calls == 1 and torch.equal(a, b)
    m.reset()
    m.prefill(prefix[:1])
    full = m.forward(ids, torch.tensor([9]))
    steps = [m.forward(ids[:, i:i + 1], torch.tensor([9 + i])) for i in range(16)]
    assert torch.equal(full, torch.cat(steps, 1))


@needs_tiles
def test_speculative_loop_on_an_amx_target_is_its_greedy_text(tiny_hf):
    from verispec.model import LlamaForSampling
    from verispec.spec import SpeculativeGenerator

    path, _ = tiny_hf("llama")
    other, _ = tiny_hf("llama", seed=1, num_hidden_layers=1)
    target = LlamaForSampling.from_pretrained(path, n_positions=96, batch_size=3, amp="bf16", amx=True)
    draft = LlamaForSampling.from_pretrained(other, n_positions=96, batch_size=3, amp="bf16")
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, target.vocab_size, (n,), generator=g) for n in (6, 9, 4)]
    expected = target.sample(ps, 40, temperature=0)
    for kw in ({"k": 8}, {"tree": [2, 2, 1, 1], "children": "top"}):
        assert torch.equal(SpeculativeGenerator(draft, target, **kw).sample(ps, 40, temperature=0), expected), kw


def test_amx_is_refused_where_it_cannot_run(tiny_hf):
    from verispec.model import LlamaForSampling

    path, _ = tiny_hf("llama")
    load = lambda **kw: LlamaForSampling.from_pretrained(path, n_positions=32, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="amp='bf16'"):
        load(amp="f32", amx=True)
    with pytest.raises(ValueError, match="quant='int8' stores int8"):
        load(amp="bf16", quant="int8", amx=True)
    with pytest.raises(ValueError, match="tp_degree=1"):
        load(amp="bf16", tp_degree=2, amx=True)
    with pytest.raises(ValueError, match="backend here is 'torch'"):
        load(amp="bf16", kernel_backend="torch", amx=True)
    with pytest.raises(TypeError, match="amx must be True or False"):
        load(amp="bf16", amx="yes")
    if native.available() and tiles_available():
        assert type(load(amp="bf16", amx=True).decoder.lm_head) is TileLinear
    else:
        with pytest.raises(RuntimeError, match="AMX tiles are unavailable here"):
            load(amp="bf16", amx=True)
