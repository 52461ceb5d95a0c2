"""The CPU kernels' first build runs on a thread while models are fetched and loaded; whoever
needs the library meanwhile waits for that one build instead of starting a second."""

import threading
import time

from verispec.kernels.cpu import build


def test_background_build_is_the_only_build(monkeypatch):
    calls, started = [], threading.Event()
    lib = object()

    def slow_build():
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.3)
        return lib

    monkeypatch.setattr(build, "_lib", None)
    monkeypatch.setattr(build, "_error", None)
    monkeypatch.setattr(build, "_build", slow_build)
    build.build_in_background()
    assert started.wait(10)
    assert build.get_lib() is lib  # waited for the running build
    assert calls == ["verispec-native-build"]
    build.build_in_background()  # built: nothing more to do
    assert build.get_lib() is lib and len(calls) == 1


def test_failed_background_build_falls_back_once(monkeypatch, caplog):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(build, "_lib", None)
    monkeypatch.setattr(build, "_error", None)
    monkeypatch.setattr(build, "_build", broken)
    build.build_in_background()
    for _ in range(100):
        if build._error:
            break
        time.sleep(0.05)
    assert build.get_lib() is None and build.build_error() == "no compiler here" and calls == [1]


def test_a_killed_build_leaves_no_lasting_debris(tmp_path):
    """A half-written library from a build killed mid-way is removed by a later build once it is old;
    a young one (a build still running) and the finished libraries are left alone."""
    import os

    old, young, done = tmp_path / "tmpold.so", tmp_path / "tmpyoung.so", tmp_path / "native-0123.so"
    for p in (old, young, done):
        p.write_bytes(b"\0" * 16)
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(done, (hours_ago, hours_ago))
    build._remove_stale_partial_builds(tmp_path)
    assert not old.exists() and young.exists() and done.exists()
