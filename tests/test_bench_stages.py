"""``verispec bench stages`` on a tiny model: per-stage times recorded by the timing build, the
normal library put back, bad arguments refused."""

import json

import pytest

from verispec.cli import main as cli_main
from verispec.kernels.cpu import available as native_available
from verispec.kernels.cpu import build

pytestmark = pytest.mark.skipif(not native_available(), reason="no C compiler: native CPU kernels not built")


def _tiny(tiny_hf, tmp_path):
    from tiny_gguf import write_tiny_gguf

    _, hf = tiny_hf("llama", vocab_size=300)
    return write_tiny_gguf(tmp_path / "m.gguf", hf, "llama"), hf


def test_stages_bench_records_every_stage_and_restores_the_library(tiny_hf, tmp_path):
    path, hf = _tiny(tiny_hf, tmp_path)
    before = build.get_lib()
    out = tmp_path / "results"
    rc = cli_main(["bench", "stages", "--models", path, "--amp", "bf16", "--context", "40", "--ts", "1,3",
                   "--repeats", "2", "--rounds", "2", "--out", str(out)])
    assert rc == 0
    assert build.get_lib() is before  # the timing build was for the benchmark only
    data = json.loads((out / "stages.json").read_text())
    (row,) = data["results"]
    cfg = hf.config
    E, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    D = E // cfg.num_attention_heads
    # independent of the code under test: bytes from the HF config
    assert row["product_weight_bytes"]["gate_up"] == L * 2 * F * E * 2
    assert row["product_weight_bytes"]["qkv"] == L * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D * E * 2
    for T in ("1", "3"):
        p = row["by_T"][T]
        assert set(p["stages_ms"]) == set(data["stages"])
        # the products, the attention and the norms always take measurable time
        for s in ("norm", "qkv", "attention", "o", "gate_up", "down"):
            assert p["stages_ms"][s] > 0, (T, s)
        assert sum(p["stages_ms"].values()) < p["forward_ms"]  # the layers are part of the forward
        assert p["outside_layers_ms"] == pytest.approx(p["forward_ms"] - sum(p["stages_ms"].values()))
        assert set(p["products_GBps"]) == {"qkv", "o", "gate_up", "down"}
        for s, gbps in p["products_GBps"].items():
            assert gbps == pytest.approx(row["product_weight_bytes"][s] / (p["stages_ms"][s] / 1e3) / 1e9)


@pytest.mark.parametrize("bad", [["--ts", "0"], ["--ts", "17"], ["--ts", ""], ["--context", "0"], ["--repeats", "0"]])
def test_stages_bench_rejects_bad_arguments(bad, tiny_hf, tmp_path, capsys):
    path, _ = _tiny(tiny_hf, tmp_path)
    rc = cli_main(["bench", "stages", "--models", path, "--out", str(tmp_path / "r"), *bad])
    captured = capsys.readouterr()
    assert rc != 0 and "ValueError" in captured.err + captured.out
    assert ("--ts" if bad[0] == "--ts" else "--context, --repeats and --rounds") in captured.err + captured.out
    assert not (tmp_path / "r" / "stages.json").exists()


def test_stages_bench_names_a_model_that_does_not_run_the_native_layer(tiny_hf, tmp_path):
    """A model on the reference kernel backend never runs the fused native layer: an error, not a
    table of zeros."""
    from verispec.bench.stages import stage_profile, timing_library
    from verispec.model import LlamaForSampling

    path, _ = _tiny(tiny_hf, tmp_path)
    model = LlamaForSampling.from_pretrained(path, n_positions=64, amp="f32", kernel_backend="torch")
    _, stage_s = timing_library()
    with pytest.raises(RuntimeError, match="did not run the fused native layer"):
        stage_profile(model, stage_s, 10, [1], repeats=1, rounds=1)
