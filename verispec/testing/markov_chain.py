"""Toy language models for exactness checks: random Markov chains over a tiny vocabulary.

A :class:`MarkovChainLM` implements the SAME model interface as ``LlamaForSampling``
(``forward(input_ids [B, T], positions [B], logits_at=...)`` -> fp32 logits, ``prefill``,
``keep_rows``, ``sync_tokens``, ``vocab_size``, ``batch_size``, ``n_positions``), so the real
speculative loop runs on it unchanged, with 10^5 rows in one batch.

Like a decoder it keeps a position-indexed cache (here: the token at each slot). With
``order=2`` the next-token logits depend on the last TWO tokens, the earlier one read from the
cache, so a loop that leaves a stale or missing slot in a model's cache changes that model's
distribution and is caught. Logits are a sum of per-"layer" tables, so the first N layers
make a layer-skip self-draft (``num_layers=N``).

Token trees: with ``active_mask`` [B, T, T] a token's context is the prior slots followed by the
tokens of its forward it may see (its ancestors), so the previous token is the nearest visible one;
``position_ids`` are checked for shape and ignored (a Markov chain has no positions).
``kv_gather`` moves slots like the decoders' kernel, so a missed or wrong compaction changes the
next order-2 context.
"""

from __future__ import annotations

import torch


