"""``verispec bench decode`` smoke test on a tiny model: JSON written, byte counts right."""

import json

import pytest
import torch

from verispec.cli import main as cli_main
from verispec.kernels.cpu import available as native_available


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bench_writes_json(tied, tiny_hf, tmp_path):
    from tiny_gguf import write_tiny_gguf

    _, hf = tiny_hf("llama", vocab_size=300, tie_word_embeddings=tied)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, "llama")  # carries a tokenizer for the prompt
    out = tmp_path / "results"
    rc = cli_main(["bench", "decode", "--models", path, "--dtypes", "f32,bf16,bf16+int8", "--new-tokens", "5", "--repeats", "2",
                   "--bandwidth-bytes", str(1 << 22), "--verify-context", "40", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "decode.json").read_text())
    assert (out / "decode.png").stat().st_size > 0
    assert data["benchmark"] == "decode" and data["memory_bandwidth"]["read_GBps"] > 0
    rows = {r["amp"]: r for r in data["results"]}
    assert set(rows) == {"f32", "bf16", "bf16+int8"}
    # independent count from the HF model: all parameters, minus the embedding table when the
    # head is a separate matrix (a tied head is read in full once, as the head)
    n_embed = hf.model.embed_tokens.weight.numel()
    n_all = sum(p.numel() for p in hf.parameters())  # tied weights counted once by parameters()
    n_read = n_all if tied else n_all - n_embed
    assert rows["f32"]["weight_bytes_per_token"] == 4 * n_read
    assert rows["bf16"]["weight_bytes_per_token"] == 2 * n_read
    # int8: one byte per weight of every linear layer (the LM head's, tied or not), a 4-byte
    # scale per output row, bf16 biases (none here) and bf16 norm weights
    linears = [m for m in hf.modules() if isinstance(m, torch.nn.Linear)]
    n_norm = sum(p.numel() for n, p in hf.named_parameters() if "norm" in n)
    assert rows["bf16+int8"]["weight_bytes_per_token"] == sum(m.weight.numel() + 4 * m.weight.shape[0] for m in linears) + 2 * n_norm
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_runs"]) == 2
        assert r["achieved_weight_GBps"] == pytest.approx(r["weight_bytes_per_token"] * r["tokens_per_s"] / 1e9)
        assert r["fraction_of_read_bandwidth"] == pytest.approx(
            r["achieved_weight_GBps"] / data["memory_bandwidth"]["read_GBps"])
        near = min(r["memory_bandwidth_before"]["read_GBps"], data["memory_bandwidth"]["read_GBps"])
        assert r["fraction_of_nearby_read_bandwidth"] == pytest.approx(r["achieved_weight_GBps"] / near)
        # paired: each timed run against the bandwidth measured just before it, median over runs
        assert len(r["read_GBps_paired"]) == 2 and min(r["read_GBps_paired"]) > 0
        runs = [r["weight_bytes_per_token"] * t / 1e9 / bw for t, bw in zip(r["tokens_per_s_runs"], r["read_GBps_paired"])]
        assert r["fraction_of_paired_read_bandwidth_runs"] == pytest.approx(runs)
        assert r["fraction_of_paired_read_bandwidth"] == pytest.approx(sorted(runs)[0] / 2 + sorted(runs)[1] / 2)
        # interleaved: 2 more runs, a probe after each of the 5 - 2 timed decode steps
        inter = r["interleaved_runs"]
        if not native_available():  # the probe is the native streaming read
            assert inter == [] and r["fraction_of_interleaved_read_bandwidth"] is None
        else:
            assert len(inter) == 2 and all(i["steps"] == 3 and i["step_s"] > 0 and i["floor_s"] > 0 for i in inter)
            fr = [i["floor_s"] / i["step_s"] for i in inter]
            assert r["fraction_of_interleaved_read_bandwidth_runs"] == pytest.approx(fr)
            assert r["fraction_of_interleaved_read_bandwidth"] == pytest.approx(sum(fr) / 2)
            assert all(i["read_GBps"] == pytest.approx(r["weight_bytes_per_token"] * 3 / i["floor_s"] / 1e9) for i in inter)
        ms = {int(T): v for T, v in r["forward_ms_by_T"].items()}
        assert set(ms) == {1, 2, 3, 4, 5, 6, 8} and min(ms.values()) > 0 and r["verify_context"] == 40
        assert r["verify_k5_over_decode"] == pytest.approx(ms[5] / ms[1])
        assert r["profile"] is None  # only with --profile


def test_decode_bench_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["bench", "decode", "--models", "x", "--new-tokens", "1", "--out", str(tmp_path)]) == 1
    assert cli_main(["bench", "decode", "--models", "x", "--bandwidth-bytes", "100", "--out", str(tmp_path)]) == 1
    cap = capsys.readouterr()
    assert "--bandwidth-bytes must be at least 65536" in " ".join((cap.err + cap.out).split())


def test_decode_bench_profile(tiny_hf, tmp_path, capsys):
    """--profile: one more greedy sample under cProfile; the kernel backend's seconds are part of
    the total, the top list is ordered by own time, and the table line reports the share."""
    from tiny_gguf import write_tiny_gguf

    _, hf = tiny_hf("llama", vocab_size=300)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf, "llama")
    out = tmp_path / "results"
    assert cli_main(["bench", "decode", "--models", path, "--dtypes", "bf16", "--new-tokens", "5", "--repeats", "1",
                     "--bandwidth-bytes", str(1 << 22), "--verify-context", "40", "--profile", "--out", str(out)]) == 0
    (row,) = json.loads((out / "decode.json").read_text())["results"]
    prof = row["profile"]
    assert 0 < prof["kernel_backend_s"] < prof["total_s"]  # the cpu backend's step, or the torch reference's kernels
    assert prof["kernel_backend_share"] == pytest.approx(prof["kernel_backend_s"] / prof["total_s"])
    own = [f["own_s"] for f in prof["top_own_time"]]
    assert 0 < len(own) <= 12 and own == sorted(own, reverse=True)
    assert all(f["calls"] >= 1 and f["cumulative_s"] >= f["own_s"] - 1e-9 for f in prof["top_own_time"])
    assert "under cProfile" in " ".join(capsys.readouterr().out.split())
