"""``verispec bench gemv`` on small shapes: JSON written with its byte counts; bad options rejected."""

import json

import pytest

from verispec.cli import main as cli_main
from verispec.kernels import cpu as native
from verispec.kernels.cpu.build import get_lib, tiles_available

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native CPU kernels not built")


def test_gemv_bench_writes_json(tmp_path, monkeypatch):
    shapes = [(64, 96), (40, 32)]
    monkeypatch.setattr("verispec.bench.gemv.QWEN_1_5B_SHAPES", shapes)
    out = tmp_path / "res"
    fmts = (["bf16", "int8"] + (["w8a8"] if get_lib().verispec_w8a8_available() else [])
            + (["bf16-amx"] if tiles_available() else []))
    rc = cli_main(["bench", "gemv", "--ms", "1,3", "--formats", ",".join(fmts), "--repeats", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "gemv.json").read_text())
    rows = {(r["format"], r["M"]): r for r in data["results"]}
    assert set(rows) == {(f, m) for f in fmts for m in (1, 3)}
    n_weights = sum(n * k for n, k in shapes)
    assert rows["bf16", 1]["weight_bytes"] == 2 * n_weights
    if tiles_available():
        assert rows["bf16-amx", 3]["weight_bytes"] == 2 * n_weights
    assert rows["int8", 3]["weight_bytes"] == n_weights + 4 * sum(n for n, _ in shapes)
    for r in rows.values():
        assert r["streamed_GBps"] > 0 and r["cache_resident_GBps"] > 0 and len(r["streamed_runs"]) == 2
        assert r["fraction_of_read_bandwidth"] == pytest.approx(r["streamed_GBps"] / r["read_bandwidth_GBps"])


@pytest.mark.parametrize("extra", [("--ms", "0"), ("--ms", "17"), ("--formats", "int4"), ("--repeats", "0")])
def test_gemv_bench_rejects_bad_options(tmp_path, extra):
    assert cli_main(["bench", "gemv", *extra, "--out", str(tmp_path)]) == 1
