"""The four pluggable parts of the speculative loop, and base classes with no-op optional hooks.

    Target    scores [last committed token, drafts] in one forward      (LlamaForSampling, toy chains)
    Draft     proposes g = k - 1 tokens and q, the law each was sampled from
    Acceptor  keeps a prefix of the drafts and emits one token after it
    TreeDraft optional: a draft that drafts token trees (the tree acceptors' protocol: tree.py)
    KPolicy   chooses k before each step and hears how the step went

Each protocol lists every member the loop (generator.py) uses; the loop calls all of them
unconditionally. Only the members marked REQUIRED must exist on a user's object: the built-in
parts subclass the bases below, and ``resolve.py`` wraps an object that is not an instance of the
protocol, once, in an adapter that supplies the missing optional members with the bases'
defaults. Shapes: B active rows, V vocabulary, g drafts this step (0 <= g <= max_k - 1).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..model.sampling import SamplingParams


@runtime_checkable
class Target(Protocol):
    """The model interface (``LlamaForSampling``, ``verispec.testing.MarkovChainLM``).

    REQUIRED: ``forward``, ``prefill``, ``keep_rows``, ``vocab_size``, ``batch_size``, ``n_positions``.
    """

    vocab_size: int
    batch_size: int  # rows the cache holds
    n_positions: int  # cache slots per row
    device: torch.device | str  # optional: "cpu"
    kernels: object  # optional: the kernel backend's KernelSet (``get(name)`` -> kernel or None), or None
    speculation_lengths: list  # optional: set by enable_speculative_decoder(k); [] = none

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_at: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
        """input_ids [B, T] int64 written at cache slots positions[b] .. positions[b] + T - 1
        (positions [B] int64) -> logits [B, T, V] (or [B, n, V] at ``logits_at`` [B, n])."""

    def prefill(self, prompts) -> torch.Tensor:
        """Prompts (a list of 1-D int64 tensors, or a [B, L] tensor of full-length prompts) written
        from slot 0 -> logits [B, V] at each row's last prompt token."""

    def keep_rows(self, rows: list[int]) -> None:
        """Continue only cache rows ``rows`` (moved to the front, in order)."""

    def kv_gather(self, src_slots: torch.Tensor, dst_start: torch.Tensor, counts: torch.Tensor) -> None:
        """Optional, for token trees: slots dst_start[b] + i (i < counts[b]) of cache row b take
        what slots src_slots[b, i] held (src_slots [B, N], dst_start [B], counts [B] int64)."""

    def reset(self) -> None:
        """Optional: forget all sequences (called before each prefill)."""

    def sync_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Optional: [B, m] int64 -> the same on every tensor-parallel rank (rank 0's); identity."""


@runtime_checkable
class Draft(Protocol):
    """A draft provider. REQUIRED: ``propose``.

    ``draft_probs`` must be exactly the law each draft was sampled from, after the same
    temperature / top-k / top-p as the target (docs/exactness.md pitfalls 1 and 4); a
    deterministic draft reports a one-hot q and sets ``deterministic``.
    """

    name: str  # for statistics (default: the class name)
    deterministic: bool  # proposals are a function of the committed tokens (q one-hot)
    can_stop_early: bool  # propose() takes keep= (a drafting gate)
    can_couple: bool  # propose() takes noise= (the coupled acceptor's noise)
    n_positions: int | None  # the draft's own cache limit (None: none)
    batch_size: int | None  # the draft's own batch limit (None: none)

    def bind(self, target) -> None:
        """Once, by SpeculativeGenerator: check the vocabulary / batch against the target, keep refs."""

    def prefill(self, prompts) -> None:
        """Once per run, the prompts the target prefills (list of 1-D int64, or [B, L])."""

    def propose(self, tokens: torch.Tensor, lengths: torch.Tensor, g: int, params: SamplingParams,
                uniforms: torch.Tensor, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, W] int64 (row b's committed tokens, prompt included, in tokens[b, :lengths[b]]),
        lengths [B] int64, g >= 1 (never called at g = 0), uniforms [B, g] fp64 (the draft's own
        stream) -> (draft_ids [B, g] int64, draft_probs [B, g, V] fp32).
        ``keep=fn`` (only if can_stop_early): after draft j, ``fn(conf [B])`` with conf the draft's
        softmax probability (temperature 1) of each row's draft j; False stops at j drafts
        (draft_ids [B, j]). ``noise=fn`` (only if can_couple, with a coupled acceptor): ``fn(j)``
        -> [B, V] Exp(1) noise of draft j's position; sample draft j as argmax_v q_v / noise_v."""

    def commit(self, accepted: torch.Tensor, lengths: torch.Tensor) -> None:
        """After each step: drafts kept [B] and the new committed lengths [B]."""

    def keep_rows(self, rows: list[int]) -> None:
        """Finished rows leave the batch (the list the target gets)."""


@runtime_checkable
class TreeDraft(Protocol):
    """A draft that also drafts token trees (``SpeculativeGenerator(tree=...)``): ModelDraft and
    LayerSkipDraft do; a user's provider does by defining these members."""

    can_draft_trees: bool  # True

    def propose_tree(self, tokens: torch.Tensor, lengths: torch.Tensor, shape, children: str, params: SamplingParams,
                     gen: torch.Generator):
        """A token tree after each row's last committed token; shape a ``TreeSpec`` or ``DynamicTree``
        -> ``tree_draft.TreeProposal`` (trees per row, node_ids [B, N], node_q [B, N, V]: the law each
        node was drawn from, fed [B, N]); ``gen`` is the draft's random stream."""

    def commit_tree(self, path: torch.Tensor, count: torch.Tensor) -> None:
        """After a tree step, before ``commit``: the accepted path [B, D] (node indices, -1 padded)
        and its length [B]; a draft with a cache moves the path's K/V next to the prefix."""


@runtime_checkable
class Acceptor(Protocol):
    """A token acceptor. REQUIRED: ``__call__``.

    ``tokens[b, :a]`` must equal ``draft_ids[b, :a]`` (a = accepted[b]): those drafts are already in
    the target's cache. ``lossless = True`` claims the output law equals target-only sampling
    (docs/exactness.md); the test suite and ``verispec check`` test that claim.
    """

    name: str  # for statistics (default: the class name)
    lossless: bool | None  # the claim above; None: no claim
    exact_when_greedy: bool  # lossless at temperature 0 (GreedyTokenAcceptor)
    coupled: bool  # the loop hands drafts the positional noise the acceptor samples with
    accepts_greedy_ids: bool  # at temperature 0 the loop may call accept_greedy instead

    def __call__(self, draft_ids: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                 rng) -> tuple[torch.Tensor, torch.Tensor]:
        """draft_ids [B, g] int64, draft_probs q [B, g, V] fp32, target_probs p [B, g + 1, V] fp32,
        rng an AcceptorRandomness (independent ``uniforms`` / ``exponentials`` streams)
        -> (accepted [B] int64 in 0..g, tokens [B, g + 1] int64: accepted drafts, one emitted token, -1)."""

    def accept_greedy(self, draft_ids: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature 0, only if ``accepts_greedy_ids``: the same decisions from the target's argmax
        ids ``choice`` [B, g + 1] alone (no [B, g + 1, V] distributions, no random numbers)."""


@runtime_checkable
class KPolicy(Protocol):
    """A speculation-length policy. REQUIRED: ``max_k``, ``next_k``.

    Any k keeps the output exact: it is chosen before the step's random numbers are drawn and only
    decides how many drafts are proposed, never how a draft is judged.
    """

    max_k: int  # the largest k next_k() may return (sizes buffers and the cache check)
    keep_drafting: Callable[[torch.Tensor], bool] | None  # a drafting gate (see Draft.propose keep=), or None

    def next_k(self) -> int:
        """Before each step: tokens the target scores in it (1 <= k <= max_k; 1 = no drafts)."""

    def observe(self, k: int, accepted: torch.Tensor, draft_s: float, target_s: float) -> None:
        """After each step: the k used, accepted drafts per row [B], the draft's and the target's seconds."""

    def begin_sequence(self) -> None:
        """At the start of every generate() / stream() run."""

    def needs_calibration(self, batch: int) -> bool:
        """Before a step at ``batch`` rows: whether to call calibrate now."""

    def calibrate(self, time_verify: Callable[[int], float], batch: int, largest_k: int | None = None) -> None:
        """``time_verify(k)`` -> seconds of one target forward over k tokens (k <= largest_k)."""

    def set_gated(self, gated: bool) -> None:
        """Once, by SpeculativeGenerator: whether the draft reports confidences to ``keep_drafting``."""


# ---- base classes: subclass one, define the required members, override hooks as needed --------------


class _ClassName:
    """Default ``name``: the class's own name (a class attribute or an instance may set another)."""

    def __get__(self, obj, cls) -> str:
        return cls.__name__


class TargetBase:
    """Defaults of a target's optional members (a model on one device, one process)."""

    device = torch.device("cpu")
    kernels = None
    speculation_lengths: tuple = ()

    def reset(self) -> None:
        pass

    def sync_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def kv_gather(self, src_slots, dst_start, counts) -> None:
        raise TypeError(f"target {type(self).__name__} has no kv_gather(src_slots, dst_start, counts): token trees "
                        "need it to move the accepted path's cache entries next to the prefix")


class DraftBase:
    """Defaults of a draft's optional members: a sampling draft (not deterministic) that can
    neither stop early nor couple, keeps no state between steps and has no limits of its own."""

    name = _ClassName()
    deterministic = False
    can_stop_early = False
    can_couple = False
    can_draft_trees = False
    n_positions: int | None = None
    batch_size: int | None = None

    def bind(self, target) -> None:
        pass

    def propose_tree(self, tokens, lengths, shape, children, params, gen):
        raise TypeError(f"draft {self.name!r} cannot draft token trees (it proposes one chain): use a draft model, "
                        "'self:N', or a provider with propose_tree")

    def commit_tree(self, path, count) -> None:
        pass

    def prefill(self, prompts) -> None:
        pass

    def propose(self, tokens, lengths, g, params, uniforms, **extra):
        raise NotImplementedError(f"{type(self).__name__} must define propose(tokens, lengths, g, params, uniforms)")

    def commit(self, accepted, lengths) -> None:
        pass

    def keep_rows(self, rows) -> None:
        pass


def read_through(member: str, default):
    """A property that reads the wrapped object's (``self.inner``) ``member`` when it has one, else
    ``default``: for adapters and wrappers that leave an object's decisions to it."""
    return property(lambda self: getattr(self.inner, member, default))


class AcceptorBase:
    """Defaults of an acceptor's optional members: no exactness claim, no greedy shortcut."""

    name = _ClassName()
    lossless: bool | None = None
    exact_when_greedy = False
    coupled = False
    accepts_greedy_ids = False  # opt in only if accept_greedy decides as __call__ does at temperature 0

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        raise NotImplementedError(
            f"{type(self).__name__} must define __call__(draft_ids, draft_probs, target_probs, rng)")

    def accept_greedy(self, draft_ids, choice):
        """Keep the drafts while they equal ``choice``, then emit ``choice`` there: what rejection
        sampling decides with one-hot q and p (and GreedyTokenAcceptor at any temperature)."""
        from .acceptors import accept_by_ids  # acceptors.py builds on this module

        return accept_by_ids(draft_ids, choice)


class KPolicyBase:
    """Defaults of a k-policy's optional members: it learns nothing, needs no calibration and has
    no drafting gate."""

    max_k: int
    keep_drafting = None

    def next_k(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define next_k()")

    def observe(self, k, accepted, draft_s, target_s) -> None:
        pass

    def begin_sequence(self) -> None:
        pass

    def needs_calibration(self, batch: int) -> bool:
        return False

    def calibrate(self, time_verify, batch: int, largest_k: int | None = None) -> None:
        pass

    def set_gated(self, gated: bool) -> None:
        pass


# ---- what the loop checks of a draft's and an acceptor's output ----------------------------------


def check_proposal(draft_ids, draft_probs, B: int, g: int, V: int) -> None:
    """A draft's (draft_ids [B, g], draft_probs [B, g, V]): shapes, ids in the vocabulary, no NaN."""
    if tuple(draft_ids.shape) != (B, g) or tuple(draft_probs.shape) != (B, g, V):
        raise ValueError(
            f"draft provider returned draft_ids {tuple(draft_ids.shape)} and draft_probs {tuple(draft_probs.shape)}; "
            f"expected [{B}, {g}] and [{B}, {g}, {V}]"
        )
    if g and (int(draft_ids.min()) < 0 or int(draft_ids.max()) >= V):
        raise ValueError(f"draft provider proposed a token id outside [0, {V})")
    if g and torch.isnan(draft_probs).any():
        raise FloatingPointError("draft provider returned NaN draft probabilities")


def check_acceptor_output(accepted, new, draft_ids, B: int, g: int, V: int) -> None:
    """An acceptor's (accepted [B], tokens [B, g + 1]): shapes, integer dtypes, counts in 0..g, the
    emitted id in the vocabulary, accepted drafts unchanged."""
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
