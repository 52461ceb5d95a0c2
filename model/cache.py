"""Static KV cache: preallocated ``[layers][B, H_kv, n_positions, D]``, written by position.

A rejected draft needs no rollback: the caller's valid length per row simply does not move
past it, the attention mask hides the stale slots, and the next write at those positions
overwrites them.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        n_positions: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_heads, n_positions, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]  # [B, H_kv, S, D]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.n_positions = n_positions

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def keep_rows(self, rows: list[int]) -> None:
        """Move cache rows ``rows`` (in order) to the front, so a forward over the first
        ``len(rows)`` rows continues exactly those sequences (finished rows drop out)."""
        for b in rows:
            if not 0 <= b < self.batch_size:
                raise IndexError(f"cache row {b} out of range for batch_size {self.batch_size}")
        if rows == list(range(len(rows))):
            return
        idx = torch.tensor(rows, device=self.k[0].device)
        for t in self.k + self.v:
            t[: len(rows)] = t.index_select(0, idx)
