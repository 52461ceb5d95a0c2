"""Conformance check of a kernel backend against the torch reference.

    report = check_backend("my_backend")      # or a KernelSet
    print(report); assert report.passed

Cases are awkward on purpose: every T from 1 to 16 and prefills of 37 and 130 tokens, cache
lengths that are not a multiple of any tile, head_dim 64 and 128, GQA ratios 1/2/7, rows at
different positions, a token-tree ``active_mask``, fp32 and bf16. Stale cache slots hold large finite garbage, so a
kernel that reads past a row's visible slots gives a wrong answer.

Tolerance (as in flash-attention's tests): the truth is the reference in float64; a backend's
error may be at most ``2 x`` the error of plain PyTorch attention at the same low precision
(matmuls in that dtype, softmax in fp32) plus a few ulps. ``kv_append`` must be bit-exact,
must leave every other slot untouched, and must raise on an out-of-range write.

``kv_gather`` (token trees) is checked only on backends that provide it (``KernelSet.get``); the
report lists it as skipped elsewhere. It must be bit-exact (sources overlapping destinations,
rows with nothing to move, several rows) and must raise, without writing, on an out-of-range slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference
from .registry import KernelSet, get_backend


@dataclass(frozen=True)
class AttnCase:
    B: int
    H: int
    H_kv: int
    T: int
    D: int
    positions: tuple  # one per row
    S_max: int
    tree: bool = False  # use a random (causal-diagonal) active_mask

    def describe(self) -> str:
        g = self.H // self.H_kv
        tree = " tree" if self.tree else ""
        return f"B={self.B} H={self.H}/{self.H_kv}(g{g}) T={self.T} D={self.D} pos={list(self.positions)} S_max={self.S_max}{tree}"


@dataclass(frozen=True)
class AppendCase:
    B: int
    H_kv: int
    T: int
    D: int
    positions: tuple
    S_max: int

    def describe(self) -> str:
        return f"B={self.B} H_kv={self.H_kv} T={self.T} D={self.D} pos={list(self.positions)} S_max={self.S_max}"


@dataclass(frozen=True)
class GatherCase:
    H_kv: int
    D: int
    S_max: int
    src_slots: tuple  # one tuple of N slots per row
    dst_start: tuple
    counts: tuple

    def describe(self) -> str:
        return (f"B={len(self.counts)} H_kv={self.H_kv} D={self.D} S_max={self.S_max} src={[list(r) for r in self.src_slots]} "
                f"dst={list(self.dst_start)} counts={list(self.counts)}")


def default_gather_cases(quick: bool = False) -> list[GatherCase]:
    cases = [
        GatherCase(2, 64, 12, ((9, 8, 7, 6),), (6,), (4,)),  # sources overwritten by earlier destinations
        GatherCase(3, 64, 20, ((3, 5, 9, 0), (1, 2, 3, 4), (19, 0, 7, 7)), (3, 0, 17), (3, 0, 3)),  # a row with none
        GatherCase(8, 128, 40, tuple(tuple(range(39, 23, -1)) for _ in range(2)), (24, 10), (16, 1)),  # to the last slot
    ]
    if not quick:
        cases += [GatherCase(1, 64, 8, ((2, 4, 6),), (2,), (3,)), GatherCase(4, 32, 16, ((5, 1),) * 3, (0, 14, 1), (2, 2, 0))]
    return cases


def default_attention_cases(quick: bool = False) -> list[AttnCase]:
    cases = [
        AttnCase(1, 4, 4, 1, 64, (0,), 8),  # first token, ratio 1
        AttnCase(2, 4, 2, 1, 64, (77, 5), 100),  # decode, rows apart
        AttnCase(3, 14, 2, 5, 64, (509, 0, 250), 530),  # ratio 7, verify T=5
        AttnCase(2, 8, 4, 16, 128, (1100, 33), 1130),  # T=16, D=128, past 1024
        AttnCase(1, 7, 1, 37, 64, (0,), 40),  # prefill, MQA-like ratio 7
        AttnCase(2, 4, 2, 3, 128, (12, 600), 700, True),  # token tree
    ]
    if quick:
        return cases
    for T in (2, 4, 7, 8, 11):
        cases.append(AttnCase(2, 6, 3, T, 64, (513, 3), 530))
    for T in (3, 6, 9, 10, 12, 14, 15):  # with the above, every T in 1..16
        cases.append(AttnCase(1, 4, 2, T, 64, (T + 500,), T + 517))
    cases += [
        AttnCase(1, 2, 2, 1, 128, (4095,), 4096),  # last slot of the cache
        AttnCase(4, 4, 4, 13, 64, (0, 1, 127, 511), 600),
        AttnCase(2, 14, 2, 8, 128, (300, 1000), 1024, True),
        AttnCase(1, 2, 1, 130, 64, (3,), 140),  # prefill of more than 128 tokens after a short prefix
    ]
    return cases


def default_append_cases(quick: bool = False) -> list[AppendCase]:
    cases = [
        AppendCase(1, 2, 1, 64, (0,), 8),
        AppendCase(3, 2, 5, 64, (10, 0, 27), 32),  # rows at different positions
        AppendCase(2, 4, 16, 128, (113, 0), 129),  # write ending on the last slot
    ]
    if not quick:
        cases += [AppendCase(2, 1, 37, 64, (0, 3), 40), AppendCase(4, 3, 2, 128, (1, 9, 4, 0), 11)]
    return cases


@dataclass
class CaseResult:
    kernel: str
    case: str
    dtype: str
    max_err: float
    tol: float
    ok: bool
    note: str = ""


@dataclass
class ConformanceReport:
    backend: str
    results: list[CaseResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # kernels the backend does not provide

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.ok]

    def __str__(self) -> str:
        lines = [f"conformance of backend {self.backend!r}: {'PASS' if self.passed else 'FAIL'}"]
        lines.append(f"  {'kernel':<17}{'dtype':<10}{'max_err':>11}{'tol':>11}  result  case")
        for r in self.results:
            lines.append(
                f"  {r.kernel:<17}{r.dtype:<10}{r.max_err:>11.3g}{r.tol:>11.3g}  {'ok' if r.ok else 'FAIL':<6}  {r.case}"
                + (f"  [{r.note}]" if r.note else "")
            )
        lines += [f"  {k:<17}skipped: not provided by backend {self.backend!r}" for k in self.skipped]
        return "\n".join(lines)


def _naive_low_precision(q, k_cache, v_cache, positions, scale, active_mask):
    """Plain PyTorch attention at the inputs' precision: the baseline error a kernel may have."""
    B, H, T, D = q.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv
    S = int(positions.max()) + T
    k = k_cache[:, :, :S].repeat_interleave(G, dim=1)  # [B, H, S, D]
    v = v_cache[:, :, :S].repeat_interleave(G, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # matmul in q.dtype
    allowed = reference.attention_mask(positions, T, S, active_mask)[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _make_attention_inputs(c: AttnCase, dtype, device, gen):
    q = torch.randn(c.B, c.H, c.T, c.D, generator=gen, dtype=torch.float64)
    k = torch.randn(c.B, c.H_kv, c.S_max, c.D, generator=gen, dtype=torch.float64)
    v = torch.randn(c.B, c.H_kv, c.S_max, c.D, generator=gen, dtype=torch.float64)
    for b, p in enumerate(c.positions):  # stale slots: large finite garbage
        k[b, :, p + c.T :] = 1e4
        v[b, :, p + c.T :] = -1e4
    mask = None
    if c.tree:
        mask = torch.rand(c.B, c.T, c.T, generator=gen) < 0.5
        mask = torch.tril(mask) | torch.eye(c.T, dtype=torch.bool)  # each token sees itself
    pos = torch.tensor(c.positions, dtype=torch.int32)
    cast = lambda x: x.to(dtype).to(device)  # noqa: E731
    return (q, k, v, pos, mask), (cast(q), cast(k), cast(v), pos.to(device), None if mask is None else mask.to(device))


def _check_attention(ks: KernelSet, c: AttnCase, dtype, device, gen) -> CaseResult:
    (q, k, v, pos, mask), (ql, kl, vl, posl, maskl) = _make_attention_inputs(c, dtype, device, gen)
    scale = c.D**-0.5
    # truth: the reference on the low-precision values, computed in float64
    truth = reference.verify_attention(ql.double().cpu(), kl.double().cpu(), vl.double().cpu(), pos, scale, mask)
    base = _naive_low_precision(ql.cpu(), kl.cpu(), vl.cpu(), pos, scale, mask).double()
    base_err = (base - truth).abs().max().item()
    eps = torch.finfo(dtype).eps
    tol = 2.0 * base_err + eps * truth.abs().max().item()  # 2x baseline + one ulp of the output
    name = str(dtype).replace("torch.", "")
    try:
        out = ks.verify_attention(ql, kl, vl, posl, scale, maskl)
    except Exception as e:  # a crash is a failure with its reason
        return CaseResult("verify_attention", c.describe(), name, float("nan"), tol, False, f"{type(e).__name__}: {e}")
    if tuple(out.shape) != (c.B, c.H, c.T, c.D) or out.dtype != dtype:
        return CaseResult("verify_attention", c.describe(), name, float("nan"), tol, False, f"got {tuple(out.shape)} {out.dtype}")
    err = (out.double().cpu() - truth).abs().max().item()
    ok = err <= tol  # NaN compares False
    return CaseResult("verify_attention", c.describe(), name, err, tol, ok)


def _check_append(ks: KernelSet, c: AppendCase, dtype, device, gen) -> list[CaseResult]:
    name = str(dtype).replace("torch.", "")
    kc = torch.randn(c.B, c.H_kv, c.S_max, c.D, generator=gen).to(dtype)
    vc = torch.randn(c.B, c.H_kv, c.S_max, c.D, generator=gen).to(dtype)
    kn = torch.randn(c.B, c.H_kv, c.T, c.D, generator=gen).to(dtype)
    vn = torch.randn(c.B, c.H_kv, c.T, c.D, generator=gen).to(dtype)
    pos = torch.tensor(c.positions, dtype=torch.int32)
    ek, ev = kc.clone(), vc.clone()
    reference.kv_append(ek, ev, kn, vn, pos)
    gk, gv = kc.clone().to(device), vc.clone().to(device)
    results = []
    try:
        ks.kv_append(gk, gv, kn.to(device), vn.to(device), pos.to(device))
        err = max((gk.cpu().float() - ek.float()).abs().max().item(), (gv.cpu().float() - ev.float()).abs().max().item())
        results.append(CaseResult("kv_append", c.describe(), name, err, 0.0, err == 0.0))
    except Exception as e:
        results.append(CaseResult("kv_append", c.describe(), name, float("nan"), 0.0, False, f"{type(e).__name__}: {e}"))
    # an out-of-range write must raise, never write silently
    bad = list(c.positions)
    bad[-1] = c.S_max - c.T + 1
    try:
        ks.kv_append(gk, gv, kn.to(device), vn.to(device), torch.tensor(bad, dtype=torch.int32).to(device))
        raised = False
    except Exception:
        raised = True
    results.append(
        CaseResult("kv_append(oob)", c.describe(), name, 0.0, 0.0, raised, "" if raised else "out-of-range write did not raise")
    )
    return results


def _check_gather(ks: KernelSet, c: GatherCase, dtype, device, gen) -> list[CaseResult]:
    name = str(dtype).replace("torch.", "")
    B, N = len(c.counts), len(c.src_slots[0])
    kc = torch.randn(B, c.H_kv, c.S_max, c.D, generator=gen).to(dtype)  # [B, H_kv, S_max, D]
    vc = torch.randn(B, c.H_kv, c.S_max, c.D, generator=gen).to(dtype)
    args = [torch.tensor(c.src_slots, dtype=torch.int32).reshape(B, N), torch.tensor(c.dst_start, dtype=torch.int32),
            torch.tensor(c.counts, dtype=torch.int32)]
    ek, ev = kc.clone(), vc.clone()
    reference.kv_gather(ek, ev, *args)
    gk, gv = kc.clone().to(device), vc.clone().to(device)
    results = []
    try:
        ks.get("kv_gather")(gk, gv, *(a.to(device) for a in args))
        err = max((gk.cpu().float() - ek.float()).abs().max().item(), (gv.cpu().float() - ev.float()).abs().max().item())
        results.append(CaseResult("kv_gather", c.describe(), name, err, 0.0, err == 0.0))
    except Exception as e:
        results.append(CaseResult("kv_gather", c.describe(), name, float("nan"), 0.0, False, f"{type(e).__name__}: {e}"))
    # an out-of-range source slot must raise and leave the caches alone
    b = max(range(B), key=lambda r: c.counts[r])
    bad = args[0].clone()
    bad[b, c.counts[b] - 1] = c.S_max
    gk, gv = kc.clone().to(device), vc.clone().to(device)
    try:
        ks.get("kv_gather")(gk, gv, bad.to(device), args[1].to(device), args[2].to(device))
        note = "out-of-range slot did not raise"
    except Exception:
        note = "" if torch.equal(gk.cpu(), kc) and torch.equal(gv.cpu(), vc) else "raised after writing"
    results.append(CaseResult("kv_gather(oob)", c.describe(), name, 0.0, 0.0, not note, note))
    return results


def check_gather_case(backend: str | KernelSet, case: GatherCase, dtype=torch.float32, device: str = "cpu",
                      seed: int = 0) -> list[CaseResult]:
    """One kv_gather case (bit-exact move, then an out-of-range source that must raise)."""
    ks = backend if isinstance(backend, KernelSet) else get_backend(backend, device=device)
    return _check_gather(ks, case, dtype, device, torch.Generator().manual_seed(seed))


def check_attention_case(backend: str | KernelSet, case: AttnCase, dtype=torch.float32, device: str = "cpu",
                         seed: int = 0) -> CaseResult:
    """One verify_attention case against the reference (random inputs from ``seed``)."""
    ks = backend if isinstance(backend, KernelSet) else get_backend(backend, device=device)
    return _check_attention(ks, case, dtype, device, torch.Generator().manual_seed(seed))


def check_append_case(backend: str | KernelSet, case: AppendCase, dtype=torch.float32, device: str = "cpu",
                      seed: int = 0) -> list[CaseResult]:
    """One kv_append case (bit-exact write, then an out-of-range write that must raise)."""
    ks = backend if isinstance(backend, KernelSet) else get_backend(backend, device=device)
    return _check_append(ks, case, dtype, device, torch.Generator().manual_seed(seed))


def check_backend(
    backend: str | KernelSet,
    *,
    device: str = "cpu",
    dtypes=(torch.float32, torch.bfloat16),
    attention_cases: list[AttnCase] | None = None,
    append_cases: list[AppendCase] | None = None,
    gather_cases: list[GatherCase] | None = None,
    quick: bool = False,
    seed: int = 0,
) -> ConformanceReport:
    """Run ``backend`` against the torch reference on awkward shapes; return a readable report.
    ``kv_gather`` is checked where the backend provides it, else listed as skipped."""
    ks = backend if isinstance(backend, KernelSet) else get_backend(backend, device=device)
    attention_cases = default_attention_cases(quick) if attention_cases is None else attention_cases
    append_cases = default_append_cases(quick) if append_cases is None else append_cases
    gather_cases = default_gather_cases(quick) if gather_cases is None else gather_cases
    report = ConformanceReport(ks.name)
    if ks.get("kv_gather") is None:
        report.skipped.append("kv_gather")
        gather_cases = []
    gen = torch.Generator().manual_seed(seed)
    for dtype in dtypes:
        for c in attention_cases:
            report.results.append(_check_attention(ks, c, dtype, device, gen))
        for c in append_cases:
            report.results.extend(_check_append(ks, c, dtype, device, gen))
        for c in gather_cases:
            report.results.extend(_check_gather(ks, c, dtype, device, gen))
    return report
