"""Bad checkpoints and bad requests fail with errors that name the file and the problem."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_gguf import write_tiny_gguf

from verispec.model import CheckpointError, ConfigError, GGUFSource, LlamaForSampling, TokenizerError
from verispec.model.tokenizer import Tokenizer


@pytest.fixture
def llama_dir(tiny_hf):
    return tiny_hf("llama", vocab_size=300)


@pytest.fixture
def llama_gguf(llama_dir, tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf", llama_dir[1], "llama")


def _edit_weights(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_truncated_safetensors(llama_dir):
    path = llama_dir[0]
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as h:
        h.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        LlamaForSampling.from_pretrained(path)


def test_missing_tensor_is_named(llama_dir):
    path = llama_dir[0]
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        LlamaForSampling.from_pretrained(path)


def test_wrong_shape_is_named(llama_dir):
    path = llama_dir[0]
    _edit_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint \(63,\) vs config \(64,\)"):
        LlamaForSampling.from_pretrained(path)


def test_unknown_architecture_in_config_json(llama_dir):
    path = llama_dir[0]
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"], cfg["architectures"] = "falcon", ["FalconForCausalLM"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match="unknown architecture.*falcon"):
        LlamaForSampling.from_pretrained(path)


def test_unknown_architecture_in_gguf(llama_dir, tmp_path):
    path = write_tiny_gguf(tmp_path / "f.gguf", llama_dir[1], "llama", arch_name="falcon")
    with pytest.raises(ConfigError, match=r"f\.gguf: unknown architecture 'falcon'"):
        GGUFSource(path)


def test_bad_magic(llama_gguf):
    with open(llama_gguf, "r+b") as h:
        h.write(b"GGML")
    with pytest.raises(CheckpointError, match=r"tiny\.gguf: not a GGUF file \(bad magic bytes\)"):
        LlamaForSampling.from_pretrained(llama_gguf)


def test_not_a_gguf_at_all(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFSource(p)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(min_value=0.0, max_value=0.9999))
def test_truncated_gguf_at_any_point(cut, llama_gguf, tmp_path_factory):
    """Cutting the file anywhere gives a CheckpointError naming the file, never a crash or garbage."""
    size = os.path.getsize(llama_gguf)
    keep = int(cut * size)
    p = tmp_path_factory.mktemp("cut") / "cut.gguf"
    with open(llama_gguf, "rb") as src:
        p.write_bytes(src.read(keep))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: (not a GGUF file|corrupt or truncated|truncated GGUF)"):
        GGUFSource(p)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(4, 6000), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupt_gguf_header_bytes_never_crash(flips, llama_gguf, tmp_path_factory):
    """Garbage in the metadata/tensor directory either still parses or raises a checkpoint or
    config error naming the file; never an IndexError, MemoryError or struct.error."""
    data = bytearray(open(llama_gguf, "rb").read())
    for at, value in flips:
        data[at] = value
    p = tmp_path_factory.mktemp("flip") / "flip.gguf"
    p.write_bytes(bytes(data))
    try:
        GGUFSource(p)
    except (CheckpointError, ConfigError) as e:
        assert "flip.gguf" in str(e)


def test_unsupported_quant_type(llama_dir, tmp_path):
    extra = {"blk.0.odd.weight": np.zeros((4, 8), dtype=np.int32)}  # I32: nothing to dequantize
    path = write_tiny_gguf(tmp_path / "q.gguf", llama_dir[1], "llama", extra_tensors=extra)
    with pytest.raises(CheckpointError, match=r"q\.gguf: tensor blk\.0\.odd\.weight has quantization type I32"):
        GGUFSource(path)


def test_gguf_missing_tensor_is_named(llama_dir, tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", llama_dir[1], "llama", skip=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.down_proj\.weight"):
        LlamaForSampling.from_pretrained(path)


def test_gguf_unknown_tensor_is_named(llama_dir, tmp_path):
    extra = {"blk.0.attn_output.bias": np.zeros(64, dtype=np.float32)}
    path = write_tiny_gguf(tmp_path / "m.gguf", llama_dir[1], "llama", extra_tensors=extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): blk\.0\.attn_output\.bias"):
        LlamaForSampling.from_pretrained(path)


def test_gguf_unsupported_pre_tokenizer(llama_dir, tmp_path):
    path = write_tiny_gguf(tmp_path / "p.gguf", llama_dir[1], "llama", pre="chatglm-bpe")
    with pytest.raises(TokenizerError, match=r"p\.gguf: unsupported pre-tokenizer tokenizer\.ggml\.pre='chatglm-bpe'"):
        Tokenizer.from_pretrained(path)


def test_sequence_length_beyond_n_positions(llama_dir):
    m = LlamaForSampling.from_pretrained(llama_dir[0], n_positions=16)
    with pytest.raises(ValueError, match="sequence_length=17 is longer than n_positions=16"):
        m.sample(torch.tensor([[1, 2, 3]]), sequence_length=17)


def test_batch_larger_than_batch_size(llama_dir):
    m = LlamaForSampling.from_pretrained(llama_dir[0], n_positions=16, batch_size=2)
    with pytest.raises(ValueError, match="batch of 3 prompts exceeds batch_size=2"):
        m.sample(torch.ones(3, 4, dtype=torch.long), sequence_length=8)
    with pytest.raises(ValueError, match="batch of 3 rows exceeds batch_size=2"):
        m.forward(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory or file, and not a registered model name"):
        LlamaForSampling.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin: not a model directory or a \.gguf file"):
        LlamaForSampling.from_pretrained(str(tmp_path / "weights.bin"))


def test_named_model_typo_suggests_the_name():
    with pytest.raises(FileNotFoundError, match=r"not a registered model name \(did you mean 'smollm2-135m'\?\)"):
        LlamaForSampling.from_pretrained("smollm-135m")


def test_directory_without_weights(llama_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(os.path.join(llama_dir[0], "config.json"), d)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        LlamaForSampling.from_pretrained(str(d))
