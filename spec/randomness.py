"""Explicit random sources for the speculative loop.

One seed fans out into independent torch generators, one per use, so that no random number
is ever reused for two decisions (docs/exactness.md pitfall 2):

* ``draft``: the uniforms the draft samples its proposals with;
* ``accept``: the uniforms of the accept test (``rng.uniforms``);
* ``race``: the Exp(1) variables that pick the recovered/bonus token (``rng.exponentials``);
* ``noise``: position-keyed Exp(1) noise for coupled sampling (``rng.positional_exponentials``,
  see coupled.py): a pure function of (seed, row, position, token), not a stream.

An acceptor receives an :class:`AcceptorRandomness`; it may draw as many numbers as it likes
from either stream, but the two streams never share a draw.
"""

from __future__ import annotations

import torch

from ..model.sampling import make_generator
from .coupled import PositionalNoise

# Smallest Exp(1) value handed out: -log1p(-u) is exactly 0 when u == 0 (probability 2^-53),
# and a zero would turn a zero-probability token's 0/0 into NaN in the race.
_MIN_EXPONENTIAL = 2.0**-60


class AcceptorRandomness:
    """Two independent streams: ``uniforms`` (accept tests) and ``exponentials`` (sampling).

    Numbers are drawn on the CPU in a fixed order (so results do not depend on the device)
    and moved to ``device``.
    """

    def __init__(self, accept: torch.Generator, race: torch.Generator, device: torch.device | str = "cpu",
                 noise: PositionalNoise | None = None):
        self._accept = accept
        self._race = race
        self.device = torch.device(device)
        self.noise = noise
        self._rows: torch.Tensor | None = None  # [B] input row of each active row
        self._positions: torch.Tensor | None = None  # [B] position of each row's next token

    def at(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Where the rows stand: input row ids [B] and the position of each row's next token [B]
        (SpeculativeGenerator calls it before every step)."""
        self._rows, self._positions = rows, positions

    def positional_exponentials(self, m: int, offset: int = 0) -> torch.Tensor:  # [B, m, V] fp32
        """The coupled noise of positions next + offset .. next + offset + m - 1 of every row."""
        if self.noise is None or self._rows is None:
            raise ValueError("positional noise needs a PositionalNoise and the rows' positions (rng.at(rows, "
                             "positions)); SpeculativeGenerator sets both")
        pos = self._positions[:, None] + offset + torch.arange(m)
        return self.noise.exponentials(self._rows, pos).to(self.device)

    def uniforms(self, *shape: int) -> torch.Tensor:  # [*shape] fp32 in [0, 1)
        return torch.rand(shape, generator=self._accept, dtype=torch.float32).to(self.device)

    def exponentials(self, *shape: int) -> torch.Tensor:  # [*shape] fp32 > 0, Exp(1)
        u = torch.rand(shape, generator=self._race, dtype=torch.float64)
        e = (-torch.log1p(-u)).clamp_min(_MIN_EXPONENTIAL)
        return e.to(torch.float32).to(self.device)


class SpeculativeRandomness:
    """All randomness of one generation run, derived from one seed (None: fresh entropy)."""

    def __init__(self, seed: int | None, device: torch.device | str = "cpu", vocab_size: int | None = None,
                 noise_slots: int = 16):
        root = make_generator(seed)
        # three child seeds drawn from the root: independent mt19937 streams
        seeds = torch.randint(0, 2**62, (3,), generator=root, dtype=torch.int64).tolist()
        self.draft = torch.Generator(device="cpu").manual_seed(seeds[0])
        accept = torch.Generator(device="cpu").manual_seed(seeds[1])
        race = torch.Generator(device="cpu").manual_seed(seeds[2])
        noise = None
        if vocab_size is not None:  # a fourth draw keys the coupled noise (the first three are unchanged)
            key = int(torch.randint(0, 2**62, (1,), generator=root, dtype=torch.int64))
            noise = PositionalNoise(key, vocab_size, noise_slots, device)
        self.acceptor = AcceptorRandomness(accept, race, device, noise)

    def draft_uniforms(self, rows: int, g: int) -> torch.Tensor:  # [rows, g] fp64 in [0, 1)
        """Uniforms for the draft's inverse-CDF sampling of its g proposals."""
        return torch.rand((rows, g), generator=self.draft, dtype=torch.float64)
