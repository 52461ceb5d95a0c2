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

from ..model.prompts import prepare_prompts, validate_eos
from ..model.sampling import SamplingParams, greedy_ids, logits_to_probs
from .drafts import NoDraft
from .policy import check_k_fits, default_k, validate_k
from .protocols import AcceptorBase, TreeDraft, check_acceptor_output, check_proposal
from .randomness import SpeculativeRandomness
from .resolve import as_target, make_acceptor, make_draft, make_policy
from .stats import SpecStats
from .tree_step import TreeSteps, resolve_tree

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


SMALL_COMMIT = 64  # a step's [B, m] tokens up to which _commit decides on host lists


class _Clock:
    """Stage timer of one run: ``lap(field)`` -> seconds since the previous lap (or ``start``),
    measured after the device's queued work, and added to ``stats.<field>`` when one is named."""

    def __init__(self, stats: SpecStats, device: torch.device):
        self.stats = stats
        self._cuda = device if device.type == "cuda" else None
        self._t = time.perf_counter()

    def start(self) -> None:
        self.lap()

    def lap(self, field: str | None = None) -> float:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        now = time.perf_counter()
        seconds, self._t = now - self._t, now
        if field is not None:
            setattr(self.stats, field, getattr(self.stats, field) + seconds)
        return seconds


