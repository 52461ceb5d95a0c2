"""Math operators shared by ``nki.language`` (as functions) and ``nki.isa`` (as the ``op``
arguments of instructions), e.g. ``nisa.tensor_tensor(dst, a, b, op=nl.add)``.

Arithmetic operators compute in float32 (the engines convert every input element to float32);
bitvec operators (``bitwise_*``, ``invert``, shifts) work on integer bit patterns. Activation
functions use their textbook formulas in float32; the Scalar Engine approximates them with
piecewise polynomials, so hardware results differ in the last bits (NKI's table of activation
functions gives each one's valid input range).
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
    return x * _sigmoid(x)


def _silu_dx(x):
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_dx(x):  # d/dx x * Phi(x) = Phi(x) + x * phi(x)
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_sigmoid(x):
    return x * _sigmoid(1.702 * x)


def _gelu_sigmoid_dx(x):
    s = _sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _int_op(fn):
    def run(a, b=None):
        if b is None:
            return fn(np.asarray(a))
        return fn(np.asarray(a), np.asarray(b))
    return run


def _abs_pick(pick):
    def run(a, b):
        a, b = np.broadcast_arrays(a, b)
        return np.where(pick(np.abs(a), np.abs(b)), a, b)
    return run


class MathOp:
    """A named operator: binary (a, b), unary (x) and/or a free-axis reduction."""

    def __init__(self, name: str, binary=None, unary=None, reduce=None, bitvec: bool = False, identity=None):
        self.name = name
        self.binary = binary
        self.unary = unary
        self.reduce = reduce  # NumPy ufunc whose .reduce folds along axes
        self.bitvec = bitvec  # integer bit-pattern operator (no float32 conversion)
        self.identity = identity  # the value a reduction starts from (accumulator reset)

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def __call__(self, *args, **kwargs):
        from . import language  # the high-level form of this operator (returns a new tile)

        return language.call_op(self, *args, **kwargs)



add = MathOp("add", binary=np.add, reduce=np.add, identity=0.0)
subtract = MathOp("subtract", binary=np.subtract, reduce=np.subtract)
multiply = MathOp("multiply", binary=np.multiply, reduce=np.multiply, identity=1.0)
divide = MathOp("divide", binary=np.divide)
maximum = MathOp("maximum", binary=np.maximum, reduce=np.maximum, identity=-np.inf)
minimum = MathOp("minimum", binary=np.minimum, reduce=np.minimum, identity=np.inf)
power = MathOp("power", binary=np.power)
abs_max = MathOp("abs_max", binary=_abs_pick(np.greater))
abs_min = MathOp("abs_min", binary=_abs_pick(np.less))
fmod = MathOp("fmod", binary=np.fmod)
mod = MathOp("mod", binary=np.mod)
logical_and = MathOp("logical_and", binary=lambda a, b: np.logical_and(a, b).astype(np.float32), reduce=np.logical_and)
logical_or = MathOp("logical_or", binary=lambda a, b: np.logical_or(a, b).astype(np.float32), reduce=np.logical_or)
logical_xor = MathOp("logical_xor", binary=lambda a, b: np.logical_xor(a, b).astype(np.float32), reduce=np.logical_xor)
logical_not = MathOp("logical_not", unary=lambda x: np.logical_not(x).astype(np.float32))
# bitvec operators: integer operands only
bitwise_and = MathOp("bitwise_and", binary=_int_op(np.bitwise_and), reduce=np.bitwise_and, bitvec=True)
bitwise_or = MathOp("bitwise_or", binary=_int_op(np.bitwise_or), reduce=np.bitwise_or, bitvec=True)
bitwise_xor = MathOp("bitwise_xor", binary=_int_op(np.bitwise_xor), reduce=np.bitwise_xor, bitvec=True)
left_shift = MathOp("left_shift", binary=_int_op(np.left_shift), bitvec=True)
right_shift = MathOp("right_shift", binary=_int_op(np.right_shift), bitvec=True)
invert = MathOp("invert", unary=_int_op(np.invert), bitvec=True)
# comparisons give 1.0 where true and 0.0 where false
equal = MathOp("equal", binary=lambda a, b: np.equal(a, b).astype(np.float32))
not_equal = MathOp("not_equal", binary=lambda a, b: np.not_equal(a, b).astype(np.float32))
greater = MathOp("greater", binary=lambda a, b: np.greater(a, b).astype(np.float32))
greater_equal = MathOp("greater_equal", binary=lambda a, b: np.greater_equal(a, b).astype(np.float32))
less = MathOp("less", binary=lambda a, b: np.less(a, b).astype(np.float32))
less_equal = MathOp("less_equal", binary=lambda a, b: np.less_equal(a, b).astype(np.float32))
exp = MathOp("exp", unary=np.exp)
log = MathOp("log", unary=np.log)
sqrt = MathOp("sqrt", unary=np.sqrt)
reciprocal = MathOp("reciprocal", unary=lambda x: 1.0 / x)
rsqrt = MathOp("rsqrt", unary=lambda x: 1.0 / np.sqrt(x))
abs = MathOp("abs", unary=np.abs)  # noqa: A001 - NKI's name
square = MathOp("square", unary=np.square)
negative = MathOp("negative", unary=np.negative)
sign = MathOp("sign", unary=np.sign)
ceil = MathOp("ceil", unary=np.ceil)
floor = MathOp("floor", unary=np.floor)
trunc = MathOp("trunc", unary=np.trunc)
sin = MathOp("sin", unary=np.sin)
cos = MathOp("cos", unary=np.cos)
tan = MathOp("tan", unary=np.tan)
arctan = MathOp("arctan", unary=np.arctan)
tanh = MathOp("tanh", unary=np.tanh)
sigmoid = MathOp("sigmoid", unary=_sigmoid)
relu = MathOp("relu", unary=lambda x: np.maximum(x, 0.0))
silu = MathOp("silu", unary=_silu)
silu_dx = MathOp("silu_dx", unary=_silu_dx)
gelu = MathOp("gelu", unary=_gelu)
gelu_dx = MathOp("gelu_dx", unary=_gelu_dx)
gelu_apprx_tanh = MathOp("gelu_apprx_tanh", unary=_gelu_tanh)
gelu_apprx_sigmoid = MathOp("gelu_apprx_sigmoid", unary=_gelu_sigmoid)
gelu_apprx_sigmoid_dx = MathOp("gelu_apprx_sigmoid_dx", unary=_gelu_sigmoid_dx)
softplus = MathOp("softplus", unary=_softplus)
mish = MathOp("mish", unary=lambda x: x * np.tanh(_softplus(x)))
erf = MathOp("erf", unary=_erf)
erf_dx = MathOp("erf_dx", unary=lambda x: 2.0 / math.sqrt(math.pi) * np.exp(-x * x))
copy = MathOp("copy", unary=lambda x: x)
# free-axis reductions (nl.max / nl.min / nl.sum / nl.prod); also accepted as a tensor_reduce op
max = MathOp("max", reduce=np.maximum, identity=-np.inf)  # noqa: A001 - NKI's name
min = MathOp("min", reduce=np.minimum, identity=np.inf)  # noqa: A001 - NKI's name
sum = MathOp("sum", reduce=np.add, identity=0.0)  # noqa: A001 - NKI's name
prod = MathOp("prod", reduce=np.multiply, identity=1.0)

ALL = [v for v in list(globals().values()) if isinstance(v, MathOp)]
__all__ = [op.name for op in ALL]
