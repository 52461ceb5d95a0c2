"""``verispec bench kernels-cuda``: roofline of the Triton verify-attention kernel on a CUDA GPU.

For each T (query tokens per row) and cache length L it reports
  * kernel time (``triton.testing.do_bench``: CUDA events, L2 flushed before every call, median);
  * achieved GB/s against the minimum bytes the kernel must move (K and V of the L visible
    slots, q in, out back, positions), and that as a fraction of the device-to-device copy
    bandwidth measured in the same run;
  * the time of PyTorch's ``scaled_dot_product_attention`` doing the same work (bottom-right
    causal ``CausalBias``; GQA both via ``enable_gqa`` and with K/V pre-expanded to H heads; the
    faster one is the baseline) and the ratio SDPA / Triton (> 1: Triton is faster);
  * the cost of a k=5 verify pass relative to a one-token decode: at kernel level, and for a
    whole decoder step of the Qwen2.5-Coder-1.5B shape (random weights: the step time depends on
    shapes only), with the triton and the torch kernel backends.
Results: kernels_cuda.json and kernels_cuda.png in --out.
"""

from __future__ import annotations

import math

import torch

from .common import measure_memory_bandwidth, results_dir, time_fn, write_json

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# Qwen2.5-Coder-1.5B-Instruct's config.json (the target of the Qwen pair)
QWEN_1_5B_SHAPE = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
    max_position_embeddings=32768, rms_norm_eps=1e-6, model_type="qwen2",
)
GOAL_SDPA_RATIO = 1.0  # Triton at least as fast as SDPA at every size
GOAL_COPY_FRACTION = 0.70  # above 70% of copy bandwidth at L >= 4096
GOAL_VERIFY_OVER_DECODE = 1.2  # k=5 verify pass at most 1.2x a one-token decode step


def min_bytes(B: int, H: int, H_kv: int, T: int, D: int, L: int, elem: int) -> int:
    """Bytes verify_attention cannot avoid moving: K and V of L slots, q read, out written, positions."""
    return 2 * B * H_kv * L * D * elem + 2 * B * H * T * D * elem + B * 8


def make_inputs(B, H, H_kv, T, D, L, dtype, device, seed=0):
    """q [B, H, T, D] and caches [B, H_kv, L, D] holding L valid slots; every row at position L - T."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, H_kv, L, D, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, H_kv, L, D, generator=gen).to(device=device, dtype=dtype)
    positions = torch.full((B,), L - T, dtype=torch.int32, device=device)
    return q, k, v, positions


def sdpa_variants(q, k, v, T: int, scale: float) -> dict:
    """PyTorch SDPA doing the verify pass's work, as callables by variant name."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    L = k.shape[2]
    G = q.shape[1] // k.shape[1]
    mask = None if T == 1 else causal_lower_right(T, L)  # query t sees slots 0 .. L - T + t
    k_rep, v_rep = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [B, H, L, D], made once
    return {
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
        "sdpa_expanded_kv": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask, scale=scale),
    }


def make_timer(device: str):
    """Seconds per call: do_bench on CUDA (GPU time, cold L2); wall time elsewhere (smoke tests)."""
    if str(device).startswith("cuda"):
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return lambda fn: time_fn(fn, warmup=1, repeats=2, device=device)["median_s"]


def attention_rows(Ts, Ls, *, B, H, H_kv, D, dtype, device, copy_GBps, timer) -> list[dict]:
    """One row per (T, L): Triton and SDPA times, achieved bandwidth, agreement of the outputs."""
    from verispec.kernels.triton import verify_attention

    rows = []
    scale = D**-0.5
    elem = torch.finfo(dtype).bits // 8
    for L in Ls:
        for T in Ts:
            if T > L:
                continue
            q, k, v, pos = make_inputs(B, H, H_kv, T, D, L, dtype, device)
            triton_call = lambda: verify_attention(q, k, v, pos, scale)  # noqa: E731
            out = triton_call()
            row = dict(T=T, L=L, B=B, H=H, H_kv=H_kv, D=D, dtype=str(dtype).replace("torch.", ""))
            row["triton_s"] = timer(triton_call)
            for name, fn in sdpa_variants(q, k, v, T, scale).items():
                try:
                    diff = (fn().float() - out.float()).abs().max().item()
                    row[f"{name}_s"], row[f"{name}_max_abs_diff"] = timer(fn), diff
                except RuntimeError as e:  # a variant this torch build/GPU cannot run
                    row[f"{name}_s"], row[f"{name}_error"] = None, str(e).splitlines()[0]
            sdpa = [row[f"{n}_s"] for n in ("sdpa_gqa", "sdpa_expanded_kv") if row.get(f"{n}_s")]
            row["sdpa_best_s"] = min(sdpa) if sdpa else None
            row["sdpa_over_triton"] = row["sdpa_best_s"] / row["triton_s"] if sdpa else None
            row["min_bytes"] = min_bytes(B, H, H_kv, T, D, L, elem)
            row["triton_GBps"] = row["min_bytes"] / row["triton_s"] / 1e9
            row["fraction_of_copy_bw"] = row["triton_GBps"] / copy_GBps
            rows.append(row)
    return rows


