"""Position-keyed sampling noise, for the ``coupled`` acceptor.

Every token a coupled run emits is the winner of an exponential race, argmax_v p_v / E_v, with
E[row, pos, v] ~ Exp(1) a FIXED function of (seed, input row, absolute position, token id), the
same for the target and for the draft. Target-only sampling with that rule (fresh noise at every
position) is exact sampling from p, and a coupled speculative run emits exactly the tokens that
target-only run would: drafts only decide how many of them one verify pass confirms. So for one
seed the text is the same for every k, k-policy and draft (up to the numerics of verify vs decode
matmuls, as with greedy decoding), which makes sampled runs comparable token for token.

The noise is a counter-based hash (the splitmix64 finalizer) evaluated in torch int64 arithmetic:
no generator state, so no call order, batch composition or cache history can change a value.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# Smallest Exp(1) value handed out (as in randomness.py): a zero would make 0/0 in the race.
_MIN_EXPONENTIAL = 2.0**-60


def _signed(x: int) -> int:  # a uint64 constant as torch's int64 bit pattern
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:  # logical right shift of int64 bit patterns
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:  # splitmix64 finalizer on int64 bit patterns (wrapping)
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def _mix_int(x: int) -> int:  # the same on a Python int (uint64)
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def race(weights: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax_v w_v / E_v picks v with probability w_v / sum(w) (lowest id on ties)."""
    return torch.argmax(weights.float() / exponentials.to(weights.device), dim=-1)


class PositionalNoise:
    """Exp(1) noise ``E[row, pos, :]`` of one run, a pure function of (seed, row, pos, token).

    ``exponentials(rows, positions)`` -> [B, m, V] fp32 on ``device``. Values are computed on the
    CPU (about 1.7 ms per position at V = 151936 on a 2-core machine) and kept in a ring of
    ``slots`` positions per row, so that the draft and the verify pass of one step, and a position
    re-verified in the next step, share one computation.
    """

    def __init__(self, seed: int, vocab_size: int, slots: int = 16, device: torch.device | str = "cpu"):
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self.seed = int(seed) & _MASK64
        self.vocab_size = vocab_size
        self.slots = slots
        self.device = torch.device(device)
        self._key = _signed(_mix_int(self.seed ^ _mix_int(0x636F75706C6564)))  # "coupled"
        self._tokens: torch.Tensor | None = None  # [V] per-token offsets, made on first use
        self._ring: torch.Tensor | None = None  # [R, slots, V] fp32, R = rows seen so far
        self._tags: torch.Tensor | None = None  # [R, slots] int64: position held in each slot, -1 empty

    def compute(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[n] rows, [n] positions -> [n, V] fp32 on the CPU, without the cache."""
        rows = rows.to(torch.int64).cpu()
        positions = positions.to(torch.int64).cpu()
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError("positions must be >= 0")
        if self._tokens is None:  # every run builds a PositionalNoise; only coupled runs compute with it
            self._tokens = torch.arange(1, self.vocab_size + 1, dtype=torch.int64) * _signed(_GAMMA)
        key = _mix(_mix(self._key ^ rows) ^ positions)  # [n]
        z = _mix(key[:, None] + self._tokens[None])  # [n, V]
        u = _shr(z, 11).to(torch.float64) * 2.0**-53  # [0, 1)
        return (-torch.log1p(-u)).clamp_min(_MIN_EXPONENTIAL).to(torch.float32)

    def exponentials(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """rows [B] (input row ids), positions [B, m] (absolute; each row's span < slots) -> [B, m, V]."""
        rows = rows.to(torch.int64).cpu()
        positions = positions.to(torch.int64).cpu()
        B, m = positions.shape
        if rows.shape != (B,):
            raise ValueError(f"rows must be [B] = [{B}], got {tuple(rows.shape)}")
        if m > self.slots:
            raise ValueError(f"asked for {m} positions per row, the ring holds {self.slots}")
        if B == 0 or m == 0:
            return torch.zeros(B, m, self.vocab_size, device=self.device)
        self._grow(int(rows.max()) + 1)
        slot = positions % self.slots  # [B, m]
        r = rows[:, None].expand(B, m)
        miss = self._tags[r, slot] != positions  # [B, m]
        if miss.any():
            fresh = self.compute(r[miss], positions[miss])
            self._ring[r[miss], slot[miss]] = fresh
            self._tags[r[miss], slot[miss]] = positions[miss]
        return self._ring[r, slot].to(self.device)

    def _grow(self, rows: int) -> None:
        have = 0 if self._tags is None else self._tags.shape[0]
        if rows <= have:
            return
        ring = torch.empty(rows, self.slots, self.vocab_size, dtype=torch.float32)
        tags = torch.full((rows, self.slots), -1, dtype=torch.int64)
        if have:
            ring[:have], tags[:have] = self._ring, self._tags
        self._ring, self._tags = ring, tags
