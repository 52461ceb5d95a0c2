"""Shared fixtures: tiny random Llama/Qwen2 checkpoints written by transformers (the test oracle)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The repository's top-level folders (kernels/, model/, spec/, parallel/, bench/) are importable
# only as verispec.* (pyproject.toml maps them). `python -m pytest` puts the working directory
# first on sys.path, where kernels/ would hide Hugging Face's `kernels` package (which
# transformers, the test oracle, imports). Drop the checkout from sys.path before anything is
# imported, and make every child process a test starts do the same (PYTHONSAFEPATH: Python
# prepends neither the working directory nor the script's folder).
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != REPO]
os.environ["PYTHONSAFEPATH"] = "1"
# The native CPU kernels run OpenMP parallel regions, many per token. Where more processes are
# runnable than there are cores (CI runners, a shared machine), libgomp's default of spinning at
# every barrier makes each region wait for a descheduled peer thread while burning the core that
# peer needs: SmolLM2's greedy-identity tests took 941 s instead of 80 s at a load average of 5 on
# 2 cores. Threads that sleep at barriers compute the same results (the kernels' work split does not
# depend on timing). Set before torch loads libgomp, which reads it once; children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_shadowing = [m for m in ("kernels", "model", "spec", "parallel", "bench")
              if m in sys.modules and str(getattr(sys.modules[m], "__file__", "") or "").startswith(str(REPO / m))]
if _shadowing:
    raise RuntimeError(f"the checkout's folders {_shadowing} were imported as top-level modules before the "
                       "tests started; run the tests as the README says (python -m pytest)")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def build_tiny_hf(path, arch: str = "llama", seed: int = 0, **overrides):
    """Save a tiny random HF model with ``save_pretrained``; return (path, the HF model)."""
    import transformers

    cfg = dict(TINY, **overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    else:
        raise ValueError(arch)
    model = model.float().eval()
    model.save_pretrained(path)
    return str(path), model


def load_tiny_trio(root, n_positions: int = 128, batch_size: int = 3) -> dict:
    """A tiny random Llama target, a separately loaded twin (same weights) and a one-layer other
    model, as LlamaForSampling: {"target", "twin", "other"}."""
    from verispec.model import LlamaForSampling

    target_dir, _ = build_tiny_hf(root / "target", "llama", seed=0)
    other_dir, _ = build_tiny_hf(root / "other", "llama", seed=1, num_hidden_layers=1)
    load = lambda d: LlamaForSampling.from_pretrained(d, n_positions=n_positions, batch_size=batch_size)  # noqa: E731
    return {"target": load(target_dir), "twin": load(target_dir), "other": load(other_dir)}


@pytest.fixture(scope="session")
def tiny_trio(tmp_path_factory) -> dict:
    """load_tiny_trio's models (128 positions, 3 rows), built once for every test file that uses them."""
    return load_tiny_trio(tmp_path_factory.mktemp("trio"))


@pytest.fixture(scope="session")
def smollm2_f32():
    """SmolLM2-135M-Instruct (fetched into the model cache on first use) in fp32 with the default
    kernels, 256 positions, 3 rows: loaded once for every test file that uses it."""
    from verispec.model import LlamaForSampling

    return LlamaForSampling.from_pretrained("smollm2-135m", n_positions=256, batch_size=3, amp="f32")


@pytest.fixture
def tiny_hf(tmp_path):
    """Factory: tiny_hf(arch="llama", **config_overrides) -> (dir, hf_model)."""
    counter = [0]

    def make(arch="llama", **overrides):
        counter[0] += 1
        return build_tiny_hf(tmp_path / f"{arch}{counter[0]}", arch, **overrides)

    return make


def word_tokenizer(directory, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over tokens t0..t{V-1}, enough for the CLI to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(directory / "tokenizer.json"))


def run_concurrently(fn, n: int = 3) -> tuple[list, list]:
    """Call ``fn()`` from ``n`` threads at once; return (results, exceptions)."""
    import threading

    results, errors = [], []

    def worker():
        try:
            results.append(fn())
        except Exception as e:  # reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors
