"""Named models' dequantized weights kept in the cache as safetensors (verispec.model.converted):
the second load reads them back instead of dequantizing, bit for bit the same; a changed source,
a truncated or corrupt file, an interrupted build all end in a rebuild, never in wrong weights."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_concurrently
from fake_named import NAME, Counter, install, register, write_gguf

from verispec.model import GGUFSource, LlamaForSampling, converted, gguf_source, hub


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def hf_pair(tiny_hf):
    return tiny_hf("llama", vocab_size=300, seed=0)[1], tiny_hf("llama", vocab_size=300, seed=1)[1]


@pytest.fixture
def named(home, monkeypatch, hf_pair):
    return install(home, monkeypatch, hf_pair[0])


@pytest.fixture
def dequantized(monkeypatch):
    return Counter(monkeypatch, GGUFSource, "_dequantize_into")


def load(what, amp="bf16"):
    return LlamaForSampling.from_pretrained(what, n_positions=32, amp=amp)


def weights(m) -> dict:
    """Every parameter's bits (dtype views, so -0.0 and NaN payloads count too)."""
    out = {}
    for k, v in m.decoder.state_dict().items():
        v = v.detach().contiguous()
        out[k] = (v.dtype, v.view(torch.int16 if v.element_size() == 2 else torch.int32).clone())
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) for k in a)


def direct(gguf_path, tmp_path, amp="bf16"):
    """The same GGUF loaded from outside the cache: dequantized, never converted."""
    outside = tmp_path / "outside" / "m.gguf"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(gguf_path.read_bytes())
    return weights(load(str(outside), amp))


@pytest.mark.parametrize("amp", ["bf16", "f32"])
def test_second_load_reads_the_cache_bit_for_bit(home, named, dequantized, tmp_path, amp):
    ref = direct(named, tmp_path, amp)
    dequantized.n = 0
    first = weights(load(NAME, amp))
    n_tensors = len(GGUFSource(named).names())
    assert dequantized.n == n_tensors  # built: every tensor dequantized once
    st, rec = converted.paths(NAME, {"bf16": torch.bfloat16, "f32": torch.float32}[amp])
    r = json.loads(rec.read_text())
    assert r["source_sha256"] == hub.get(NAME).sha256 and r["format"] == converted.FORMAT
    assert r["size"] == st.stat().st_size and r["dtype"] == amp
    second = weights(load(NAME, amp))
    assert dequantized.n == n_tensors  # read back: nothing dequantized
    assert same(first, ref) and same(second, ref)
    from safetensors.torch import load_file  # a plain safetensors file others can read

    assert set(load_file(st)) == set(GGUFSource(named).names())


def test_generate_path_uses_the_cache(home, named, dequantized):
    load(NAME)
    dequantized.n = 0
    m = load(str(named))  # `verispec generate` passes the resolved path of the cached file
    assert dequantized.n == 0 and m.source_path == named
    assert m.tokenizer.encode("hello world")  # the tokenizer still comes from the GGUF


def test_a_changed_source_invalidates_it(home, named, hf_pair, monkeypatch, dequantized, tmp_path):
    old = weights(load(NAME))
    write_gguf(named, hf_pair[1])  # another model under the same name (a new registry version)
    register(monkeypatch, named)
    ref = direct(named, tmp_path)
    dequantized.n = 0
    new = weights(load(NAME))
    assert dequantized.n > 0 and same(new, ref) and not same(new, old)
    st, rec = converted.paths(NAME, torch.bfloat16)
    assert json.loads(rec.read_text())["source_sha256"] == hub.get(NAME).sha256


def _damage_truncate(st, rec):
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)


def _damage_header_keep_stat(st, rec):  # same size, mtime put back: only parsing the file can tell
    s = st.stat()
    with open(st, "r+b") as f:
        f.seek(9)
        f.write(b"\xff\xfe garbage")
    os.utime(st, ns=(s.st_atime_ns, s.st_mtime_ns))


def _damage_other_source_keep_stat(st, rec):  # the header names another source's sha256
    s = st.stat()
    data = st.read_bytes().replace(hub.get(NAME).sha256.encode(), b"0" * 64)
    st.write_bytes(data)
    os.utime(st, ns=(s.st_atime_ns, s.st_mtime_ns))


def _damage_data_touched(st, rec):  # a changed mtime is enough to distrust it
    with open(st, "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    s = st.stat()
    os.utime(st, ns=(s.st_atime_ns, s.st_mtime_ns + 10**9))


def _damage_no_record(st, rec):
    rec.unlink()


def _damage_old_format(st, rec):
    r = json.loads(rec.read_text())
    rec.write_text(json.dumps(dict(r, format=converted.FORMAT - 1)))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_header_keep_stat, _damage_other_source_keep_stat,
                                    _damage_data_touched, _damage_no_record, _damage_old_format],
                         ids=lambda f: f.__name__[8:])
def test_a_damaged_converted_file_is_rebuilt(home, named, dequantized, tmp_path, damage):
    ref = direct(named, tmp_path)
    load(NAME)
    st, rec = converted.paths(NAME, torch.bfloat16)
    damage(st, rec)
    dequantized.n = 0
    assert same(weights(load(NAME)), ref)
    assert dequantized.n > 0  # rebuilt ...
    dequantized.n = 0
    assert same(weights(load(NAME)), ref) and dequantized.n == 0  # ... and trusted again


