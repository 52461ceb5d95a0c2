"""The Python mirror of step.h: the typed arguments of the native decoder step.

``VsLinear``, ``VsLayer`` and ``VsStep`` are ``ctypes.Structure`` copies of the C structs in
step.h. :func:`check_layout` compares every struct's size and every field's offset and size with
the table the compiled library reports (``verispec_abi``) and refuses a library that disagrees,
so a field changed on one side only fails at load instead of corrupting memory.
"""

from __future__ import annotations

import ctypes

i64, f32, i32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p


class VsLinear(ctypes.Structure):
    _fields_ = [("kind", i64), ("weight", vp), ("scale", vp), ("bias", vp), ("n", i64), ("k", i64)]


class VsLayer(ctypes.Structure):
    _fields_ = [
        ("norm_in", vp), ("norm_post", vp),
        ("qkv", VsLinear), ("o", VsLinear), ("gate_up", VsLinear), ("down", VsLinear),
        ("k_cache", vp), ("v_cache", vp),
        ("F", i64),
        ("eps_in", f32), ("eps_post", f32), ("attn_scale", f32),
    ]


class VsStep(ctypes.Structure):
    _fields_ = [
        ("x", vp), ("cos", vp), ("sin", vp), ("cos_table", vp), ("sin_table", vp),
        ("positions", vp), ("mask", vp), ("ids", vp), ("embed", vp), ("norm", vp), ("y", vp),
        ("B", i64), ("T", i64), ("E", i64), ("H", i64), ("H_kv", i64), ("D", i64), ("S_max", i64), ("V", i64),
        ("n_layers", i64), ("failed", i64),
        ("norm_eps", f32), ("bf16", i32), ("threads", i32),
    ]


STRUCTS = {"vs_linear": VsLinear, "vs_layer": VsLayer, "vs_step": VsStep}


class VsField(ctypes.Structure):
    _fields_ = [("type", ctypes.c_char_p), ("field", ctypes.c_char_p), ("offset", i64), ("size", i64)]


class ABIMismatch(RuntimeError):
    """The compiled library's structs differ from this module's mirror of step.h."""


def python_layout() -> dict[tuple[str, str], tuple[int, int]]:
    """{(struct, field or ""): (offset, size)} of the ctypes mirror."""
    out = {}
    for name, cls in STRUCTS.items():
        out[(name, "")] = (0, ctypes.sizeof(cls))
        for field, _ in cls._fields_:
            d = getattr(cls, field)
            out[(name, field)] = (d.offset, d.size)
    return out


def library_layout(lib) -> dict[tuple[str, str], tuple[int, int]]:
    """The same table as the library reports it (``verispec_abi``)."""
    table = ctypes.POINTER(VsField)()
    n = lib.verispec_abi(ctypes.byref(table))
    return {(table[i].type.decode(), table[i].field.decode()): (table[i].offset, table[i].size) for i in range(n)}


def check_layout(lib) -> None:
    """Raise :class:`ABIMismatch` naming every struct or field whose size or offset differs, or
    that exists on one side only."""
    py, c = python_layout(), library_layout(lib)
    bad = [f"{t}.{f or '<size>'}: C {c.get((t, f))} vs Python {py.get((t, f))}"
           for (t, f) in sorted(set(py) | set(c)) if py.get((t, f)) != c.get((t, f))]
    if bad:
        raise ABIMismatch("kernels/cpu/step.h and kernels/cpu/abi.py disagree (offset, size): " + "; ".join(bad))


def bind_step(lib) -> None:
    """Declare ``verispec_abi`` and ``verispec_step`` on ``lib`` and check the struct layout."""
    lib.verispec_abi.argtypes = [ctypes.POINTER(ctypes.POINTER(VsField))]
    lib.verispec_abi.restype = i64
    check_layout(lib)
    lib.verispec_step.argtypes = [ctypes.POINTER(VsStep), ctypes.POINTER(VsLayer)]
    lib.verispec_step.restype = ctypes.c_int
