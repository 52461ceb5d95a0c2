"""NKI dtypes as NumPy dtypes; bfloat16 and the fp8 types come from ml_dtypes, so a bf16 or fp8
tensor really stores values of that type (every write rounds to nearest even, rule 11).

fp8 (NKI 0.6 names -> ml_dtypes):
- ``float8_e4m3``: NKI's legacy Trainium FP8 "FP8_EXP4 (IEEE-754)", with infinities and NaN,
  largest finite value 240 -> ``ml_dtypes.float8_e4m3`` (not the OCP ``e4m3fn``, which reaches 448).
- ``float8_e4m3fn``: OCP FP8 E4M3 (no infinities; NaN is S.1111.111), largest 448 -> ``float8_e4m3fn``.
- ``float8_e5m2``: IEEE-like, largest 57344 -> ``float8_e5m2``.
- ``float8_e8m0fnu``: the MX scale type (powers of two) -> ``float8_e8m0fnu``.
A float value beyond a type's range becomes inf (or NaN where the type has no inf), as ml_dtypes
converts; float -> integer conversions round to nearest even and saturate (as NKI 0.6's simulator).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import NKIError

float32 = np.dtype(np.float32)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
float8_e8m0fnu = np.dtype(ml_dtypes.float8_e8m0fnu)
int32 = np.dtype(np.int32)
int16 = np.dtype(np.int16)
uint16 = np.dtype(np.uint16)
uint32 = np.dtype(np.uint32)
int8 = np.dtype(np.int8)
uint8 = np.dtype(np.uint8)
bool_ = np.dtype(np.bool_)

_BY_NAME = {
    "float32": float32, "bfloat16": bfloat16, "float16": float16, "int32": int32, "uint32": uint32,
    "int16": int16, "uint16": uint16, "int8": int8, "uint8": uint8, "bool": bool_, "bool_": bool_,
    "float8_e4m3": float8_e4m3, "float8_e4m3fn": float8_e4m3fn, "float8_e5m2": float8_e5m2,
    "float8_e8m0fnu": float8_e8m0fnu,
}
FLOATS = frozenset({float32, bfloat16, float16, float8_e4m3, float8_e4m3fn, float8_e5m2, float8_e8m0fnu})
FP8 = frozenset({float8_e4m3, float8_e4m3fn, float8_e5m2})
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
    return dt in FLOATS


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
    if v.dtype.kind == "f" or v.dtype in FLOATS:
        info = np.iinfo(dt)
        v = np.clip(np.rint(v.astype(np.float64)), info.min, info.max)
        v = np.where(np.isnan(v), 0, v)
    return v.astype(dt)
