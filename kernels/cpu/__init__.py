"""Native CPU kernels for decode: skinny matrix products that stream each weight once.

``gemv.c`` is compiled on first use with the system C compiler (no torch headers, about a
second) into ``$VERISPEC_HOME/build`` and called through ctypes. Where no compiler is found
or the build fails, :func:`available` is False and callers keep torch's own kernels.
"""

from .linear import SkinnyLinear, available, build_info, skinny_linear, stream_read, use_skinny_linear

__all__ = ["SkinnyLinear", "available", "build_info", "skinny_linear", "stream_read", "use_skinny_linear"]
