"""``nki.isa`` enums and target queries (NKI 0.6): engines, DMA descriptor modes, reduce commands,
matmul performance modes, NeuronCore versions.

Engine members are the engine names the interpreter counts instructions under. The DMA and
performance knobs (``dge_mode``, ``dma_engine``, ``priority``, ``matmul_perf_mode.none``) are
accepted and change nothing in the results, as on hardware they change only speed.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from .errors import NKIError


class engine:  # noqa: N801 - NKI's enum name
    unknown = None  # let the compiler choose (the interpreter picks the instruction's usual engine)
    tensor = "tensor"
    vector = "vector"
    scalar = "scalar"
    gpsimd = "gpsimd"
    dma = "dma"
    sync = "sync"


# deprecated module-level aliases, still used by kernels (nisa.vector_engine, ...)
tensor_engine, vector_engine, scalar_engine, gpsimd_engine, unknown_engine = (
    engine.tensor, engine.vector, engine.scalar, engine.gpsimd, engine.unknown)


class oob_mode:  # noqa: N801
    error = "error"
    skip = "skip"


class dge_mode(Enum):  # noqa: N801 - descriptor generation: changes speed only
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class reduce_cmd(Enum):  # noqa: N801 - what an instruction does with its engine's reduce registers
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class matmul_perf_mode(Enum):  # noqa: N801
    none = "none"
    double_row = "double_row"


class dma_engine(Enum):  # noqa: N801
    dma = 1
    gpsimd_dma = 2


class nc_version(IntEnum):  # noqa: N801 - NeuronCore generation of a target
    gen2 = 2  # trn1 / inf2
    gen3 = 3  # trn2
    gen4 = 4  # trn3


_NC_VERSION = {"trn1": nc_version.gen2, "trn2": nc_version.gen3, "trn3": nc_version.gen4}


def target_name() -> str:
    """The target of the running kernel, or (outside one, e.g. at import) of the default options."""
    from . import context, runtime

    if context._stack:
        t = context._stack[-1].target
        return getattr(t, "name", t)
    return runtime._defaults.target


def get_nc_version() -> nc_version:
    name = target_name()
    if name not in _NC_VERSION:
        raise NKIError(f"no NeuronCore version known for target {name!r}")
    return _NC_VERSION[name]


def get_nc_sub_version() -> int:
    return 0


def engine_of(requested, default: str, allowed=("tensor", "vector", "scalar", "gpsimd")) -> str:
    """The engine an instruction runs on: the requested one if it may run there, else ``default``."""
    if requested in (None, "unknown"):
        return default
    if requested not in allowed:
        raise NKIError(f"engine {requested!r} cannot run this instruction (allowed: {', '.join(allowed)})")
    return requested
