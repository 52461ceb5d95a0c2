"""SpeculativeGenerator: the draft/verify/accept/commit loop, vectorised over rows.

Invariant per active row (n = lengths[b] committed tokens, prompt included): the target's
cache holds slots 0 .. n-2, and the last committed token tokens[b, n-1] is not yet in it.
One step with g = k - 1 drafts:

    draft proposes d_1..d_g (sampled from q, kept)            draft.propose
    target forward over [last, d_1..d_g] at slots n-1..n-1+g   -> p at k positions
    acceptor -> a accepted drafts + 1 recovered/bonus token   rows differ in a
    commit a + 1 tokens; n += a + 1                           slot n-2 (new) is cached: the
                                                              verify pass wrote it
Rejected drafts leave stale K/V past the new n-2; the next verify pass overwrites them
(position-indexed caches, no rollback). The first token after the prompt is drawn by the
acceptor from the prefill's p with g = 0, so it is sampled exactly like every other token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..model.prompts import normalize_prompts, validate_eos
from ..model.sampling import SamplingParams, greedy_ids, logits_to_probs
from .acceptors import DefaultTokenAcceptor, GreedyTokenAcceptor, accept_by_ids, acceptor_name, is_lossless
from .rejection import rejection_sample
from .policy import as_policy, check_k_fits, validate_k
from .randomness import SpeculativeRandomness
from .resolve import make_acceptor, make_draft
from .stats import SpecStats

log = logging.getLogger("verispec.spec")


@dataclass
class StepTokens:
    """Tokens committed in one step: row ``rows[i]`` (index into the input batch) got
    ``tokens[i, :counts[i]]``."""

    rows: torch.Tensor  # [b] int64
    tokens: torch.Tensor  # [b, m] int64, -1 past counts
    counts: torch.Tensor  # [b] int64

    def per_row(self) -> dict[int, list[int]]:
        return {int(r): t[: int(c)].tolist() for r, t, c in zip(self.rows, self.tokens, self.counts)}


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, sequence_length]
    stats: SpecStats


def prepare_prompts(input_ids, vocab_size: int, batch_size: int, sequence_length: int, n_positions: int):
    """Validate prompts -> (prompts for prefill, padded [B, L_max] int64, lengths [B] int64).

    A [B, L] tensor (every row a full prompt) is checked with tensor ops and handed to prefill
    as is, so 10^5 identical toy prompts cost no per-row Python; a list may be ragged.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and len(input_ids) > 1:
        normalize_prompts(input_ids[:1], vocab_size, batch_size, sequence_length, n_positions)  # shape/dtype/length
        if len(input_ids) > batch_size:
            raise ValueError(f"batch of {len(input_ids)} prompts exceeds batch_size={batch_size} of the models")
        ids = input_ids.detach().to("cpu", torch.long)
        bad = ((ids < 0) | (ids >= vocab_size)).any(1).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(f"prompt {b} holds a token id outside the vocabulary [0, {vocab_size})")
        return ids, ids, torch.full((len(ids),), ids.shape[1], dtype=torch.long)
    prompts = normalize_prompts(input_ids, vocab_size, batch_size, sequence_length, n_positions)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    return prompts, padded, lengths


