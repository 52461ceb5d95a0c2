"""Int8 weights for draft models: per-output-row symmetric quantization and its product.

A draft only proposes tokens; the target's verification decides what is kept, so a draft's
precision changes the acceptance rate and never the distribution of the output. Halving the
bytes a draft step streams is therefore free exactness-wise, and a draft step is memory-bound.

``w[n, :] ~= q[n, :] * scale[n]`` with ``q`` int8 in [-127, 127] and ``scale[n] = max|w[n, :]| / 127``
(round to nearest). The product accumulates ``q * x`` in fp32 (each product exact) and applies
the row's scale once at the end (gemv.c's ``verispec_gemv_i8``); without the native kernels, or
for more rows than a decode step has, it dequantizes to the activation dtype and calls torch.

``w8a8`` keeps the same int8 weights and also rounds the activations to int8, per row and per
block of 64 values along K (scale ``max|x| / 127`` per block), so each block's dot product is an
exact int32 sum (w8a8.c, AVX512-VNNI): a few instructions per weight line instead of a widening
per weight, which lets a draft step stream at the memory's speed. :func:`w8a8_reference` is the
same arithmetic in torch (the fallback and the tests' oracle). Draft-only, like ``int8``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import get_lib
from .linear import MAX_M  # rows per native call (gemv.c's MAX_M)
QUANT_MODES = ("int8", "w8a8")
QB = 64  # activation values per quantization block (w8a8.c's QB)


def quantize_rows(w: torch.Tensor, block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: returns (q int8 [N, K], scale fp32 [N]); an all-zero row gets scale 1.
    Rows are done ``block_rows`` at a time (default: 16M values), each row alone deciding its
    values, so the fp32 temporaries of a large weight (a 151936-row LM head) never exist whole."""
    if w.dim() != 2:
        raise ValueError(f"quantize_rows expects a [N, K] weight, got shape {tuple(w.shape)}")
    block_rows = block_rows or max(1, (1 << 24) // max(1, w.shape[1]))
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for r0 in range(0, w.shape[0], block_rows):
        wf = w.detach()[r0 : r0 + block_rows].to(torch.float32, copy=True)  # divided in place below
        amax = wf.abs().amax(dim=1)  # [rows]; inf or NaN (amax propagates it) where a row holds one
        if not torch.isfinite(amax).all():
            raise ValueError("cannot quantize a weight that holds inf or NaN")
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[r0 : r0 + block_rows] = wf.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[r0 : r0 + block_rows] = s
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale[:, None]).T + bias`` with int8 ``q``; output in the activation dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_rows(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # [N, K]
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        rows = x.numel() // K if K else 0
        lib = get_lib()
        if lib is None or rows == 0 or rows > 4 * MAX_M or x.device.type != "cpu" or x.dtype not in (
            torch.bfloat16, torch.float32
        ):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized(x.dtype), bias)
        return self._native(lib.verispec_gemv_i8, x, rows)

    def _native(self, fn, x: torch.Tensor, rows: int) -> torch.Tensor:
        """y = fn's product of x [..., K] (rows of it, in calls of at most MAX_M rows) with the int8 weights."""
        K, N = self.in_features, self.out_features
        x2 = x if x.is_contiguous() else x.contiguous()
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype).contiguous()
        size, xp, yp = x.element_size(), x2.data_ptr(), y.data_ptr()
        bp, nt, is_bf16 = None if bias is None else bias.data_ptr(), torch.get_num_threads(), int(x.dtype == torch.bfloat16)
        for m0 in range(0, rows, MAX_M):
            rc = fn(xp + m0 * K * size, is_bf16, self.qweight.data_ptr(), self.scale.data_ptr(), bp,
                    yp + m0 * N * size, min(MAX_M, rows - m0), K, N, nt)
            if rc != 0:
                raise MemoryError(f"{fn.__name__}: could not allocate its activation buffers")
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (xq [R, nb, QB] fp32 integers in [-127, 127], xs [R, nb] fp32 block scales),
    K zero-padded to nb * QB; w8a8.c's rounding (x * (127 / max|x|), half to even)."""
    R, K = x.shape
    nb = -(-K // QB)
    xf = F.pad(x.float(), (0, nb * QB - K)).view(R, nb, QB)
    amax = xf.abs().amax(dim=-1)  # [R, nb]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv[..., None]).clamp_(-127, 127)
    return xq, amax / 127.0


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 product in torch: x [..., K] (bf16/fp32), q int8 [N, K], scale [N] -> [..., N] in
    x's dtype. Block dot products are exact (float64 holds them), summed over blocks in float64."""
    K, N = q.shape[1], q.shape[0]
    xq, xs = quantize_activations(x.reshape(-1, K))
    nb = xq.shape[1]
    qb = F.pad(q.double(), (0, nb * QB - K)).view(N, nb, QB)
    dots = torch.einsum("rbk,nbk->rnb", xq.double(), qb)  # [R, N, nb], exact integers
    y = (dots * xs.double()[:, None, :]).sum(-1) * scale.double()  # [R, N]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def w8a8_native() -> bool:
    """Whether the W8A8 product runs natively here: the native kernels built and this CPU has the
    instructions w8a8.c needs (AVX512-VNNI, AVX512-BW). Elsewhere :class:`W8A8Linear` computes
    :func:`w8a8_reference` in torch: the same numbers, slower than a plain bf16 draft."""
    lib = get_lib()
    return lib is not None and bool(lib.verispec_w8a8_available())


class W8A8Linear(Int8Linear):
    """Int8 weights and int8 activations (see the module docstring); output in the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        rows = x.numel() // K if K else 0
        if (not w8a8_native() or rows == 0 or rows > 4 * MAX_M
                or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32)):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return w8a8_reference(x, self.qweight, self.scale, bias)
        return self._native(get_lib().verispec_gemv_w8a8, x, rows)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", int8", ", w8a8")


def forward_linears(decoder: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner, attribute, registered) of each linear layer a forward pass runs: q/k/v, o,
    gate/up and down of every layer, and lm_head (all registered submodules)."""
    out = []
    for layer in decoder.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [(attn, n, True) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(mlp, n, True) for n in ("gate_proj", "up_proj", "down_proj")]
    out.append((decoder, "lm_head", True))
    return out


def quantize_weights(decoder: nn.Module, mode: str) -> int:
    """Replace the linear layers a forward pass runs (:func:`forward_linears`) with
    :class:`Int8Linear` (or :class:`W8A8Linear`); return how many. The embedding table stays in its
    dtype (a step reads one row of it); a tied LM head gets its own int8 copy. Per-row scales, so
    quantizing q, k and v apart gives the rows quantizing them together would."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown weight quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    layers = forward_linears(decoder)
    for owner, attr, _ in layers:
        lin = getattr(owner, attr)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{type(owner).__name__}.{attr} is {type(lin).__name__}; only nn.Linear layers can be quantized")
        setattr(owner, attr, (W8A8Linear if mode == "w8a8" else Int8Linear).from_linear(lin))
    return len(layers)


quantize_weights.modes = QUANT_MODES  # what a kernel backend's ``quantize`` extra accepts
