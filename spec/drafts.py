"""Draft providers: propose g = k - 1 tokens per row and the distribution q each was sampled from.

The protocol is ``verispec.spec.protocols.Draft`` (shapes there); only ``propose`` is required::

    bind(target)                   once, by SpeculativeGenerator: check vocabulary/batch, keep refs
    prefill(prompts)               once per run: list of 1-D LongTensors (rows in batch order) or [B, L]
    propose(tokens, lengths, g, params, uniforms) -> (draft_ids [B, g] int64, draft_probs [B, g, V] fp32)
        tokens [B, W] int64: each row's committed tokens (prompt included) in tokens[b, :lengths[b]];
        uniforms [B, g] fp64: the draft's own random stream, for sampling its proposals; g >= 1
    propose(..., noise=fn)         only if ``can_couple``, with a coupled acceptor: ``fn(j)`` -> [B, V]
        Exp(1) noise of draft j's position; sample draft j as argmax_v q_v / noise_v (see
        coupled.py), the race the acceptor runs on the target's p with the same noise
    propose(..., keep=fn)          only if ``can_stop_early``: after each draft j, ``fn(conf [B])``
        with conf = the draft model's softmax probability (temperature 1) of each row's draft j;
        False stops the pass at j drafts (draft_ids [B, j]); after draft g the answer is unused. The generator passes it when the
        k-policy has ``keep_drafting`` (k = "auto").
    commit(accepted [B], lengths [B])   after each step: drafts kept, and the new committed lengths
    keep_rows(rows)                finished rows leave the batch (same list the target gets)

``draft_probs`` must be exactly the distribution each draft was sampled from, after the same
temperature/top-k/top-p as the target (docs/exactness.md pitfalls 1 and 4); a deterministic draft
reports a one-hot q and sets ``deterministic = True``.

Stopping early keeps the output exact: whether draft j + 1 is proposed is decided from drafts
1..j and their probabilities, i.e. from the prefix position j + 1 is sampled after; a proposed
draft is never withdrawn, so each one is still a plain sample from q (docs/exactness.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.prompts import prompt_lengths
from ..model.sampling import SamplingParams, greedy_ids, logits_to_probs, one_hot, sample_categorical
from .coupled import race
from .protocols import DraftBase
from .tree import DynamicTree
from .tree_draft import compact_path, draft_dynamic, draft_static


def _kernel(model, name: str):
    """A kernel backend extra of ``model`` (e.g. ``argmax``), or None."""
    kernels = getattr(model, "kernels", None)
    return kernels.get(name) if kernels is not None else None


def _draft_dist(logits: torch.Tensor, params: SamplingParams, who: str, argmax=None):
    """(q [B, V] fp32, greedy ids [B] or None): the distribution a draft samples from, and at
    temperature 0 its argmax, the only id the one-hot q can yield (so sampling it is skipped).
    ``argmax``: the draft model's backend's (see ``greedy_ids``)."""
    if params.greedy:
        ids = greedy_ids(logits, who, argmax)
        return one_hot(ids, logits.shape[-1]), ids
    return logits_to_probs(logits, params, who), None


def _confidence(logits: torch.Tensor, ids: torch.Tensor, softmax_at=None) -> torch.Tensor:
    """[B, V] logits, [B] drafts -> [B] fp32 softmax probability of each draft (temperature 1):
    the backend's ``softmax_at`` extra where it has one and it fits, torch elsewhere."""
    got = None if softmax_at is None else softmax_at(logits, ids)
    if got is not None:
        return got
    logits = logits.float()
    return (logits.gather(1, ids.to(logits.device)[:, None])[:, 0] - torch.logsumexp(logits, -1)).exp().cpu()


def _keep(model, keep, logits: torch.Tensor, ids: torch.Tensor, last: bool) -> bool:
    """Report draft confidences to the gate; its verdict on drafting one more, the same on every
    tensor-parallel rank (rank 0's). After the last allowed draft, False without asking ranks."""
    if keep is None:
        return not last
    verdict = bool(keep(_confidence(logits, ids, _kernel(model, "softmax_at"))))
    return False if last else bool(_sync(model, torch.tensor([[int(verdict)]], dtype=torch.long))[0, 0])


