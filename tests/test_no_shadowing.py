"""The checkout's top-level folders must never be importable as top-level modules during a test run.

kernels/, model/, spec/, parallel/ and bench/ are installed as verispec.kernels, verispec.model, ...;
if the repository root were on sys.path, `import kernels` would find the checkout's folder instead of
Hugging Face's `kernels` package (which transformers imports), and every oracle test would fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("kernels", "model", "spec", "parallel", "bench")

PROBE = """
import importlib.util, json, sys
from pathlib import Path
repo = Path(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    spec = importlib.util.find_spec(name)
    locs = list(spec.submodule_search_locations or []) if spec else []
    where = [spec.origin] if spec and spec.origin else []
    out[name] = [p for p in where + locs if Path(p).resolve().is_relative_to(repo / name)]
print(json.dumps(out))
"""


def _inside_repo(name: str) -> list[str]:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return []
    places = ([spec.origin] if spec.origin else []) + list(spec.submodule_search_locations or [])
    return [p for p in places if Path(p).resolve().is_relative_to(REPO / name)]


@pytest.mark.parametrize("name", FOLDERS)
def test_repo_folder_is_not_a_top_level_module(name):
    assert _inside_repo(name) == [], f"`import {name}` would load the checkout's {name}/ folder"


def test_installed_package_is_used_for_the_folders():
    import verispec.kernels

    # the package is importable by its real name (mapped from the checkout's kernels/ folder)
    assert Path(verispec.kernels.__file__).resolve().parent == REPO / "kernels"


def test_child_process_started_in_the_checkout_cannot_import_the_folders():
    """A child started as tests start theirs (``python -m ...`` from the repository root, with the
    test run's environment) must not see the folders either."""
    run = subprocess.run([sys.executable, "-c", PROBE, str(REPO), *FOLDERS], cwd=REPO, env=dict(os.environ),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    import json

    found = json.loads(run.stdout)
    assert found == {name: [] for name in FOLDERS}, found


def test_transformers_imports_with_hf_kernels_installed():
    """transformers (the test oracle) imports; where Hugging Face's `kernels` package is installed,
    it is that package, not the checkout's folder."""
    import transformers
    assert transformers.LlamaConfig is not None
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert not Path(spec.origin).resolve().is_relative_to(REPO / "kernels")