def verify_over_decode(rows: list[dict], k: int = 5) -> list[dict]:
    """Kernel-level cost of a k-token verify pass over a one-token decode, per cache length."""
    by = {(r["T"], r["L"]): r["triton_s"] for r in rows}
    return [
        dict(L=L, k=k, decode_s=by[(1, L)], verify_s=by[(k, L)], ratio=by[(k, L)] / by[(1, L)])
        for L in sorted({r["L"] for r in rows}) if (1, L) in by and (k, L) in by
    ]


def model_step_rows(Ls, *, k: int, dtype, device, backends, shape: dict, timer_repeats: int = 10) -> list[dict]:
    """Whole decoder step (wall time, host overheads included): T=k verify vs T=1 decode."""
    from verispec.kernels import get_backend
    from verispec.model.config import LlamaConfig
    from verispec.model.decoder import Decoder
    from verispec.model.for_sampling import LlamaForSampling

    config = LlamaConfig(**shape)
    n_positions = max(Ls) + k
    with torch.device(device):
        decoder = Decoder(config, n_positions)  # random weights
    rope = (decoder.rope_cos.to(device), decoder.rope_sin.to(device))  # RoPE tables stay fp32
    decoder = decoder.to(dtype).eval()
    decoder.rope_cos, decoder.rope_sin = rope
    amp = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dtype]
    rows = []
    for backend in backends:
        model = LlamaForSampling(decoder, n_positions=n_positions, batch_size=1, amp=amp,
                                 kernels=get_backend(backend), device=device)
        for L in Ls:
            step = {}
            for T in (1, k):
                ids = torch.zeros(1, T, dtype=torch.long, device=device)
                pos = torch.tensor([L - T], device=device)
                step[T] = time_fn(lambda: model.forward(ids, pos), warmup=2, repeats=timer_repeats, device=device)["median_s"]
            rows.append(dict(backend=backend, L=L, k=k, decode_s=step[1], verify_s=step[k], ratio=step[k] / step[1]))
    return rows


def goals(rows: list[dict], kernel_ratio: list[dict], model_rows: list[dict]) -> dict:
    """The CUDA backend's performance goals (docs/triton.md), evaluated on this run's numbers."""
    ratios = [r["sdpa_over_triton"] for r in rows if r["sdpa_over_triton"] is not None]
    long = [r["fraction_of_copy_bw"] for r in rows if r["L"] >= 4096]
    triton_model = [r["ratio"] for r in model_rows if r["backend"] == "triton"]
    out = {
        "min_sdpa_over_triton": min(ratios) if ratios else None,
        "min_fraction_of_copy_bw_at_L>=4096": min(long) if long else None,
        "max_kernel_verify_over_decode": max((r["ratio"] for r in kernel_ratio), default=None),
        "max_model_verify_over_decode_triton": max(triton_model) if triton_model else None,
    }
    out["met"] = {
        "at_least_as_fast_as_sdpa": out["min_sdpa_over_triton"] is not None and out["min_sdpa_over_triton"] >= GOAL_SDPA_RATIO,
        "copy_bw_70pct_at_L>=4096": out["min_fraction_of_copy_bw_at_L>=4096"] is not None
        and out["min_fraction_of_copy_bw_at_L>=4096"] > GOAL_COPY_FRACTION,
        "verify_k5_at_most_1.2x_decode": out["max_model_verify_over_decode_triton"] is not None
        and out["max_model_verify_over_decode_triton"] <= GOAL_VERIFY_OVER_DECODE,
    }
    return out