class SpeculativeGenerator:
    """Exact speculative sampling: ``draft`` proposes k-1 tokens, ``target`` scores k in one pass.

    draft: a model with the model interface (LlamaForSampling, toy models), ``"ngram"``,
    ``"self:N"``, or a draft provider object (see ``verispec.spec.drafts``).
    k: int >= 1, or a k-policy object (``next_k()``, ``observe()``, ``max_k``).
    acceptor: None (DefaultTokenAcceptor, exact), a name, or any callable with the acceptor
    protocol (see ``verispec.spec.acceptors``).
    measure_decode_step: time a one-token target forward at the start of each run (two
    repeats, the faster kept; the slot it writes is rewritten by the first verify pass) as the
    baseline of the measured speedup.
    """

    def __init__(self, draft, target, k, acceptor=None, measure_decode_step: bool = True):
        for attr in ("forward", "prefill", "keep_rows", "vocab_size", "batch_size", "n_positions"):
            if not hasattr(target, attr):
                raise TypeError(f"target {type(target).__name__} lacks {attr!r} of the model interface")
        self.target = target
        self.policy = as_policy(k)
        if draft is None:
            if self.policy.max_k != 1:
                raise ValueError("a draft is needed for k > 1 (a model, 'ngram', 'self:N' or a provider)")
        self.draft = make_draft("ngram" if draft is None else draft, target)  # k = 1 never asks for proposals
        if draft is None:
            self.draft.name = "none"
        if hasattr(self.draft, "bind"):
            self.draft.bind(target)
        self.acceptor = make_acceptor(acceptor, target)
        self.n_positions = min(target.n_positions, getattr(self.draft, "n_positions", target.n_positions))
        self.batch_size = min(target.batch_size, getattr(self.draft, "batch_size", target.batch_size))
        check_k_fits(self.policy.max_k, self.n_positions)
        # a k-policy with a drafting gate (k = "auto") may stop a pass's drafting early, where the draft can
        self._gate = getattr(self.policy, "keep_drafting", None) if getattr(self.draft, "can_stop_early", False) else None
        if hasattr(self.policy, "set_gated"):
            self.policy.set_gated(self._gate is not None)
        # a coupled acceptor (coupled.py) hands its positional noise to drafts that can sample with it
        self._couple_draft = bool(getattr(self.acceptor, "coupled", False) and getattr(self.draft, "can_couple", False))
        if getattr(self.acceptor, "coupled", False) and not self._couple_draft and not getattr(self.draft, "deterministic", False):
            log.info("draft %s cannot sample with the coupled noise: still exact, but it will match less often",
                     getattr(self.draft, "name", type(self.draft).__name__))
        # At temperature 0 the stock acceptors' decision is a comparison of ids: rejection sampling
        # of a one-hot q against a one-hot p accepts draft i iff it is the target's argmax and then
        # emits the argmax (so does GreedyTokenAcceptor). Those passes skip the [B, k, V]
        # distributions and the acceptor's random numbers (a [B, V] race draw); a user's acceptor,
        # or a DefaultTokenAcceptor with a backend's or user's kernel, is still called.
        self._greedy_ids_accept = type(self.acceptor) is GreedyTokenAcceptor or (
            type(self.acceptor) is DefaultTokenAcceptor and self.acceptor.kernel is rejection_sample)
        self.measure_decode_step = measure_decode_step
        self.device = torch.device(getattr(target, "device", "cpu"))
        self.last_stats: SpecStats | None = None

    # ---- public API -----------------------------------------------------------------------------

    def sample(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> torch.Tensor:
        """-> [B, sequence_length] int64, prompts included; rows ended by EOS are EOS-filled."""
        return self.generate(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id).tokens

    def generate(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> GenerationResult:
        from ..kernels.cpu.fused import hold_plans

        run = self._run(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id)
        with hold_plans():  # only the loop's own components run between the forwards
            for _ in run:
                pass
        return GenerationResult(self._out, self.last_stats)

    def stream(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> Iterator[StepTokens]:
        """Yield the tokens committed at each step (the first: one token per row from the prefill)."""
        yield from self._run(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id)

    # ---- the loop -------------------------------------------------------------------------------

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _run(self, input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id):
        params = SamplingParams(temperature, top_k, top_p)
        exact_here = is_lossless(self.acceptor) or (params.greedy and getattr(self.acceptor, "exact_when_greedy", False))
        if is_lossless(self.acceptor) is False and not exact_here:
            log.warning("acceptor %s is LOSSY: its output is not distributed as target-only sampling",
                        acceptor_name(self.acceptor))
        V = self.target.vocab_size
        prompts, padded, lengths = prepare_prompts(input_ids, V, self.batch_size, sequence_length, self.n_positions)
        eos = validate_eos(eos_token_id, V)
        self._eos = torch.tensor(sorted(eos), dtype=torch.long)
        self._seq_len = sequence_length
        rng = SpeculativeRandomness(seed, self.device, vocab_size=V, noise_slots=self.policy.max_k + 1)
        B = len(lengths)
        self._tokens = torch.zeros(B, sequence_length + self.policy.max_k + 1, dtype=torch.long)  # [B, W]
        self._tokens[:, : padded.shape[1]] = padded
        self._lengths = lengths  # [B]
        self._rows = torch.arange(B)  # [B] input row of each active row
        self._out = torch.empty(B, sequence_length, dtype=torch.long)
        stats = self.last_stats = SpecStats(acceptor=acceptor_name(self.acceptor), lossless=is_lossless(self.acceptor),
                                            policy=repr(self.policy),
                                            draft=getattr(self.draft, "name", type(self.draft).__name__), rows=B)
        self._stats = stats
        if hasattr(self.policy, "begin_sequence"):  # optional hook of the k-policy protocol
            self.policy.begin_sequence()

        t0 = time.perf_counter()
        if hasattr(self.target, "reset"):
            self.target.reset()
        logits = self.target.prefill(prompts)  # [B, V]
        if hasattr(self.draft, "prefill"):
            self.draft.prefill(prompts)
        self._sync_device()
        stats.prefill_s = time.perf_counter() - t0

        t_loop = time.perf_counter()
        probe_s = 0.0
        done = self._lengths >= sequence_length  # prompts that already fill the sequence
        logits = self._finish_rows(done, logits)
        by_ids = params.greedy and self._greedy_ids_accept  # decisions from the target's argmax ids alone
        if self._lengths.numel():
            empty_ids = torch.zeros(len(logits), 0, dtype=torch.long, device=self.device)
            rng.acceptor.at(self._rows, self._lengths)
            if by_ids:
                accepted, new = self._accept_ids(empty_ids, greedy_ids(logits, "target model")[:, None])
            else:
                target_probs = logits_to_probs(logits, params, "target model")[:, None]  # [B, 1, V]
                empty_q = torch.zeros(len(logits), 0, V, device=self.device)
                accepted, new = self._accept(empty_ids, empty_q, target_probs, rng)
            yield self._commit(accepted, new)
        while self._lengths.numel():
            if self.measure_decode_step and stats.decode_step_s is None:
                probe_s += self._probe_decode_step()
            if hasattr(self.policy, "needs_calibration") and self.policy.needs_calibration(B):
                probe_s += self._calibrate_policy(B)
            k = self.policy.next_k()
            if hasattr(self.target, "sync_tokens"):  # tensor-parallel ranks take rank 0's k (timings differ)
                k = int(self.target.sync_tokens(torch.tensor([[k]], dtype=torch.long))[0, 0])
            validate_k(k)
            if k > self.policy.max_k:
                raise ValueError(f"k-policy returned k={k} above its max_k={self.policy.max_k}")
            n_min, n_max = int(self._lengths.min()), int(self._lengths.max())
            # no row can use drafts past sequence_length, and the verify block must fit the cache
            g = min(k - 1, sequence_length - 1 - n_min, self.n_positions - n_max)
            rows = self._lengths.shape[0]

            t_a = time.perf_counter()
            rng.acceptor.at(self._rows, self._lengths)
            extra = {"keep": self._gate} if self._gate is not None and g else {}
            if self._couple_draft and g:  # the draft samples with the coupled acceptor's noise
                extra["noise"] = lambda i: rng.acceptor.positional_exponentials(1, offset=i)[:, 0]  # [B, V]
            draft_ids, draft_probs = self.draft.propose(self._tokens, self._lengths, g, params,
                                                        rng.draft_uniforms(rows, g), **extra)
            if "keep" in extra and 1 <= draft_ids.shape[-1] < g:  # the gate stopped drafting early
                g = draft_ids.shape[-1]
            self._check_proposal(draft_ids, draft_probs, rows, g, V)
            self._sync_device()
            t_b = time.perf_counter()
            last = self._tokens.gather(1, (self._lengths - 1)[:, None])  # [B, 1]
            verify_ids = torch.cat([last, draft_ids.cpu()], 1)  # [B, g + 1]
            logits = self.target.forward(verify_ids, self._lengths - 1)  # [B, g + 1, V]
            if by_ids:
                choice = greedy_ids(logits, "target model")  # [B, g + 1]
            else:
                target_probs = logits_to_probs(logits, params, "target model")
            self._sync_device()
            t_c = time.perf_counter()
            if by_ids:
                accepted, new = self._accept_ids(draft_ids.to(self.device), choice)
            else:
                accepted, new = self._accept(draft_ids.to(self.device), draft_probs.to(self.device), target_probs, rng)
            t_d = time.perf_counter()
            stats.draft_s += t_b - t_a
            stats.target_s += t_c - t_b
            stats.target_s_by_k[g + 1] = stats.target_s_by_k.get(g + 1, 0.0) + (t_c - t_b)
            stats.accept_s += t_d - t_c
            stats.record(g + 1, accepted)
            self.policy.observe(g + 1, accepted, t_b - t_a, t_c - t_b)
            yield self._commit(accepted, new)
        stats.decode_s = time.perf_counter() - t_loop - probe_s

    def _probe_decode_step(self) -> float:
        """Time a one-token target forward (plain decode) at the current batch; return seconds spent."""
        last = self._tokens.gather(1, (self._lengths - 1)[:, None])  # [B, 1]
        times = []
        for _ in range(2):  # the first call may include one-off warm-up work
            self._sync_device()
            t = time.perf_counter()
            self.target.forward(last, self._lengths - 1)  # writes slot n-1, which the verify rewrites
            self._sync_device()
            times.append(time.perf_counter() - t)
        self._stats.decode_step_s = min(times)
        return sum(times)

    def _calibrate_policy(self, batch: int) -> float:
        """Let the k-policy time a target forward of each k it may choose (the slots written are
        rewritten by the next verify pass, as in the decode probe); return seconds spent."""
        t0 = time.perf_counter()
        last = self._tokens.gather(1, (self._lengths - 1)[:, None])  # [B, 1]
        room = self.n_positions - int(self._lengths.max()) + 1  # largest k whose slots fit the cache

        def time_verify(k: int) -> float:
            self._sync_device()
            t = time.perf_counter()
            self.target.forward(last.expand(-1, k), self._lengths - 1)
            self._sync_device()
            return time.perf_counter() - t

        self.policy.calibrate(time_verify, batch, largest_k=room)
        spent = time.perf_counter() - t0
        self._stats.calibration_s += spent
        return spent

    def _accept(self, draft_ids, draft_probs, target_probs, rng):
        B, g = draft_ids.shape
        accepted, new = self.acceptor(draft_ids, draft_probs, target_probs, rng.acceptor)
        self._check_acceptor_output(accepted, new, draft_ids, B, g, target_probs.shape[-1])
        return self._adopt(accepted, new)

    def _accept_ids(self, draft_ids, choice):
        """Greedy decisions from the target's argmax ``choice`` [B, g + 1] (see ``_greedy_ids_accept``)."""
        return self._adopt(*accept_by_ids(draft_ids, choice))

    def _adopt(self, accepted, new):
        accepted, new = accepted.long().cpu(), new.long().cpu()
        if hasattr(self.target, "sync_tokens"):  # tensor-parallel ranks adopt rank 0's decisions
            both = self.target.sync_tokens(torch.cat([accepted[:, None], new], 1))
            accepted, new = both[:, 0], both[:, 1:]
        return accepted, new

    def _commit(self, accepted: torch.Tensor, new: torch.Tensor) -> StepTokens:
        """Append accepted drafts + the emitted token per row, cut at EOS and sequence_length."""
        m = new.shape[1]
        ar = torch.arange(m)
        count = torch.minimum(accepted + 1, self._seq_len - self._lengths)  # [B]
        within = ar[None] < count[:, None]  # [B, m]
        hit = torch.zeros_like(count, dtype=torch.bool)
        if self._eos.numel():
            is_eos = within & torch.isin(new, self._eos)
            hit = is_eos.any(1)
            count = torch.where(hit, is_eos.long().argmax(1) + 1, count)  # keep up to the first EOS
            within = ar[None] < count[:, None]
        idx = self._lengths[:, None] + ar  # [B, m] slots of the new tokens
        committed = torch.where(within, new, -1)
        self._tokens.scatter_(1, idx, torch.where(within, new, self._tokens.gather(1, idx)))
        step = StepTokens(self._rows.clone(), committed, count)
        self._lengths = self._lengths + count
        self._stats.new_tokens += int(count.sum())
        if hasattr(self.draft, "commit"):
            self.draft.commit(accepted, self._lengths)
        self._finish_rows(hit | (self._lengths >= self._seq_len))
        return step

    def _finish_rows(self, done: torch.Tensor, logits: torch.Tensor | None = None):
        """Write finished rows to the output (EOS-filled past their end) and drop them from the
        batch: the models compact their caches, so a finished row costs nothing more."""
        if not bool(done.any()):
            return logits
        L = self._seq_len
        seq = self._tokens[done, :L]  # [d, L]
        n = self._lengths[done]
        fill = self._tokens[done].gather(1, (n - 1)[:, None])  # the EOS that ended the row
        self._out[self._rows[done]] = torch.where(torch.arange(L)[None] >= n[:, None], fill, seq)
        keep = (~done).nonzero()[:, 0]
        if keep.numel():
            rows = keep.tolist()
            self.target.keep_rows(rows)
            if hasattr(self.draft, "keep_rows"):
                self.draft.keep_rows(rows)
        self._tokens, self._lengths, self._rows = self._tokens[keep], self._lengths[keep], self._rows[keep]
        return None if logits is None else logits[keep.to(logits.device)]

    # ---- checks on pluggable parts ----------------------------------------------------------------

    @staticmethod
    def _check_proposal(draft_ids, draft_probs, B: int, g: int, V: int) -> None:
        if tuple(draft_ids.shape) != (B, g) or tuple(draft_probs.shape) != (B, g, V):
            raise ValueError(
                f"draft provider returned draft_ids {tuple(draft_ids.shape)} and draft_probs {tuple(draft_probs.shape)}; "
                f"expected [{B}, {g}] and [{B}, {g}, {V}]"
            )
        if g and (int(draft_ids.min()) < 0 or int(draft_ids.max()) >= V):
            raise ValueError(f"draft provider proposed a token id outside [0, {V})")
        if g and torch.isnan(draft_probs).any():
            raise FloatingPointError("draft provider returned NaN draft probabilities")

    @staticmethod
    def _check_acceptor_output(accepted, new, draft_ids, B: int, g: int, V: int) -> None:
        if tuple(accepted.shape) != (B,) or tuple(new.shape) != (B, g + 1):
            raise ValueError(
                f"acceptor returned accepted {tuple(accepted.shape)} and tokens {tuple(new.shape)}; "
                f"expected [{B}] and [{B}, {g + 1}]"
            )
        if accepted.dtype.is_floating_point or new.dtype.is_floating_point:
            raise TypeError("acceptor must return integer tensors")
        if int(accepted.min()) < 0 or int(accepted.max()) > g:
            raise ValueError(f"acceptor returned an accepted count outside 0..{g}")
        a = accepted.long()
        emitted = new.gather(1, a[:, None])[:, 0]
        if int(emitted.min()) < 0 or int(emitted.max()) >= V:
            raise ValueError(f"acceptor emitted a token id outside [0, {V})")
        kept = torch.arange(g, device=new.device)[None] < a[:, None]  # [B, g]
        if g and bool((kept & (new[:, :g] != draft_ids.to(new.device))).any()):
            raise ValueError("acceptor changed an accepted draft: tokens[b, :accepted[b]] must equal the drafts")
