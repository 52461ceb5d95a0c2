"""Shared benchmark helpers: machine description, a memory-bandwidth limit measured in the
same run, timing, and JSON output to the results directory (:func:`results_dir`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


RESULTS_DIR = "bench-results"  # the default results directory, relative to the current directory


def results_dir(override: str | None = None) -> Path:
    """Where a benchmark writes (created if missing): ``override`` (its --out / --out-dir), else
    $VERISPEC_RESULTS, else ./bench-results of the current directory; never the installed package.
    The project's committed results are written from the checkout with VERISPEC_RESULTS=bench/results."""
    d = Path(override or os.environ.get("VERISPEC_RESULTS") or Path.cwd() / RESULTS_DIR)
    d.mkdir(parents=True, exist_ok=True)
    return d


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure_memory_bandwidth(device: str = "cpu", nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Read and copy bandwidth (GB/s) of ``device`` memory, best of ``repeats``.

    read: a sum over a buffer far larger than the caches (bytes read / time); on CPU the
    native streaming-read kernel (as tight as the decode kernels) when it is available, else
    torch.sum; copy: a buffer copy, counting bytes read + written. Weight streaming in decode
    is a read, so ``read_GBps`` is the limit decode speed is compared against.
    """
    n = nbytes // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    read = a.sum
    if str(device) == "cpu":
        from verispec.kernels import cpu as native

        if native.available():
            read = lambda: native.stream_read(a)  # noqa: E731
    reads, copies = [], []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        read()
        sync()
        reads.append(nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        sync()
        copies.append(2 * nbytes / (time.perf_counter() - t) / 1e9)
    del a, b
    return {"read_GBps": max(reads[1:]), "copy_GBps": max(copies[1:]), "buffer_bytes": nbytes}


def time_fn(fn, warmup: int = 2, repeats: int = 10, device: str = "cpu") -> dict:
    """Wall time of ``fn()`` in seconds: median, min and all samples."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def write_json(name: str, data: dict, out_dir: str | None = None) -> Path:
    path = results_dir(out_dir) / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# ---- shared by the decoding benchmarks (e2e, traces) ---------------------------------------

PROMPTS_FILE = Path(__file__).with_name("prompts.json")  # the fixed prompt sets shared by the benchmarks


def parse_floats(text: str, name: str) -> list[float]:
    """Comma-separated numbers of option ``--name``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers, got {text!r}") from None


def prompt_sets() -> dict[str, list[str]]:
    """The prompt sets of bench/prompts.json: name -> user messages."""
    return {k: v for k, v in json.loads(PROMPTS_FILE.read_text()).items() if k != "description"}


def parse_prompt_sets(text: str, n: int, random_prompts: bool) -> list[str]:
    """--prompt-sets: comma-separated names of bench/prompts.json, each once, each holding n prompts
    (any n with random prompts)."""
    sets = [s.strip() for s in text.split(",") if s.strip()]
    known = prompt_sets()
    for s in sets:
        if s not in known:
            raise ValueError(f"unknown prompt set {s!r} in --prompt-sets; bench/prompts.json has {sorted(known)}")
        if not random_prompts and n > len(known[s]):
            raise ValueError(f"prompt set {s!r} has {len(known[s])} prompts, {n} asked for (--prompts)")
    if not sets or len(set(sets)) < len(sets):
        raise ValueError(f"--prompt-sets {text!r}: give each set once, at least one")
    return sets


def bench_prompts(set_name: str, n: int, tokenizer=None, random_vocab: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    """``n`` prompts of set ``set_name`` of bench/prompts.json as token ids, each user message in
    the tokenizer's chat template when it has one; with ``random_vocab``, random token prompts
    (for models without a tokenizer), different per set and reproducible from ``seed``."""
    sets = prompt_sets()
    names = sorted(sets)
    if set_name not in names:
        raise ValueError(f"unknown prompt set {set_name!r}; {PROMPTS_FILE} has {names}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of prompts must be a positive integer, got {n!r}")
    if random_vocab is not None:
        g = torch.Generator().manual_seed(seed * 1000 + names.index(set_name))
        return [torch.randint(0, random_vocab, (8 + 3 * i,), generator=g) for i in range(n)]  # [L_i] each
    if n > len(sets[set_name]):
        raise ValueError(f"prompt set {set_name!r} has {len(sets[set_name])} prompts, {n} asked for")
    out = []
    for text in sets[set_name][:n]:
        if tokenizer.chat_template:  # instruct models get the user message in their chat template
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
        else:
            ids = tokenizer.encode(text)
        out.append(torch.tensor(ids))  # [L_i]
    return out


def load_model(path_or_name, args, n_positions: int, quant: str | None = None, amx: bool = False):
    """A batch-1 LlamaForSampling with the benchmark's --amp, --kernel-backend and --device."""
    from verispec.model import LlamaForSampling

    return LlamaForSampling.from_pretrained(path_or_name, n_positions=n_positions, batch_size=1, amp=args.amp,
                                            kernel_backend=args.kernel_backend, device=args.device, progress=True,
                                            quant=quant, amx=amx)


def is_model_draft(draft: str) -> bool:
    """False for the drafts that are not a model of their own ('ngram', 'ngram:N', 'self:N')."""
    return not (draft == "ngram" or draft.startswith(("self:", "ngram:")))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.decoder.parameters())


def greedy_divergence(spec_outs, ref_outs, prompts) -> dict:
    """Prompts whose speculative tokens differ from the target-only ones, and the first differing
    new-token index of each."""
    diverged, first = 0, []
    for s, r, p in zip(spec_outs, ref_outs, prompts):
        diff = (s != r).nonzero()
        if diff.numel():
            diverged += 1
            first.append(int(diff[0, 0]) - len(p))
    return {"diverged_prompts": diverged, "prompts": len(prompts), "first_divergence_token": first}
