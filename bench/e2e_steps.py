"""Step-interleaved timing for ``verispec bench e2e`` (``--interleave step``, the default).

On a shared 2-core machine the speed drifts by 10-40% within seconds (the same target forward,
timed in 14-second windows one after the other, took 100, 119 and 140 ms by median). Run one
prompt through path after path and every path sees a different stretch of that drift; the
comparison of k=auto with fixed k (a 3% criterion) then measures the machine. Here every
verispec path of a prompt decodes at once, one step of each in turn (each path on its own fork
of the models: same weights, its own KV cache), so within any second or two every path runs;
a path's time is the sum of its own steps' times. Transformers' generate() cannot be stepped
and runs whole, before or after the group.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

# a stepper: begin(i, prompt) -> iterator of {input row: [new tokens]} per step;
#            end(i, prompt, new_tokens, step_seconds) -> (output [L + N], prompt row, stats or None)
Stepper = tuple[Callable[[int, torch.Tensor], Iterator[dict]], Callable]


def run_steps(i: int, prompt, steppers: dict[int, Stepper], sync: Callable[[], None]) -> dict[int, tuple]:
    """Decode ``prompt`` on every stepper at once, one step of each in turn (the turn order rotated
    by one each round); return ``end(...)`` of each, by key."""
    live = {j: begin(i, prompt) for j, (begin, _) in steppers.items()}
    seconds = {j: [] for j in steppers}
    tokens = {j: [] for j in steppers}
    done, rnd = {}, 0
    while live:
        keys = list(live)
        for j in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:
            t = time.perf_counter()
            try:
                step = next(live[j])
            except StopIteration:
                step = None
            sync()
            seconds[j].append(time.perf_counter() - t)
            if step is None:
                del live[j]
                done[j] = steppers[j][1](i, prompt, tokens[j], seconds[j])
            else:
                for row_tokens in step.values():
                    tokens[j].extend(row_tokens)
        rnd += 1
    return done


def target_only_stepper(model, new_tokens: int, temperature: float, seed: int, row, coupled: bool = False) -> Stepper:
    """Target-only decoding by ``model.stream`` (``row(prompt_tokens, new, wall, prefill_s, decode_s)``
    makes the per-prompt record; ``coupled``: race sampling on the coupled acceptor's noise)."""
    def begin(i, p):
        return model.stream(p[None], len(p) + new_tokens, temperature=temperature, seed=seed + i, coupled=coupled)

    def end(i, p, toks, secs):
        prefill = model.last_stats["prefill_s"]
        return _output(p, toks), row(len(p), len(toks), sum(secs), prefill, sum(secs) - prefill), None

    return begin, end


def speculative_stepper(gen, new_tokens: int, temperature: float, seed: int, row) -> Stepper:
    """Speculative decoding by ``gen.stream`` (a SpeculativeGenerator: chains or token trees); a
    k-policy calibration run inside the call is in its steps' time. Each prompt row also gets
    ``verify_passes_by_tokens`` (see :func:`counted_stream`)."""
    counts = {}

    def begin(i, p):
        counts[i] = {}
        stream = gen.stream(p[None], len(p) + new_tokens, temperature=temperature, seed=seed + i)
        return (s.per_row() for s in counted_stream(gen, stream, counts[i]))

    def end(i, p, toks, secs):
        s = gen.last_stats
        r = row(len(p), len(toks), sum(secs), s.prefill_s, sum(secs) - s.prefill_s)
        r.update(calibration_s=s.calibration_s, acceptance_rate=s.acceptance_rate, k_counts=dict(s.k_counts),
                 verify_passes_by_tokens=dict(sorted(counts.pop(i).items())))
        return _output(p, toks), r, s

    return begin, end


def counted_stream(gen, stream, counts: dict):
    """``stream`` (of ``gen``) unchanged, counting its verify passes by tokens verified into
    ``counts``: after each step, the key of ``gen.last_stats.target_s_by_k`` whose seconds grew
    (chains key it by k = drafts + 1, tree passes by nodes + 1, while ``k_counts`` keys a tree pass
    by depth + 1, so the passes per verify size are counted here)."""
    before: dict = {}
    for step in stream:
        now = gen.last_stats.target_s_by_k
        for key, seconds in now.items():
            if seconds != before.get(key, 0.0):
                counts[key] = counts.get(key, 0) + 1
        before = dict(now)
        yield step


def fork(model):
    """The model's fork (own KV cache, same weights); a draft that is not a model ('ngram',
    'self:N') is returned as is."""
    return model.fork() if hasattr(model, "fork") else model


def _output(prompt: torch.Tensor, toks: list[int]) -> torch.Tensor:
    return torch.cat([prompt, torch.tensor(toks, dtype=torch.long)])
