"""Math operators shared by ``nki.language`` (as functions) and ``nki.isa`` (as the ``op``
arguments of instructions), e.g. ``nisa.tensor_tensor(dst, a, b, op=nl.add)``."""

from __future__ import annotations

import numpy as np


def _silu(x):
    return x / (1.0 + np.exp(-x))


class MathOp:
    """A named operator: binary (a, b), unary (x) and/or a free-axis reduction."""

    def __init__(self, name: str, binary=None, unary=None, reduce=None):
        self.name = name
        self.binary = binary
        self.unary = unary
        self.reduce = reduce  # NumPy ufunc whose .reduce folds along axes

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def __call__(self, *args, **kwargs):
        from . import language  # the high-level form of this operator (returns a new tile)

        return language.call_op(self, *args, **kwargs)



add = MathOp("add", binary=np.add, reduce=np.add)
subtract = MathOp("subtract", binary=np.subtract)
multiply = MathOp("multiply", binary=np.multiply, reduce=np.multiply)
divide = MathOp("divide", binary=np.divide)
maximum = MathOp("maximum", binary=np.maximum, reduce=np.maximum)
minimum = MathOp("minimum", binary=np.minimum, reduce=np.minimum)
# comparisons give 1.0 where true and 0.0 where false
equal = MathOp("equal", binary=lambda a, b: np.equal(a, b).astype(np.float32))
not_equal = MathOp("not_equal", binary=lambda a, b: np.not_equal(a, b).astype(np.float32))
greater = MathOp("greater", binary=lambda a, b: np.greater(a, b).astype(np.float32))
greater_equal = MathOp("greater_equal", binary=lambda a, b: np.greater_equal(a, b).astype(np.float32))
less = MathOp("less", binary=lambda a, b: np.less(a, b).astype(np.float32))
less_equal = MathOp("less_equal", binary=lambda a, b: np.less_equal(a, b).astype(np.float32))
exp = MathOp("exp", unary=np.exp)
reciprocal = MathOp("reciprocal", unary=lambda x: 1.0 / x)
rsqrt = MathOp("rsqrt", unary=lambda x: 1.0 / np.sqrt(x))
silu = MathOp("silu", unary=_silu)
copy = MathOp("copy", unary=lambda x: x)
# free-axis reductions (nl.max / nl.sum); also accepted as a tensor_reduce op
max = MathOp("max", reduce=np.maximum)  # noqa: A001 - NKI's name
sum = MathOp("sum", reduce=np.add)  # noqa: A001 - NKI's name

ALL = [add, subtract, multiply, divide, maximum, minimum, equal, not_equal, greater, greater_equal, less, less_equal,
       exp, reciprocal, rsqrt, silu, copy, max, sum]