class SpeculativeGenerator(TreeSteps):
    """Exact speculative sampling: ``draft`` proposes k-1 tokens, ``target`` scores k in one pass.

    draft: a model with the model interface (LlamaForSampling, toy models), ``"ngram"``,
    ``"self:N"``, a draft provider object (``verispec.spec.protocols.Draft``), or None (k = 1:
    target-only decoding).
    k: int >= 1, ``"auto"`` / ``"auto:MAX"``, or a k-policy object (``protocols.KPolicy``); None:
    the target's ``enable_speculative_decoder(k)`` (``policy.default_k``).
    acceptor: None (DefaultTokenAcceptor, exact), a name, or any callable with the acceptor
    protocol (``protocols.Acceptor``).
    measure_decode_step: time a one-token target forward at the start of each run (two
    repeats, the faster kept; the slot it writes is rewritten by the first verify pass) as the
    baseline of the measured speedup.
    tree: token trees (tree_step.py): a branching list ``[b1, .., bd]`` (b_i children per node at
    depth i; k may be omitted: d + 1), ``"dynamic:N"`` (N nodes grown where the draft is likeliest,
    depth k - 1), a ``TreeSpec``, or ``"auto"`` (with k = "auto[:MAX]" or an AdaptiveTree: each step
    a chain length or a tree, tree_policy.py); ``acceptor`` is then a tree acceptor (tree.py: "multistep",
    the default, "recursive", "traversal", "greedy", or a callable) and ``children`` how siblings
    are drawn ("sample", "distinct", "top"). Combinations that are not exact are refused.
    """

    def __init__(self, draft, target, k=None, acceptor=None, measure_decode_step: bool = True, tree=None,
                 children: str = "sample"):
        self.target = as_target(target)
        self._tree = self._tree_acceptor = None
        if tree is not None:
            k = self._tree_k(tree, k)
            self._tree, self._tree_acceptor = resolve_tree(tree, children, acceptor, getattr(k, "max_k", k))
            self._children, acceptor = children, None  # passes without drafts take the default acceptor
        self.policy = make_policy(default_k(self.target.speculation_lengths) if k is None else k)
        if draft is None and self.policy.max_k != 1:
            raise ValueError("a draft is needed for k > 1 (a model, 'ngram', 'self:N' or a provider)")
        self.draft = NoDraft() if draft is None else make_draft(draft, target)
        self.draft.bind(target)  # the model itself: a layer-skip draft runs its layers, a model draft must not be it
        if self._tree is not None and not (isinstance(self.draft, TreeDraft) and self.draft.can_draft_trees):
            raise TypeError(f"draft {self.draft.name!r} cannot draft token trees (it proposes one chain): use a draft "
                            "model, 'self:N', or a provider with propose_tree")
        self.acceptor = make_acceptor(acceptor, self.target)
        # tree="auto": the chains it picks run through the chain step (drafted a token a forward, not
        # level by level as trees are) under the tree acceptor's own rule on a chain
        twin = self._tree_acceptor.chain_acceptor if tree == "auto" else None
        self._auto_chain = None if twin is None else make_acceptor(twin, self.target)
        self.n_positions = _limit(self.target.n_positions, self.draft.n_positions)
        self.batch_size = _limit(self.target.batch_size, self.draft.batch_size)
        check_k_fits(self.policy.max_k, self.n_positions)
        # a k-policy with a drafting gate (k = "auto") may stop a pass's drafting early, where the draft can
        self._gate = self.policy.keep_drafting if self.draft.can_stop_early else None
        self.policy.set_gated(self._gate is not None)
        # a coupled acceptor (coupled.py) hands its positional noise to drafts that can sample with it
        self._couple_draft = bool(self.acceptor.coupled and self.draft.can_couple)
        if self.acceptor.coupled and not self._couple_draft and not self.draft.deterministic:
            log.info("draft %s cannot sample with the coupled noise: still exact, but it will match less often",
                     self.draft.name)
        # at temperature 0 the acceptors that say so decide from the target's argmax ids alone; the
        # library's own id rule (the base's accept_greedy) needs no output check, an acceptor's own does
        self._greedy_ids_accept = bool(self.acceptor.accepts_greedy_ids)
        self._check_ids = type(self.acceptor).accept_greedy is not AcceptorBase.accept_greedy
        kernels = self.target.kernels
        self._argmax = None if kernels is None else kernels.get("argmax")  # the backend's, if it has one
        self.measure_decode_step = measure_decode_step
        self.device = torch.device(self.target.device)
        self.last_stats: SpecStats | None = None

    # ---- public API -----------------------------------------------------------------------------

    def sample(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> torch.Tensor:
        """-> [B, sequence_length] int64, prompts included; rows ended by EOS are EOS-filled."""
        return self.generate(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id).tokens

    def generate(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> GenerationResult:
        for _ in self._run(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id):
            pass
        return GenerationResult(self._out, self.last_stats)

    def stream(self, input_ids, sequence_length: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id=None) -> Iterator[StepTokens]:
        """Yield the tokens committed at each step (the first: one token per row from the prefill)."""
        yield from self._run(input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id)

    # ---- the loop: prefill, then step() until every row is done ---------------------------------

    @torch.inference_mode()
    def _run(self, input_ids, sequence_length, temperature, top_k, top_p, seed, eos_token_id):
        prompts = self._begin(input_ids, sequence_length, SamplingParams(temperature, top_k, top_p), seed, eos_token_id)
        logits = self._prefill(prompts)  # [B, V] at the last prompt token of each row still active
        t_loop, self._aside_s = time.perf_counter(), 0.0
        if self._lengths.numel():
            yield self._first_token(logits)
        while self._lengths.numel():
            self._measure_costs()
            yield self.step()
        self._stats.decode_s = time.perf_counter() - t_loop - self._aside_s

    def step(self) -> StepTokens:
        """One speculative step of every active row: k -> propose -> verify -> accept -> commit (a
        token tree's step: tree_step.py)."""
        return self._tree_step() if self._tree is not None else self._chain_step(self._next_k())

    def _chain_step(self, k: int, acceptor=None) -> StepTokens:
        clock, stats, n = self._clock, self._stats, self._lengths  # n [B]: committed tokens, prompt included
        # no row can use drafts past sequence_length, and the verify block must fit the cache
        g = min(k - 1, self._seq_len - 1 - int(n.min()), self.n_positions - int(n.max()))
        clock.start()

        # propose: g drafts per row, and q, the law each was sampled from (a drafting gate may stop early)
        self._rng.acceptor.at(self._rows, n)
        draft_ids, draft_probs = self._propose(g)  # [B, g], [B, g, V]
        g = draft_ids.shape[1]
        draft_s = clock.lap("draft_s")

        # verify: the target scores [last committed token, d_1 .. d_g] at slots n-1 .. n-1+g in one forward
        last = self._tokens.gather(1, (n - 1)[:, None])  # [B, 1]
        logits = self.target.forward(torch.cat([last, draft_ids.cpu()], 1) if g else last, n - 1)  # [B, g + 1, V]
        target_out = self._target_side(logits)  # p [B, g + 1, V], or its argmax ids [B, g + 1]
        target_s = clock.lap("target_s")
        stats.target_s_by_k[g + 1] = stats.target_s_by_k.get(g + 1, 0.0) + target_s

        # accept: a accepted drafts, then one recovered or bonus token, per row
        accepted, new = self._accept(draft_ids, draft_probs, target_out, acceptor)  # [B], [B, g + 1]
        clock.lap("accept_s")

        # commit a + 1 tokens per row (cut at EOS and sequence_length); report the step
        stats.record(g + 1, accepted)
        if acceptor is not None and g:  # a chain tree="auto" chose: its policy learns it as that chain tree
            self._observe_auto_chain(g, accepted, draft_s, target_s)
        else:
            self.policy.observe(g + 1, accepted, draft_s, target_s)
        return self._commit(accepted, new)

    def _begin(self, input_ids, sequence_length, params: SamplingParams, seed, eos_token_id):
        """Check a run's inputs and set up its state (every row active); -> the prompts to prefill."""
        if self._tree_acceptor is not None:
            self._check_tree_acceptor(params)
        elif self.acceptor.lossless is False and not (params.greedy and self.acceptor.exact_when_greedy):
            log.warning("acceptor %s is LOSSY: its output is not distributed as target-only sampling",
                        self.acceptor.name)
        V = self.target.vocab_size
        prompts, padded, lengths = prepare_prompts(input_ids, V, self.batch_size, sequence_length, self.n_positions)
        self._eos_set = set(validate_eos(eos_token_id, V))
        self._eos = torch.tensor(sorted(self._eos_set), dtype=torch.long)
        self._params, self._seq_len = params, sequence_length
        self._by_ids = params.greedy and self._greedy_ids_accept  # the acceptor decides from argmax ids
        if self._tree_acceptor is not None:  # (passes without drafts decide from ids at temperature 0 too)
            self._by_ids = params.greedy and bool(self._tree_acceptor.accepts_greedy_ids)
        self._rng = SpeculativeRandomness(seed, self.device, vocab_size=V, noise_slots=self.policy.max_k + 1)
        B = len(lengths)
        self._tokens = torch.zeros(B, sequence_length + self.policy.max_k + 1, dtype=torch.long)  # [B, W]
        self._tokens[:, : padded.shape[1]] = padded
        self._lengths = lengths  # [B]
        self._rows = torch.arange(B)  # [B] input row of each active row
        self._out = torch.empty(B, sequence_length, dtype=torch.long)
        acc = self.acceptor if self._tree_acceptor is None else self._tree_acceptor
        self._stats = self.last_stats = SpecStats(acceptor=acc.name, lossless=acc.lossless, policy=repr(self.policy),
                                                  draft=self.draft.name, rows=B,
                                                  tree="" if self._tree is None else str(self._tree))
        self._clock = _Clock(self._stats, self.device)
        # ranks agree on k and on the decisions only inside a torch.distributed job (tensor parallelism)
        self._parallel = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._empty = None  # [B, 0] drafts and [B, 0, V] q of a pass without drafts, per batch size
        self.policy.begin_sequence()
        return prompts

    def _prefill(self, prompts) -> torch.Tensor:
        """Fill both caches from slot 0; rows whose prompt fills the sequence already finish here.
        -> logits [B, V] at the last prompt token of each row still active."""
        self._clock.start()
        self.target.reset()
        logits = self.target.prefill(prompts)  # [B, V]
        self.draft.prefill(prompts)
        self._stats.prefill_s = self._clock.lap()
        return self._finish_rows(self._lengths >= self._seq_len, logits)

    def _first_token(self, logits: torch.Tensor) -> StepTokens:
        """The first token after each prompt: the acceptor on the prefill's p with no drafts (g = 0),
        so it is sampled exactly like every other token (docs/exactness.md pitfall 6)."""
        self._rng.acceptor.at(self._rows, self._lengths)
        accepted, new = self._accept(*self._no_drafts(), self._target_side(logits[:, None]))
        return self._commit(accepted, new)

    def _measure_costs(self) -> None:
        """Before a step: the one-token decode probe (once per run) and the k-policy's calibration
        (when it asks); their time is kept out of decode_s."""
        if self.measure_decode_step and self._stats.decode_step_s is None:
            self._aside_s += self._probe_decode_step()
        if self.policy.needs_calibration(self._stats.rows):
            self._aside_s += self._calibrate_policy(self._stats.rows)

    def _next_k(self) -> int:
        """The k-policy's k for this step, checked; rank 0's under tensor parallelism (timings differ)."""
        k = self.policy.next_k()
        validate_k(k)
        if k > self.policy.max_k:
            raise ValueError(f"k-policy returned k={k} above its max_k={self.policy.max_k}")
        if not self._parallel:
            return k
        return int(self.target.sync_tokens(torch.tensor([[k]], dtype=torch.long))[0, 0])

    def _no_drafts(self) -> tuple[torch.Tensor, torch.Tensor]:  # [B, 0] int64, [B, 0, V] fp32
        B = len(self._lengths)
        if self._empty is None or len(self._empty[0]) != B:  # (made once per batch size: this runs every k = 1 step)
            self._empty = (torch.zeros(B, 0, dtype=torch.long, device=self.device),
                           torch.zeros(B, 0, self.target.vocab_size, device=self.device))
        return self._empty

    def _propose(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """g drafts per row [B, g] and the law each was sampled from [B, g, V], checked; fewer than g
        if a drafting gate stopped the pass. The draft is not asked for none (k = 1)."""
        if g == 0:
            return self._no_drafts()
        B, V = len(self._lengths), self.target.vocab_size
        extra = {} if self._gate is None else {"keep": self._gate}
        if self._couple_draft:  # the draft samples with the coupled acceptor's noise
            noise = self._rng.acceptor
            extra["noise"] = lambda i: noise.positional_exponentials(1, offset=i)[:, 0]  # [B, V]
        draft_ids, draft_probs = self.draft.propose(self._tokens, self._lengths, g, self._params,
                                                    self._rng.draft_uniforms(B, g), **extra)
        if self._gate is not None and 1 <= draft_ids.shape[-1] < g:  # the gate stopped drafting early
            g = draft_ids.shape[-1]
        check_proposal(draft_ids, draft_probs, B, g, V)
        return draft_ids, draft_probs

    def _target_side(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, m, V] logits -> p [B, m, V] fp32 after the sampling parameters, or, when the acceptor
        decides from ids (temperature 0), the argmax ids [B, m]."""
        if self._by_ids:
            return greedy_ids(logits, "target model", self._argmax)
        return logits_to_probs(logits, self._params, "target model", self._argmax)

    def _accept(self, draft_ids, draft_probs, target_out, acceptor=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The acceptor's (default: the generator's) decisions (accepted [B], tokens [B, g + 1]) on
        the CPU, checked, and the same on every tensor-parallel rank (rank 0's)."""
        draft_ids = draft_ids.to(self.device)
        B, g = draft_ids.shape
        acc = self.acceptor if acceptor is None else acceptor
        if self._by_ids:
            accepted, new = acc.accept_greedy(draft_ids, target_out)
        else:
            accepted, new = acc(draft_ids, draft_probs.to(self.device), target_out, self._rng.acceptor)
        if self._check_ids or not self._by_ids:
            check_acceptor_output(accepted, new, draft_ids, B, g, self.target.vocab_size)
        accepted, new = accepted.long().cpu(), new.long().cpu()
        if not self._parallel:
            return accepted, new
        both = self.target.sync_tokens(torch.cat([accepted[:, None], new], 1))
        return both[:, 0], both[:, 1:]

    def _probe_decode_step(self) -> float:
        """Time a one-token target forward (plain decode) at the current batch; return seconds spent."""
        last = self._tokens.gather(1, (self._lengths - 1)[:, None])  # [B, 1]
        times = []
        for _ in range(2):  # the first call may include one-off warm-up work
            self._clock.start()
            self.target.forward(last, self._lengths - 1)  # writes slot n-1, which the verify rewrites
            times.append(self._clock.lap())
        self._stats.decode_step_s = min(times)
        return sum(times)

    def _calibrate_policy(self, batch: int) -> float:
        """Let the k-policy time a target forward of each k it may choose (the slots written are
        rewritten by the next verify pass, as in the decode probe); return seconds spent."""
        t0 = time.perf_counter()
        last = self._tokens.gather(1, (self._lengths - 1)[:, None])  # [B, 1]
        room = self.n_positions - int(self._lengths.max()) + 1  # largest k whose slots fit the cache

        def time_verify(k: int) -> float:
            self._clock.start()
            self.target.forward(last.expand(-1, k), self._lengths - 1)
            return self._clock.lap()

        self.policy.calibrate(time_verify, batch, largest_k=room)
        spent = time.perf_counter() - t0
        self._stats.calibration_s += spent
        return spent

    def _commit(self, accepted: torch.Tensor, new: torch.Tensor) -> StepTokens:
        """Append accepted drafts + the emitted token per row, cut at EOS and sequence_length."""
        if new.numel() <= SMALL_COMMIT:
            return self._commit_small(accepted, new)
        ar = torch.arange(new.shape[1])  # [m]
        count = torch.minimum(accepted + 1, self._seq_len - self._lengths)  # [B]
        within = ar < count[:, None]  # [B, m]
        hit = None
        if self._eos.numel():
            is_eos = within & torch.isin(new, self._eos)
            hit = is_eos.any(1)
            count = torch.where(hit, is_eos.long().argmax(1) + 1, count)  # keep up to the first EOS
            within = ar < count[:, None]
        committed = torch.where(within, new, -1)  # [B, m]
        idx = self._lengths[:, None] + ar  # [B, m] slots of the new tokens
        self._tokens.scatter_(1, idx, torch.where(within, new, self._tokens.gather(1, idx)))
        step = StepTokens(self._rows, committed, count)  # (rows is replaced, never changed in place)
        self._lengths = self._lengths + count
        self._stats.new_tokens += int(count.sum())
        self.draft.commit(accepted, self._lengths)
        done = self._lengths >= self._seq_len
        self._finish_rows(done if hit is None else done | hit)
        return step

    def _commit_small(self, accepted: torch.Tensor, new: torch.Tensor) -> StepTokens:
        """:meth:`_commit` for a few rows and tokens, decided on host lists: the same result with a
        handful of tensor operations instead of twenty (each costs microseconds right after a
        forward has streamed the weights through the caches; a decode step of a small model
        has few to spare)."""
        m, eos = new.shape[1], self._eos_set
        toks, lengths = new.tolist(), self._lengths.tolist()
        counts, hit, rows, cols, vals = [], [], [], [], []
        for b, (a, row, n) in enumerate(zip(accepted.tolist(), toks, lengths)):
            c = min(a + 1, self._seq_len - n)
            stop = next((i for i in range(c) if row[i] in eos), None) if eos else None
            if stop is not None:
                c = stop + 1
            counts.append(c)
            hit.append(stop is not None)
            rows += [b] * c
            cols += range(n, n + c)
            vals += row[:c]
            row[c:] = [-1] * (m - c)
        self._tokens[rows, cols] = torch.tensor(vals, dtype=torch.long)
        count = torch.tensor(counts, dtype=torch.long)
        step = StepTokens(self._rows, torch.tensor(toks, dtype=torch.long), count)
        self._lengths = self._lengths + count
        self._stats.new_tokens += sum(counts)
        self.draft.commit(accepted, self._lengths)
        done = [h or n + c >= self._seq_len for h, n, c in zip(hit, lengths, counts)]
        if any(done):
            self._finish_rows(torch.tensor(done))
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
            self.draft.keep_rows(rows)
        self._tokens, self._lengths, self._rows = self._tokens[keep], self._lengths[keep], self._rows[keep]
        return None if logits is None else logits[keep.to(logits.device)]


def _limit(target_limit: int, draft_limit: int | None) -> int:
    return target_limit if draft_limit is None else min(target_limit, draft_limit)
