"""NKI dtypes as NumPy dtypes; bfloat16 comes from ml_dtypes, so a bf16 tensor really stores
bf16 values (every write rounds to nearest even, rule 11)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import NKIError

float32 = np.dtype(np.float32)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
int32 = np.dtype(np.int32)
uint32 = np.dtype(np.uint32)
int8 = np.dtype(np.int8)
uint8 = np.dtype(np.uint8)
bool_ = np.dtype(np.bool_)

_BY_NAME = {
    "float32": float32, "bfloat16": bfloat16, "float16": float16, "int32": int32, "uint32": uint32,
    "int8": int8, "uint8": uint8, "bool": bool_, "bool_": bool_,
}
SUPPORTED = frozenset(_BY_NAME.values())


def as_dtype(dtype) -> np.dtype:
    """Normalize a dtype given as a NumPy dtype/type or an NKI dtype name."""
    if isinstance(dtype, str):
        try:
            return _BY_NAME[dtype]
        except KeyError:
            raise NKIError(f"unsupported dtype {dtype!r}; supported: {sorted(_BY_NAME)}") from None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise NKIError(f"not a dtype: {dtype!r}") from None
    if dt not in SUPPORTED:
        raise NKIError(f"unsupported dtype {dt}; supported: {sorted(_BY_NAME)}")
    return dt


def is_float(dt: np.dtype) -> bool:
    return dt in (float32, bfloat16, float16)


def fill_value(dt: np.dtype):
    """What a fresh on-chip allocation holds (rule 9): NaN for floats, a sentinel for ints."""
    if is_float(dt):
        return np.nan
    if dt == bool_:
        return True
    info = np.iinfo(dt)
    return info.min if info.min < 0 else info.max


def cast(values: np.ndarray, dt: np.dtype) -> np.ndarray:
    """Cast computed values (float32 math) to a destination dtype; ints round to nearest."""
    if is_float(dt) or dt == bool_:
        return np.asarray(values).astype(dt)
    v = np.asarray(values)
    if v.dtype.kind == "f":
        v = np.rint(v)
    return v.astype(dt)
