"""Tokenizer from GGUF and HF directories, chat templates, and ``verispec convert`` on tiny models:
transformers loads what convert writes and computes the same logits."""

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_gguf import write_tiny_gguf

from verispec.cli import main as cli_main
from verispec.model import LlamaForSampling, Tokenizer, TokenizerError
from verispec.model.chat_template import render_chat_template

TEXTS = ["hello world", "the hello", " hello  world\n\nthe", "über 123 🤗", "<|im_start|>user\nhello<|im_end|>"]


@pytest.fixture
def tiny_gguf(tiny_hf, tmp_path):
    _, hf = tiny_hf("llama", vocab_size=300, tie_word_embeddings=True)
    return write_tiny_gguf(tmp_path / "t.gguf", hf, "llama"), hf


def test_gguf_tokenizer_uses_the_merges(tiny_gguf):
    tok = Tokenizer.from_pretrained(tiny_gguf[0])
    ids = tok.encode("hello world")
    assert [tok.backend.id_to_token(i) for i in ids] == ["hello", "Ġworld"]  # merged, not bytes
    assert tok.encode("<|im_start|>") == [1] and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(tok.encode("über 🤗")) == "über 🤗"
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=True) == "hi"
    assert tok.vocab_size == 270  # 300 ids minus the [PAD] fillers, as in HF's vocabulary


def test_saved_tokenizer_loads_in_transformers_identically(tiny_gguf, tmp_path):
    import transformers

    tok = Tokenizer.from_pretrained(tiny_gguf[0])
    tok.save(tmp_path / "tok")
    hft = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    again = Tokenizer.from_pretrained(tmp_path / "tok")
    for t in TEXTS:
        assert tok.encode(t) == hft(t)["input_ids"] == again.encode(t)
        assert tok.decode(tok.encode(t)) == hft.decode(hft(t)["input_ids"]) == t
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs) == hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert again.chat_template == tok.chat_template and hft.eos_token == "<|im_end|>"


def test_reads_a_directory_transformers_saved(tiny_gguf, tmp_path):
    """transformers' own save_pretrained layout (chat template possibly in chat_template.jinja)."""
    import transformers

    tok = Tokenizer.from_pretrained(tiny_gguf[0])
    tok.save(tmp_path / "ours")
    hft = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    hft.save_pretrained(str(tmp_path / "theirs"))
    back = Tokenizer.from_pretrained(tmp_path / "theirs")
    assert back.chat_template == tok.chat_template
    assert (back.bos_token, back.eos_token) == (tok.bos_token, tok.eos_token)
    for t in TEXTS:
        assert back.encode(t) == tok.encode(t)


def test_chat_template_environment_matches_transformers():
    """tojson without ASCII escaping, loop controls, trim/lstrip blocks, raise_exception."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
        "  {{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}go{% endif %}"
    )
    msgs = [{"role": "user", "content": "naïve 😊 \"q\""}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok"}]
    mine = render_chat_template(template, msgs, add_generation_prompt=True, bos_token="<s>")
    ref = render_jinja_template([msgs], chat_template=template, add_generation_prompt=True, bos_token="<s>")[0][0]
    assert mine == ref and '"naïve 😊 \\"q\\""' in mine
    with pytest.raises(TokenizerError, match="chat template failed: no system role"):
        render_chat_template("{{ raise_exception('no system role') }}", msgs)
    with pytest.raises(TokenizerError, match="list of dicts"):
        render_chat_template(template, ["hello"])


def test_tokenizer_errors(tiny_hf, tmp_path):
    _, hf = tiny_hf("llama", vocab_size=300)
    no_tok = write_tiny_gguf(tmp_path / "n.gguf", hf, "llama", with_tokenizer=False)
    with pytest.raises(TokenizerError, match=r"n\.gguf: tokenizer model None is not supported"):
        Tokenizer.from_pretrained(no_tok)
    d = tmp_path / "hfdir"
    d.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="not a registered model name"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    tok = Tokenizer.from_pretrained(write_tiny_gguf(tmp_path / "t.gguf", hf, "llama"))
    tok.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_convert_gguf_loads_in_transformers(arch, tied, tiny_hf, tmp_path):
    import transformers

    _, hf = tiny_hf(arch, vocab_size=300, tie_word_embeddings=tied)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, arch)
    out = tmp_path / "out"
    assert cli_main(["convert", path, str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back).__name__ == ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-5
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    ours = LlamaForSampling.from_pretrained(str(out), n_positions=32)  # and verispec reads it back
    assert (ours.forward(ids, torch.tensor([0])) - back(ids).logits).abs().max() < 1e-4


def test_convert_hf_dir_to_bf16(tiny_hf, tmp_path):
    src, hf = tiny_hf("llama")
    out = tmp_path / "bf16"
    from verispec.model.convert import convert

    convert(src, out, dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, hf.model.layers[0].mlp.up_proj.weight.detach().to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert(src, tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="is the input model itself"):
        convert(src, src)


def test_streaming_writer_matches_safetensors(tmp_path):
    from safetensors.torch import load_file

    from verispec.model.convert import write_safetensors_streaming

    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.float32), "d": torch.randn(1)}
    write_safetensors_streaming(tmp_path / "x.safetensors", {k: tuple(v.shape) for k, v in tensors.items()},
                                torch.float32, tensors.__getitem__)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_gguf_metadata_eot_joins_eos(tiny_hf, tmp_path):
    _, hf = tiny_hf("llama", vocab_size=300)
    p = tmp_path / "e.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    for k, v in (("llama.block_count", 1), ("llama.embedding_length", 64), ("llama.feed_forward_length", 96),
                 ("llama.attention.head_count", 4), ("llama.vocab_size", 300)):
        w.add_uint32(k, v)
    w.add_eos_token_id(2)
    w.add_eot_token_id(7)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    from verispec.model import GGUFSource

    c = GGUFSource(p).config
    assert c.eos_token_id == (2, 7) and c.num_key_value_heads == 4 and c.tie_word_embeddings
