"""Smoke test of ``verispec bench kernels`` at tiny sizes: JSON rows, counted bytes, hooks, plot."""

from __future__ import annotations

import json

import pytest

from verispec.bench import kernels as kb
from verispec.cli import main


def test_bench_kernels_writes_json_and_plot(tmp_path, monkeypatch):
    extra = []
    monkeypatch.setitem(kb._HOOKS, "torch", lambda ks, case, x: extra.append(case.T) or {"torch_extra": case.S})
    rc = main(["bench", "kernels", "--backend", "torch,nki", "--T", "1,3", "--S", "8,20", "--heads", "4",
               "--kv-heads", "2", "--head-dim", "16", "--warmup", "0", "--repeats", "1", "--bandwidth-mib", "8",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = data["results"]
    assert [(r["backend"], r["S"], r["T"]) for r in rows] == [
        (b, S, T) for b in ("torch", "nki") for S in (8, 20) for T in (1, 3)]
    assert sorted(extra) == [1, 1, 3, 3] and all(r["torch_extra"] == r["S"] for r in rows if r["backend"] == "torch")
    for r in rows:
        item = 4  # float32
        want = 2 * r["B"] * r["H"] * r["T"] * r["D"] * item + 2 * r["B"] * r["H_kv"] * (r["S"] + r["T"]) * r["D"] * item
        assert r["min_bytes"]["verify_attention"] == want
        assert r["min_bytes"]["kv_append"] == 2 * 2 * r["B"] * r["H_kv"] * r["T"] * r["D"] * item
        assert r["verify_attention"]["median_s"] > 0 and r["kv_append"]["achieved_GBps"] > 0
    for r in rows:  # token trees: a binary tree of T nodes, the path root -> node T-1 gathered
        assert r["tree_path"] == {1: [0], 3: [0, 2]}[r["T"]]
        assert r["min_bytes"]["kv_gather"] == 2 * 2 * r["B"] * r["H_kv"] * len(r["tree_path"]) * r["D"] * 4
        assert r["verify_attention_tree"]["median_s"] > 0 and r["kv_gather"]["achieved_GBps"] > 0
        assert r["kv_gather_impl"] == {"torch": "reference", "nki": "backend"}[r["backend"]]
    for r in (r for r in rows if r["backend"] == "nki"):
        for name in ("verify_attention_nki", "kv_append_nki", "verify_attention_tree_nki", "kv_gather_nki"):
            assert r[name]["hbm_bytes_over_min"] >= 1.0  # a kernel cannot move less than it must
            assert set(r[name]["instructions"]) == {"tensor", "vector", "scalar", "gpsimd", "sync", "dma"}
        assert r["verify_attention_nki"]["instructions"]["tensor"] > 0
        assert r["verify_attention_tree_nki"]["instructions"]["tensor"] > 0
        n = len(r["tree_path"])  # kv_gather: per path row one slot index and K, V each gathered and scattered
        assert r["kv_gather_nki"]["instructions"]["dma"] == r["B"] * (1 + 5 * n)
        assert r["kv_gather_nki"]["hbm_write_bytes"] == r["min_bytes"]["kv_gather"] // 2
    assert data["memory_bandwidth"]["read_GBps"] > 0
    assert (tmp_path / "kernels.png").stat().st_size > 10_000


def test_bench_kernels_rejects_bad_lists():
    with pytest.raises(ValueError, match="--T needs positive values"):
        kb._csv("0,1", int, "--T")
    with pytest.raises(ValueError, match="comma-separated"):
        kb._csv("a,b", int, "--S")
