"""Explicit random sources for the speculative loop.

One seed fans out into independent torch generators, one per use, so that no random number
is ever reused for two decisions (exactness.md pitfall 2):

* ``draft``: the uniforms the draft samples its proposals with;
* ``accept``: the uniforms of the accept test (``rng.uniforms``);
* ``race``: the Exp(1) variables that pick the recovered/bonus token (``rng.exponentials``).

An acceptor receives an :class:`AcceptorRandomness`; it may draw as many numbers as it likes
from either stream, but the two streams never share a draw.
"""

from __future__ import annotations

import torch

from ..model.sampling import make_generator

# Smallest Exp(1) value handed out: -log1p(-u) is exactly 0 when u == 0 (probability 2^-53),
# and a zero would turn a zero-probability token's 0/0 into NaN in the race.
_MIN_EXPONENTIAL = 2.0**-60


class AcceptorRandomness:
    """Two independent streams: ``uniforms`` (accept tests) and ``exponentials`` (sampling).

    Numbers are drawn on the CPU in a fixed order (so results do not depend on the device)
    and moved to ``device``.
    """

    def __init__(self, accept: torch.Generator, race: torch.Generator, device: torch.device | str = "cpu"):
        self._accept = accept
        self._race = race
        self.device = torch.device(device)

    def uniforms(self, *shape: int) -> torch.Tensor:  # [*shape] fp32 in [0, 1)
        return torch.rand(shape, generator=self._accept, dtype=torch.float32).to(self.device)

    def exponentials(self, *shape: int) -> torch.Tensor:  # [*shape] fp32 > 0, Exp(1)
        u = torch.rand(shape, generator=self._race, dtype=torch.float64)
        e = (-torch.log1p(-u)).clamp_min(_MIN_EXPONENTIAL)
        return e.to(torch.float32).to(self.device)


class SpeculativeRandomness:
    """All randomness of one generation run, derived from one seed (None: fresh entropy)."""

    def __init__(self, seed: int | None, device: torch.device | str = "cpu"):
        root = make_generator(seed)
        # three child seeds drawn from the root: independent mt19937 streams
        seeds = torch.randint(0, 2**62, (3,), generator=root, dtype=torch.int64).tolist()
        self.draft = torch.Generator(device="cpu").manual_seed(seeds[0])
        accept = torch.Generator(device="cpu").manual_seed(seeds[1])
        race = torch.Generator(device="cpu").manual_seed(seeds[2])
        self.acceptor = AcceptorRandomness(accept, race, device)

    def draft_uniforms(self, rows: int, g: int) -> torch.Tensor:  # [rows, g] fp64 in [0, 1)
        """Uniforms for the draft's inverse-CDF sampling of its g proposals."""
        return torch.rand((rows, g), generator=self.draft, dtype=torch.float64)