class MarkovChainLM:
    def __init__(
        self,
        layer_logits: torch.Tensor,  # [n_layers, C, V] with C = V (order 1) or (V + 1) * V (order 2)
        *,
        order: int = 1,
        n_positions: int = 64,
        batch_size: int = 1,
    ):
        if layer_logits.dim() != 3:
            raise ValueError(f"layer_logits must be [n_layers, contexts, V], got {tuple(layer_logits.shape)}")
        n_layers, C, V = layer_logits.shape
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        expected = V if order == 1 else (V + 1) * V
        if C != expected:
            raise ValueError(f"an order-{order} chain over {V} tokens needs {expected} contexts, got {C}")
        self.layer_logits = layer_logits.float()
        self.order = order
        self.num_layers = n_layers
        self.vocab_size = V
        self.n_positions = n_positions
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.cache = torch.zeros(batch_size, n_positions, dtype=torch.long)  # [B, S_max] token per slot

    @classmethod
    def random(
        cls,
        vocab_size: int,
        seed: int,
        *,
        order: int = 1,
        n_layers: int = 2,
        sharpness: float = 1.5,
        n_positions: int = 64,
        batch_size: int = 1,
    ) -> "MarkovChainLM":
        """Gaussian logits with standard deviation ``sharpness`` (larger: more peaked rows)."""
        g = torch.Generator().manual_seed(seed)
        C = vocab_size if order == 1 else (vocab_size + 1) * vocab_size
        tables = torch.randn(n_layers, C, vocab_size, generator=g) * (sharpness / n_layers**0.5)
        return cls(tables, order=order, n_positions=n_positions, batch_size=batch_size)

    def with_batch_size(self, batch_size: int) -> "MarkovChainLM":
        """The same chain with a fresh cache for ``batch_size`` rows."""
        return MarkovChainLM(self.layer_logits, order=self.order, n_positions=self.n_positions, batch_size=batch_size)

    def table(self, num_layers: int | None = None) -> torch.Tensor:  # [C, V]
        n = self.num_layers if num_layers is None else num_layers
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"num_layers={n} out of range 1..{self.num_layers}")
        return self.layer_logits[:n].sum(0)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B] first slot per row
        logits_at: torch.Tensor | None = None,  # [B, n]
        active_mask: torch.Tensor | None = None,
        num_layers: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [B, T or n, V] fp32
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B > self.batch_size:
            raise ValueError(f"batch of {B} rows exceeds batch_size={self.batch_size}")
        if positions.shape != (B,):
            raise ValueError(f"positions must be [B={B}], got {tuple(positions.shape)}")
        positions = positions.long().cpu()
        if int(positions.min()) < 0 or int(positions.max()) + T > self.n_positions:
            raise ValueError(f"sequence longer than n_positions={self.n_positions}")
        ids = input_ids.long().cpu()
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id outside [0, {self.vocab_size})")
        if position_ids is not None and tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be [B={B}, T={T}], got {tuple(position_ids.shape)}")
        slots = positions[:, None] + torch.arange(T)  # [B, T]
        self.cache[:B].scatter_(1, slots, ids)
        if self.order == 1:
            ctx = ids
        elif active_mask is None:  # the previous token comes from the cache; slot 0 has the start context V
            prev = self.cache[:B].gather(1, (slots - 1).clamp(min=0))
            prev = torch.where(slots == 0, self.vocab_size, prev)
            ctx = prev * self.vocab_size + ids
        else:
            ctx = self._tree_context(ids, positions, active_mask)
        logits = self.table(num_layers)[ctx]  # [B, T, V]
        if logits_at is not None:
            logits = logits.gather(1, logits_at.long().cpu()[:, :, None].expand(-1, -1, self.vocab_size))
        return logits

    __call__ = forward

    def _tree_context(self, ids: torch.Tensor, positions: torch.Tensor, active_mask: torch.Tensor) -> torch.Tensor:
        """Order-2 contexts [B, T] under a tree mask: the previous token is the latest token of the
        forward that t sees (other than itself), else the prior slot positions - 1."""
        B, T = ids.shape
        mask = active_mask.bool().cpu()
        if tuple(mask.shape) != (B, T, T):
            raise ValueError(f"active_mask must be [B={B}, T={T}, T={T}], got {tuple(mask.shape)}")
        before = mask & torch.ones(T, T, dtype=torch.bool).tril(-1)  # [B, T, T] seen earlier tokens
        seen = before.any(-1)  # [B, T]
        latest = torch.where(before, torch.arange(T), -1).max(-1).values  # [B, T]
        prior = self.cache[:B].gather(1, (positions - 1).clamp(min=0)[:, None]).expand(B, T)
        prior = torch.where((positions == 0)[:, None], self.vocab_size, prior)
        prev = torch.where(seen, ids.gather(1, latest.clamp(min=0)), prior)
        return prev * self.vocab_size + ids

    def kv_gather(self, src_slots: torch.Tensor, dst_start: torch.Tensor, counts: torch.Tensor) -> None:
        """Slots dst_start[b] + i (i < counts[b]) take what slots src_slots[b, i] held (the
        decoders' ``kv_gather`` on this model's one-token-per-slot cache)."""
        B, N = src_slots.shape
        src, start, counts = src_slots.long().cpu(), dst_start.long().cpu(), counts.long().cpu()
        used = torch.arange(N)[None] < counts[:, None]  # [B, N]
        dst = start[:, None] + torch.arange(N)
        if bool((used & ((src < 0) | (src >= self.n_positions) | (dst >= self.n_positions))).any()):
            raise IndexError(f"kv_gather out of range: slots must lie in 0..{self.n_positions - 1}")
        vals = self.cache[:B].gather(1, src.clamp(0, self.n_positions - 1))  # read every source first
        rows = torch.arange(B)[:, None].expand(B, N)
        self.cache[rows[used], dst[used]] = vals[used]

    def prefill(self, prompts) -> torch.Tensor:  # -> [B, V] last-token logits
        """prompts: a list of 1-D LongTensors, or a [B, L] LongTensor of full-length prompts."""
        if isinstance(prompts, torch.Tensor):
            ids = prompts.long()
            lengths = torch.full((len(ids),), ids.shape[1], dtype=torch.long)
        else:
            lengths = torch.tensor([len(p) for p in prompts])
            ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
            for b, p in enumerate(prompts):
                ids[b, : len(p)] = p
        return self.forward(ids, torch.zeros(len(ids), dtype=torch.long), logits_at=(lengths - 1)[:, None])[:, 0]

    def keep_rows(self, rows: list[int]) -> None:
        if rows and (min(rows) < 0 or max(rows) >= self.batch_size):
            raise IndexError(f"cache row out of range for batch_size {self.batch_size}")
        self.cache[: len(rows)] = self.cache[torch.as_tensor(rows, dtype=torch.long)]

    def sync_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def reset(self) -> None:
        pass
