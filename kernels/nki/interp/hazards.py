"""Rule 10, the parallel-loop lint: opt-in (``lint_parallel_loops=True``) and STRICTER than NKI.

In NKI 0.6 ``affine_range`` is an alias of ``range`` and runs in order. Older NKI defined it as a
loop whose iterations may run in any order, and kernels written against that meaning must have
no loop-carried dependency. Under the lint, the interpreter runs each ``affine_range`` in a
seeded shuffled order (so a dependency shows up as a wrong result) and records, for each tensor
allocated outside the loop body, which iteration last wrote and which iterations read each
element. Two different iterations touching the same element, at least one of them writing, is a
dependency and raises rule 10. Matmul accumulation into PSUM is associative and may be shared
between iterations (older NKI's own rule), as long as no iteration also reads or overwrites
those elements inside the loop.
"""

from __future__ import annotations

import numpy as np

from .errors import NKIRuleError
from .tensor import Allocation, Selector

NONE, MANY = -1, -2


class ParallelLoop:
    """Per-element access records of one running ``affine_range`` loop under the lint."""

    def __init__(self, body_depth: int):
        self.body_depth = body_depth  # tensors allocated at a smaller depth are shared by iterations
        self.iteration: int | None = None
        self._tracks: dict[int, dict[str, np.ndarray]] = {}

    def _arr(self, alloc: Allocation, kind: str) -> np.ndarray:
        rec = self._tracks.setdefault(alloc.id, {})
        if kind not in rec:
            rec[kind] = np.full(alloc.data.shape, NONE, dtype=np.int32)
        return rec[kind]

    def _peek(self, alloc: Allocation, kind: str) -> np.ndarray | None:
        return self._tracks.get(alloc.id, {}).get(kind)

    def access(self, alloc: Allocation, sel: Selector, mode: str, what: str) -> None:
        """Record an access (mode "r" read, "w" write, "a" accumulate) and raise on a dependency."""
        if alloc.depth >= self.body_depth:
            return  # private to this iteration
        k = self.iteration
        sel = sel.in_bounds()
        checks = {"r": ("w", "a"), "w": ("w", "r", "a"), "a": ("w", "r")}[mode]
        for kind in checks:
            arr = self._peek(alloc, kind)
            if arr is None:
                continue
            seen = sel.get(arr)
            clash = (seen != NONE) & (seen != k)
            if clash.any():
                other = int(seen[clash].flat[0])
                who = "several other iterations" if other == MANY else f"iteration {other}"
                verb = {"w": "wrote", "r": "read", "a": "accumulated into"}[kind]
                raise NKIRuleError(
                    10,
                    f"{what} in iteration {k} touches {alloc.name} elements that {who} {verb}: a loop-carried "
                    "dependency in nl.affine_range, which older NKI ran as a parallel loop (NKI 0.6 runs it in "
                    "order, like range(); write range() or nl.sequential_range to say the order matters)",
                )
        arr = self._arr(alloc, {"r": "r", "w": "w", "a": "a"}[mode])
        if mode == "w":
            sel.set(arr, k)
        else:
            seen = sel.get(arr)
            sel.set(arr, np.where((seen == NONE) | (seen == k), k, MANY))