def _empty_proposal(B: int, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(B, 0, dtype=torch.long, device=device), torch.zeros(B, 0, V, device=device)


def _model_vocab_check(model, target, what: str) -> None:
    if model.vocab_size != target.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: {what} has {model.vocab_size} tokens, the target {target.vocab_size}; "
            "draft and target must share one tokenizer"
        )


class ModelDraft(DraftBase):
    """A separate draft model (LlamaForSampling, or anything with its model interface).

    The draft's static cache is position-indexed like the target's. ``valid[b]`` counts the
    leading slots that hold K/V of committed tokens. A step leaves a hole of one slot when all
    drafts were accepted (the last draft was sampled but never fed back), and several after
    k = 1 steps; the next ``propose`` refills it by feeding the missing tokens together with
    the last committed one in ONE forward (T = largest hole + 1). Rows with a smaller hole
    re-feed already cached tokens at the same slots, which rewrites the same K/V: harmless,
    and it keeps the step free of per-row branches.
    """

    deterministic = False
    can_stop_early = True
    can_couple = True
    can_draft_trees = True
    name = "model"

    def __init__(self, model):
        for attr in ("forward", "prefill", "keep_rows", "vocab_size", "batch_size", "n_positions"):
            if not hasattr(model, attr):
                raise TypeError(f"draft model {type(model).__name__} lacks {attr!r} of the model interface")
        self.model = model
        self.vocab_size = model.vocab_size
        self.batch_size = model.batch_size
        self.n_positions = model.n_positions
        self.valid: torch.Tensor | None = None  # [B] int64 cached slots per row

    def bind(self, target) -> None:
        if self.model is target:
            raise ValueError("the draft model is the target itself; use a layer-skip draft ('self:N') instead")
        _model_vocab_check(self.model, target, "the draft model")

    def prefill(self, prompts: list[torch.Tensor]) -> None:
        if len(prompts) > self.model.batch_size:
            raise ValueError(f"batch of {len(prompts)} rows exceeds the draft model's batch_size={self.model.batch_size}")
        if hasattr(self.model, "reset"):
            self.model.reset()
        self.model.prefill(prompts)
        self.valid = prompt_lengths(prompts)  # [B]

    def _choose(self, q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:  # [B, V], [B] -> [B]
        return sample_categorical(q, uniforms)

    def _root_logits(self, tokens, lengths) -> torch.Tensor:
        """Feed the hole and the last committed token; -> the draft's logits after it [B, V]."""
        last = lengths - 1  # [B] slot of the last committed token
        hole = int((last - self.valid).max())  # committed tokens before `last` missing from the cache
        start = (last - hole).clamp(min=0)  # [B]
        idx = start[:, None] + torch.arange(hole + 1)  # [B, T]
        ids = tokens.gather(1, idx.clamp(max=tokens.shape[1] - 1))  # [B, T]
        return self.model.forward(ids, start, logits_at=(last - start)[:, None])[:, 0]  # [B, V]

    def propose(self, tokens, lengths, g: int, params: SamplingParams, uniforms, keep=None, noise=None):
        B = lengths.shape[0]
        if g == 0:
            return _empty_proposal(B, self.vocab_size, tokens.device)
        last = lengths - 1  # [B] slot of the last committed token
        logits = self._root_logits(tokens, lengths)
        draft_ids, draft_probs = [], []
        for i in range(g):
            q, ids = _draft_dist(logits, params, "draft model", _kernel(self.model, "argmax"))  # [B, V] fp32: what the draft samples from
            if noise is not None:
                d = race(q, noise(i))
            elif ids is not None and type(self)._choose is ModelDraft._choose:
                d = ids  # sampling a one-hot q returns its id
            else:
                d = self._choose(q, uniforms[:, i])
            d = _sync(self.model, d.cpu())  # [B]
            draft_ids.append(d)
            draft_probs.append(q)
            if not _keep(self.model, keep, logits, d, last=i == g - 1):
                break
            logits = self.model.forward(d[:, None], last + 1 + i)[:, 0]
        g = len(draft_ids)
        self.valid = last + g  # slots 0 .. last + g - 1 now hold K/V (d_g was never fed)
        return torch.stack(draft_ids, 1), torch.stack(draft_probs, 1)

    def propose_tree(self, tokens, lengths, shape, children: str, params: SamplingParams, gen: torch.Generator):
        """A token tree (``spec/tree_draft.py``): the root's children from the logits after the last
        committed token, then one forward per level with the tree's masks at slots n, n + 1, .."""
        logits = self._root_logits(tokens, lengths)
        self.valid = lengths.clone()  # slots 0 .. n - 1 hold K/V; the tree's slots are compacted in commit_tree
        self._tree_n = lengths
        prop = _draft_tree(self.model, _level_forward(self.model, lengths), logits, shape, children, params, gen,
                           "draft model")
        self._fed = prop.fed
        return prop

    def commit_tree(self, path, count) -> None:
        """Move the accepted path's fed nodes next to the prefix (slots n, n + 1, ..)."""
        src, m = compact_path(path, count, self._fed)
        n = self._tree_n
        self.model.kv_gather(n[:, None] + src, n, m)
        self.valid = n + m

    def commit(self, accepted, lengths) -> None:
        # slots up to the last accepted draft are committed tokens; the new last token is not cached
        self.valid = torch.minimum(self.valid, lengths - 1)

    def keep_rows(self, rows: list[int]) -> None:
        self.model.keep_rows(rows)
        self.valid = self.valid[rows]


class LayerSkipDraft(DraftBase):
    """Self-draft: the target's first N layers, then its final norm and LM head (``self:N``).

    It SHARES the target's cache: the K/V of layers < N at a slot are the same computation
    whether the draft or the target writes them. The draft writes slots last .. last+g-1 of
    layers < N; the target's verify pass then rewrites slots last .. last+g of every layer
    before reading them, so the target never reads a draft-written entry and the draft never
    has a hole. Prefill and row compaction are the target's.
    """

    deterministic = False
    can_stop_early = True
    can_couple = True
    can_draft_trees = True
    name = "self"

    def __init__(self, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"layer-skip draft needs a positive number of layers, got {num_layers!r}")
        self.num_layers = num_layers
        self.target = None

    def bind(self, target) -> None:
        total = _num_layers(target)
        if total is not None and self.num_layers > total:
            raise ValueError(f"layer-skip draft 'self:{self.num_layers}' asks for more layers than the target has ({total})")
        self.target = target
        self.vocab_size = target.vocab_size
        self.name = f"self:{self.num_layers}"

    def propose(self, tokens, lengths, g: int, params: SamplingParams, uniforms, keep=None, noise=None):
        if self.target is None:
            raise RuntimeError("LayerSkipDraft.propose before bind(target)")
        B = lengths.shape[0]
        if g == 0:
            return _empty_proposal(B, self.vocab_size, tokens.device)
        last = lengths - 1
        d = tokens.gather(1, last[:, None])  # [B, 1]
        draft_ids, draft_probs = [], []
        for i in range(g):
            logits = self.target.forward(d, last + i, num_layers=self.num_layers)[:, 0]  # [B, V]
            q, ids = _draft_dist(logits, params, "layer-skip draft", _kernel(self.target, "argmax"))
            if noise is not None:
                d = race(q, noise(i))
            else:
                d = ids if ids is not None else sample_categorical(q, uniforms[:, i])
            d = _sync(self.target, d.cpu())[:, None]  # [B, 1]
            draft_ids.append(d[:, 0])
            draft_probs.append(q)
            if not _keep(self.target, keep, logits, d[:, 0], last=i == g - 1):
                break
        return torch.stack(draft_ids, 1), torch.stack(draft_probs, 1)

    def propose_tree(self, tokens, lengths, shape, children: str, params: SamplingParams, gen: torch.Generator):
        """A token tree in the target's first N layers; the verify pass rewrites every slot the
        tree used, and the target's kv_gather compacts all layers (no commit_tree of its own)."""
        if self.target is None:
            raise RuntimeError("LayerSkipDraft.propose_tree before bind(target)")
        last = lengths - 1
        d = tokens.gather(1, last[:, None])  # [B, 1]
        logits = self.target.forward(d, last, num_layers=self.num_layers)[:, 0]  # [B, V]
        level = _level_forward(self.target, lengths, num_layers=self.num_layers)
        return _draft_tree(self.target, level, logits, shape, children, params, gen, "layer-skip draft")


class NoDraft(DraftBase):
    """Target-only decoding (``SpeculativeGenerator(None, target, k=1)``): k = 1 never asks for drafts."""

    deterministic = True
    name = "none"

    def propose(self, tokens, lengths, g: int, params: SamplingParams, uniforms):
        raise RuntimeError(f"no draft to propose {g} tokens: k > 1 needs a draft")


class NGramDraft(DraftBase):
    """Prompt-lookup drafting: find the latest earlier occurrence of the last n committed tokens
    (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it. Deterministic, so
    q is one-hot. Rows without a match, or whose match runs out of history, repeat their last
    available token (any proposal keeps the output exact; a poor one is merely rejected).
    """

    deterministic = True
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(max_ngram, int) and isinstance(min_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, max_ngram={max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.vocab_size = None

    def bind(self, target) -> None:
        self.vocab_size = target.vocab_size

    def propose(self, tokens, lengths, g: int, params: SamplingParams, uniforms):
        if self.vocab_size is None:
            raise RuntimeError("NGramDraft.propose before bind(target)")
        draft_ids = ngram_lookup(tokens, lengths, g, self.max_ngram, self.min_ngram)  # [B, g]
        return draft_ids, F.one_hot(draft_ids, self.vocab_size).float()


def ngram_lookup(tokens: torch.Tensor, lengths: torch.Tensor, g: int, max_ngram: int, min_ngram: int) -> torch.Tensor:
    """Vectorised prompt lookup over rows: tokens [B, W], lengths [B] -> proposals [B, g]."""
    B, W = tokens.shape
    ar_g = torch.arange(g)
    last = lengths - 1  # [B]
    proposal = tokens.gather(1, last[:, None]).expand(B, g).clone()  # fallback: repeat the last token
    found = torch.zeros(B, dtype=torch.bool)
    for n in range(max_ngram, min_ngram - 1, -1):
        if g == 0 or W < n + 1:
            continue
        suffix_idx = (lengths[:, None] - n + torch.arange(n)).clamp(min=0)  # [B, n]
        suffix = tokens.gather(1, suffix_idx)  # [B, n]
        windows = tokens.unfold(1, n, 1)  # [B, W - n + 1, n]
        starts = torch.arange(W - n + 1)  # [S]
        # an earlier window whose next token is committed (so the suffix itself is excluded)
        match = (windows == suffix[:, None, :]).all(-1) & (starts[None] + n < lengths[:, None])  # [B, S]
        latest = torch.where(match, starts[None], -1).max(1).values  # [B]
        hit = (latest >= 0) & (lengths > n) & ~found
        cont_idx = torch.minimum(latest.clamp(min=0)[:, None] + n + ar_g, last[:, None])  # [B, g]
        proposal = torch.where(hit[:, None], tokens.gather(1, cont_idx), proposal)
        found |= hit
    return proposal


def _sync(model, tokens: torch.Tensor) -> torch.Tensor:
    """Tensor-parallel ranks must agree on sampled drafts (rank 0's win); no-op otherwise."""
    sync = getattr(model, "sync_tokens", None)
    return tokens if sync is None else sync(tokens)


def _level_forward(model, lengths, **kw):
    """A tree level's forward in ``model``: nodes at slots n + i, RoPE positions n + offset."""

    def level(ids, offsets, mask, at):
        return model.forward(ids, lengths, logits_at=at, active_mask=mask, position_ids=lengths[:, None] + offsets, **kw)

    return level


def _draft_tree(model, level, root_logits, shape, children, params, gen, who):
    argmax = _kernel(model, "argmax")
    sync = lambda t: _sync(model, t)  # noqa: E731
    if isinstance(shape, DynamicTree):
        return draft_dynamic(level, root_logits, shape, params, who, argmax, sync)
    return draft_static(level, root_logits, shape, children, params, gen, who, argmax, sync)


def _num_layers(model) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        return config.num_hidden_layers
    return getattr(model, "num_layers", None)
