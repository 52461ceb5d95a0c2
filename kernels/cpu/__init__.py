"""Native CPU kernels for decode: skinny matrix products that stream each weight once
(gemv.c), compiled on first use (see build.py), and a streaming-read bandwidth probe."""

from .build import available, build_info
from .linear import SkinnyLinear, skinny_linear, stream_read

__all__ = ["SkinnyLinear", "available", "build_info", "skinny_linear", "stream_read"]