def test_an_interrupted_build_leaves_nothing_that_loads(home, named, dequantized, monkeypatch, tmp_path):
    ref = direct(named, tmp_path)
    real = GGUFSource.load
    calls = []

    def dies(self, name, shard=None, dtype=None):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed half way through writing
        return real(self, name, shard, dtype)

    monkeypatch.setattr(GGUFSource, "load", dies)
    with pytest.raises(KeyboardInterrupt):
        load(NAME)
    monkeypatch.setattr(GGUFSource, "load", real)
    d = home / NAME
    assert sorted(p.name for p in d.iterdir()) == [".lock"]  # no half file, no record
    (d / ".bf16.safetensors.partial").write_bytes(b"debris of a killed process")
    assert same(weights(load(NAME)), ref)
    assert sorted(p.name for p in d.iterdir()) == [".lock", "bf16.json", "bf16.safetensors"]


@pytest.mark.parametrize("where", ["_build", "locked", "write_json_atomic"])
def test_unwritable_cache_falls_back_to_the_gguf(home, named, monkeypatch, tmp_path, caplog, where):
    ref = direct(named, tmp_path)
    hub.resolve(NAME)  # the GGUF's own record written first

    def fails(*a, **k):
        raise OSError(28, "No space left on device") if where == "_build" else PermissionError(13, "read-only")

    monkeypatch.setattr(converted if where == "_build" else hub, where, fails)
    assert same(weights(load(NAME)), ref)
    assert "loading from the GGUF file" in caplog.text
    assert not converted.paths(NAME, torch.bfloat16)[1].exists()


def test_switched_off(home, named, monkeypatch, dequantized):
    monkeypatch.setenv("VERISPEC_CONVERTED_CACHE", "0")
    load(NAME)
    assert not (home / NAME).exists() and dequantized.n > 0


def test_shards_read_from_the_converted_file(home, named):
    load(NAME)
    src = converted.ConvertedSource(converted.paths(NAME, torch.bfloat16)[0], hub.get(NAME).sha256)
    name = "model.layers.0.mlp.up_proj.weight"
    full = src.load(name)
    assert full.dtype == torch.bfloat16 and tuple(full.shape) == (96, 64)
    assert torch.equal(src.load(name, shard=(0, 10, 30)), full[10:30])
    assert torch.equal(src.load(name, shard=(1, 5, 9)), full[:, 5:9])


def test_blockwise_dequantization_is_the_whole_tensors(named, monkeypatch):
    """Dequantizing a few rows at a time, cast as they come, gives the bits of dequantizing the
    whole tensor with gguf and casting it after."""
    import gguf

    monkeypatch.setattr(gguf_source, "_BLOCK_ELEMENTS", 100)  # 64 columns: one row per block
    src = GGUFSource(named)
    buf = np.memmap(named, dtype=np.uint8, mode="r")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        info = src._tensors[name]
        raw = np.array(buf[info.offset: info.offset + info.nbytes])
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            whole = gguf.quants.dequantize(raw, qtype).reshape(info.shape)
        else:
            whole = gguf.quants.dequantize(raw.reshape(info.shape[0], -1), qtype)
        whole = torch.from_numpy(np.ascontiguousarray(whole, dtype=np.float32)).reshape(info.shape)
        assert torch.equal(src.load(name, dtype=torch.float32), whole)
        assert torch.equal(src.load(name, dtype=torch.bfloat16).view(torch.int16), whole.bfloat16().view(torch.int16))


def test_a_large_gguf_is_parsed_once_while_unchanged(named, monkeypatch):
    monkeypatch.setattr(gguf_source, "_PARSE_KEEP_BYTES", 0)
    monkeypatch.setattr(gguf_source, "_PARSED", {})
    parses = Counter(monkeypatch, gguf_source, "read_gguf")
    a, b = GGUFSource(named), GGUFSource(named)
    assert parses.n == 1 and a.config == b.config and a.names() == b.names()
    st = named.stat()
    os.utime(named, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    GGUFSource(named)
    assert parses.n == 2
    monkeypatch.setattr(gguf_source, "_PARSE_KEEP_BYTES", st.st_size + 1)  # small files: always parsed
    monkeypatch.setattr(gguf_source, "_PARSED", {})
    GGUFSource(named)
    GGUFSource(named)
    assert parses.n == 4


def test_a_meta_decoder_does_not_import_dynamo():
    """Building the model to be loaded skips the random init, whose normal_ on the meta device
    would import torch._dynamo (2-3 s of every load, and nothing else in a run needs it)."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom verispec.model.config import LlamaConfig\nfrom verispec.model.decoder import Decoder\n"
            "with torch.device('meta'):\n    d = Decoder(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, "
            "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), 8)\n"
            "assert d.model.embed_tokens.weight.is_meta\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    from verispec.model.config import LlamaConfig
    from verispec.model.decoder import Decoder

    cpu = Decoder(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2), 8)
    assert cpu.model.embed_tokens.weight.std() > 0.5  # off the meta device: still randomly initialised


def test_concurrent_first_loads_convert_once(home, named, dequantized, tmp_path):
    ref = direct(named, tmp_path)
    dequantized.n = 0
    results, errors = run_concurrently(lambda: weights(load(NAME)))
    assert errors == [] and len(results) == 3 and all(same(r, ref) for r in results)
    assert dequantized.n == len(GGUFSource(named).names())  # one build; the others waited and read it
