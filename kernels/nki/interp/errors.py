"""Errors raised by the NKI interpreter.

A broken hardware rule raises :class:`NKIRuleError`, whose message starts with the rule's number
and name from docs/nki.md, e.g. ``rule 4 (nc_matmul): moving free size 513 > 512``.
Misuse of the API that is not one of the twelve rules raises :class:`NKIError`.
"""

from __future__ import annotations

# The twelve rules of docs/nki.md, by number.
RULES = {
    1: "partition size",
    2: "PSUM capacity",
    3: "SBUF capacity",
    4: "nc_matmul",
    5: "HBM access",
    6: "reduction axis",
    7: "nc_transpose",
    8: "activation bias/scale",
    9: "uninitialized value",
    10: "parallel-loop lint, stricter than NKI",
    11: "bfloat16 storage",
    12: "DMA bounds",
}


class NKIError(Exception):
    """Invalid use of the NKI API (wrong argument, shape mismatch, unsupported form)."""


class NKIRuleError(NKIError):
    """A kernel broke one of the hardware rules the interpreter enforces."""

    def __init__(self, rule: int, detail: str):
        self.rule = rule
        self.rule_name = RULES[rule]
        super().__init__(f"rule {rule} ({self.rule_name}): {detail}")