def plot(rows: list[dict], copy_GBps: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_sdpa) = plt.subplots(1, 2, figsize=(12, 4.5))
    for T in sorted({r["T"] for r in rows}):
        rs = sorted((r for r in rows if r["T"] == T), key=lambda r: r["L"])
        ax_bw.plot([r["L"] for r in rs], [r["triton_GBps"] for r in rs], marker="o", label=f"T={T}")
        ax_sdpa.plot([r["L"] for r in rs], [r["sdpa_over_triton"] or math.nan for r in rs], marker="o", label=f"T={T}")
    ax_bw.axhline(copy_GBps, color="k", ls="--", label="copy bandwidth")
    ax_bw.axhline(GOAL_COPY_FRACTION * copy_GBps, color="gray", ls=":", label="70% of copy")
    ax_sdpa.axhline(1.0, color="k", ls="--")
    for ax, title in ((ax_bw, "Triton verify_attention: GB/s (minimum bytes)"), (ax_sdpa, "SDPA time / Triton time")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length L")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


ARGUMENTS = ("T", "cache_lengths", "batch", "heads", "head_dim", "dtype", "model_lengths")


def register(sub) -> None:
    p = sub.add_parser("kernels-cuda", help="Triton verify-attention roofline on a CUDA GPU (GB/s, vs SDPA, verify/decode)")
    p.add_argument("--T", default="1,2,3,4,5,6,8,12,16", help="query tokens per row (comma-separated)")
    p.add_argument("--cache-lengths", default="512,1024,2048,4096,8192,16384,32768", help="cache lengths L")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", default="12/2", help="query heads / KV heads (default: Qwen2.5-Coder-1.5B)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--model-lengths", default="512,4096,16384", help="cache lengths of the whole-step run ('' skips it)")
    p.add_argument("--out", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    if not torch.cuda.is_available():
        raise RuntimeError("verispec bench kernels-cuda measures a CUDA GPU and none is visible here (torch.cuda.is_available() is False)")
    from verispec.kernels.triton import interpreting

    if interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreter timings mean nothing; unset it to benchmark")
    try:
        H, H_kv = (int(x) for x in args.heads.split("/"))
    except ValueError:
        raise ValueError(f"--heads must look like H/H_kv, e.g. 12/2; got {args.heads!r}") from None
    Ts, Ls = _ints(args.T), _ints(args.cache_lengths)
    model_Ls = _ints(args.model_lengths) if args.model_lengths.strip() else []
    dtype, device = DTYPES[args.dtype], "cuda"
    console = Console()
    bandwidth = measure_memory_bandwidth(device)
    console.print(f"copy bandwidth {bandwidth['copy_GBps']:.0f} GB/s, read {bandwidth['read_GBps']:.0f} GB/s")
    rows = attention_rows(Ts, Ls, B=args.batch, H=H, H_kv=H_kv, D=args.head_dim, dtype=dtype, device=device,
                          copy_GBps=bandwidth["copy_GBps"], timer=make_timer(device))
    for r in rows:
        ratio = f"{r['sdpa_over_triton']:.2f}" if r["sdpa_over_triton"] else "n/a"
        console.print(f"T={r['T']:>2} L={r['L']:>6}  {r['triton_s'] * 1e6:8.1f} us  {r['triton_GBps']:7.0f} GB/s "
                      f"({100 * r['fraction_of_copy_bw']:3.0f}% of copy)  SDPA/Triton {ratio}")
    kernel_ratio = verify_over_decode(rows)
    model_rows = model_step_rows(model_Ls, k=5, dtype=dtype, device=device, backends=("triton", "torch"),
                                 shape=QWEN_1_5B_SHAPE) if model_Ls else []
    for r in model_rows:
        console.print(f"step {r['backend']:<6} L={r['L']:>6}  decode {r['decode_s'] * 1e3:.2f} ms  "
                      f"verify k=5 {r['verify_s'] * 1e3:.2f} ms  ratio {r['ratio']:.2f}")
    summary = goals(rows, kernel_ratio, model_rows)
    console.print(summary)
    arguments = {k: v for k, v in vars(args).items() if k in ARGUMENTS}
    path = write_json("kernels_cuda", dict(
        command="verispec bench kernels-cuda " + " ".join(f"--{k.replace('_', '-')}={v!s}" for k, v in arguments.items()),
        arguments=arguments, bandwidth=bandwidth, attention=rows, kernel_verify_over_decode=kernel_ratio,
        model_step=dict(shape="Qwen2.5-Coder-1.5B, random weights", rows=model_rows), goals=summary,
    ), args.out)
    if rows:
        plot(rows, bandwidth["copy_GBps"], results_dir(args.out) / "kernels_cuda.png")
    console.print(f"wrote {path}")
    return 0
