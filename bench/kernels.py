"""``verispec bench kernels``: the verify-path kernels per backend, over T x cache length.

For every backend, query count T and prior cache length S (the cache holds S tokens, then the
T new ones at slots S .. S+T-1), it times ``verify_attention`` and ``kv_append`` and, for token
trees, ``verify_attention`` under a tree's ancestor mask (T nodes of a binary tree, node t's
parent (t-1)//2) and ``kv_gather`` moving the accepted root-to-leaf path of the deepest node to
slots S, S+1, ... (the backend's kernel, else the torch reference, named in ``kv_gather_impl``).
It records the minimum bytes each must move:

* verify_attention (causal or tree): q + the visible K and V (S + T slots per KV head) + out;
* kv_append: the new K and V read + the same bytes written into the cache;
* kv_gather: the path's K and V rows read + the same bytes written;

(positions and masks, a few bytes, are not counted). Backends add their own columns through
:func:`register_metrics` hooks: for ``nki`` the interpreter's instruction counts per engine and
the bytes its DMAs really moved; a GPU backend can add achieved bandwidth against a copy
bandwidth, or its ratio to SDPA. Timings of the interpreted ``nki`` backend measure the NumPy
interpreter, not Trainium. JSON goes to kernels.json in --out-dir, the plot next to it.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from verispec.kernels import reference

from .common import measure_memory_bandwidth, results_dir, time_fn, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    backend: str
    device: str
    dtype: str
    B: int
    H: int
    H_kv: int
    D: int
    T: int
    S: int  # prior cache length

    def inputs(self, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        S_max = self.S + self.T

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(dt).to(self.device)

        return {
            "q": rnd(self.B, self.H, self.T, self.D),  # [B, H, T, D]
            "k_cache": rnd(self.B, self.H_kv, S_max, self.D),  # [B, H_kv, S+T, D]
            "v_cache": rnd(self.B, self.H_kv, S_max, self.D),
            "k_new": rnd(self.B, self.H_kv, self.T, self.D),  # [B, H_kv, T, D]
            "v_new": rnd(self.B, self.H_kv, self.T, self.D),
            "positions": torch.full((self.B,), self.S, dtype=torch.int32, device=self.device),  # [B]
            "scale": self.D**-0.5,
        }

    def tree_path(self) -> list[int]:
        """The accepted path (node indices, root first): root to the deepest node, T - 1."""
        path, t = [], self.T - 1
        while t > 0:
            path.append(t)
            t = (t - 1) // 2
        return [0] + path[::-1]

    def tree_inputs(self) -> dict:
        """A binary token tree over the T new tokens and the kv_gather of its accepted path."""
        T, B = self.T, self.B
        mask = torch.eye(T, dtype=torch.bool)  # [T, T] node t sees its ancestors and itself
        for t in range(1, T):
            mask[t] |= mask[(t - 1) // 2]
        path = self.tree_path()
        return {
            "active_mask": mask.expand(B, T, T).contiguous().to(self.device),  # [B, T, T]
            "src_slots": torch.tensor([[self.S + n for n in path]] * B, dtype=torch.int32, device=self.device),  # [B, N]
            "dst_start": torch.full((B,), self.S, dtype=torch.int32, device=self.device),  # [B]
            "counts": torch.full((B,), len(path), dtype=torch.int32, device=self.device),  # [B]
        }

    def min_bytes(self) -> dict:
        item = DTYPES[self.dtype].itemsize
        q = self.B * self.H * self.T * self.D * item
        kv_visible = 2 * self.B * self.H_kv * (self.S + self.T) * self.D * item
        new = 2 * self.B * self.H_kv * self.T * self.D * item
        path = 2 * self.B * self.H_kv * len(self.tree_path()) * self.D * item  # K and V rows of the path
        return {"verify_attention": 2 * q + kv_visible, "kv_append": 2 * new, "verify_attention_tree": 2 * q + kv_visible,
                "kv_gather": 2 * path}


# backend name -> hook(kernels, case, inputs) -> extra columns for that row
_HOOKS: dict[str, Callable] = {}


def register_metrics(backend: str, hook: Callable) -> None:
    """Add per-backend columns: ``hook(kernels, case, inputs) -> dict`` runs after the timing."""
    _HOOKS[backend] = hook


def _nki_metrics(ks, case: Case, x: dict) -> dict:
    """The interpreter's counters for one call of each kernel (nothing under AWS's real nki)."""
    from verispec.kernels.nki import backend

    tree = case.tree_inputs()
    stats = {}
    ks.verify_attention(x["q"], x["k_cache"], x["v_cache"], x["positions"], x["scale"])
    stats["verify_attention"] = backend.last_stats["verify_attention"]
    ks.kv_append(x["k_cache"], x["v_cache"], x["k_new"], x["v_new"], x["positions"])
    stats["kv_append"] = backend.last_stats["kv_append"]
    ks.verify_attention(x["q"], x["k_cache"], x["v_cache"], x["positions"], x["scale"], tree["active_mask"])
    stats["verify_attention_tree"] = backend.last_stats["verify_attention"]
    ks.get("kv_gather")(x["k_cache"], x["v_cache"], tree["src_slots"], tree["dst_start"], tree["counts"])
    stats["kv_gather"] = backend.last_stats["kv_gather"]
    if any(s is None for s in stats.values()):
        return {}
    mins = case.min_bytes()
    out = {}
    for name, s in stats.items():
        d = s.as_dict()
        out[f"{name}_nki"] = {
            "instructions": d["instructions"], "instructions_total": d["instructions_total"],
            "dma_bytes": d["dma_bytes"], "hbm_read_bytes": d["hbm_read_bytes"], "hbm_write_bytes": d["hbm_write_bytes"],
            "hbm_bytes_over_min": (d["hbm_read_bytes"] + d["hbm_write_bytes"]) / mins[name],
            "sbuf_peak_partition_bytes": d["sbuf_peak_partition_bytes"], "psum_peak_banks": d["psum_peak_banks"],
        }
    return out


register_metrics("nki", _nki_metrics)


def bench_case(case: Case, warmup: int, repeats: int) -> dict:
    from verispec.kernels import get_backend

    ks = get_backend(case.backend, device=case.device)
    x = case.inputs()
    row = asdict(case)
    row["min_bytes"] = case.min_bytes()
    row["verify_attention"] = time_fn(
        lambda: ks.verify_attention(x["q"], x["k_cache"], x["v_cache"], x["positions"], x["scale"]),
        warmup=warmup, repeats=repeats, device=case.device,
    )
    row["kv_append"] = time_fn(
        lambda: ks.kv_append(x["k_cache"], x["v_cache"], x["k_new"], x["v_new"], x["positions"]),
        warmup=warmup, repeats=repeats, device=case.device,
    )
    tree = case.tree_inputs()
    row["tree_path"] = case.tree_path()
    row["verify_attention_tree"] = time_fn(
        lambda: ks.verify_attention(x["q"], x["k_cache"], x["v_cache"], x["positions"], x["scale"], tree["active_mask"]),
        warmup=warmup, repeats=repeats, device=case.device,
    )
    gather = ks.get("kv_gather")
    row["kv_gather_impl"] = "backend" if gather is not None else "reference"
    gather = gather or reference.kv_gather
    row["kv_gather"] = time_fn(  # the path already sits at S.. after the first call: same work every call
        lambda: gather(x["k_cache"], x["v_cache"], tree["src_slots"], tree["dst_start"], tree["counts"]),
        warmup=warmup, repeats=repeats, device=case.device,
    )
    for name in ("verify_attention", "kv_append", "verify_attention_tree", "kv_gather"):
        row[name]["achieved_GBps"] = row["min_bytes"][name] / row[name]["median_s"] / 1e9
    hook = _HOOKS.get(case.backend)
    if hook is not None:
        row.update(hook(ks, case, x))
    return row


def run(args) -> int:
    backends = _csv(args.backend, str, "--backend")
    Ts, Ss = _csv(args.T, int, "--T"), _csv(args.S, int, "--S")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    rows = []
    for backend in backends:
        for S in Ss:
            for T in Ts:
                case = Case(backend, args.device, args.dtype, args.batch, args.heads, args.kv_heads, args.head_dim, T, S)
                rows.append(bench_case(case, args.warmup, args.repeats))
                va = rows[-1]["verify_attention"]["median_s"]
                r = rows[-1]
                print(f"{backend:>8} T={T:<3} S={S:<5} verify_attention {va * 1e3:9.3f} ms  "
                      f"kv_append {r['kv_append']['median_s'] * 1e3:8.3f} ms  "
                      f"tree {r['verify_attention_tree']['median_s'] * 1e3:9.3f} ms  "
                      f"kv_gather {r['kv_gather']['median_s'] * 1e3:8.3f} ms")
    bandwidth = measure_memory_bandwidth(args.device, nbytes=args.bandwidth_mib << 20)
    path = write_json("kernels", {
        "command": "verispec bench kernels " + " ".join(args.argv),
        "counted_bytes": "verify_attention (causal or tree): q + visible K and V (S+T slots per KV head) + out; "
                         "kv_append: new K and V read + written; kv_gather: the accepted path's K and V rows read + "
                         "written. Positions, slots and masks not counted.",
        "note": "nki timings are the NumPy interpreter's, not Trainium's; its *_nki columns are the "
                "interpreter's instruction and DMA counters",
        "memory_bandwidth": bandwidth,
        "results": rows,
    }, args.out_dir)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(rows, results_dir(args.out_dir) / 'kernels.png')}")
    return 0


def plot(rows: list[dict], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows})
    Ts = sorted({r["T"] for r in rows})
    nki_rows = [r for r in rows if "verify_attention_nki" in r]
    fig, axes = plt.subplots(1, 2 if nki_rows else 1, figsize=(13 if nki_rows else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    styles = ["-", "--", ":", "-."]
    for bi, b in enumerate(backends):
        for ti, T in enumerate(Ts):
            pts = sorted((r["S"], r["verify_attention"]["median_s"] * 1e3) for r in rows if r["backend"] == b and r["T"] == T)
            ax.plot(*zip(*pts), styles[bi % len(styles)], marker="o", color=f"C{ti}", label=f"{b} T={T}")
    ax.set(xscale="log", yscale="log", xlabel="prior cache length S", ylabel="verify_attention median (ms)",
           title="verify_attention wall time (nki: interpreter, not hardware)")
    ax.legend(fontsize=7, ncol=2)
    if nki_rows:
        ax = axes[0][1]
        for ti, T in enumerate(Ts):
            pts = sorted((r["S"], r["verify_attention_nki"]["hbm_bytes_over_min"], r["verify_attention_nki"]["instructions_total"])
                         for r in nki_rows if r["T"] == T)
            if pts:
                S, ratio, n_instr = zip(*pts)
                ax.plot(S, ratio, "-", marker="o", color=f"C{ti}", label=f"T={T}")
                for x, y, n in zip(S, ratio, n_instr):
                    ax.annotate(f"{n}", (x, y), fontsize=6, color=f"C{ti}", xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="prior cache length S", ylabel="HBM bytes moved / minimum bytes",
               title="nki verify_attention: HBM bytes / minimum (labels: instructions)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _csv(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list, got {text!r}") from None
    if not values or (kind is int and any(v < 1 for v in values)):
        raise ValueError(f"{flag} needs positive values, got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("kernels", help="verify_attention / kv_append / token-tree verify_attention and kv_gather per backend over T x cache length",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", default="torch,nki", help="comma-separated kernel backends")
    p.add_argument("--T", default="1,2,4,8,16", help="query tokens per verify pass")
    p.add_argument("--S", default="256,1024,4096", help="prior cache lengths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bandwidth-mib", type=int, default=512, help="buffer size of the bandwidth measurement")
    p.add_argument("--out-dir", default=None, help="results directory (default $VERISPEC_RESULTS or ./bench-results)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=_run_with_argv)


def _run_with_argv(args) -> int:
    for flag in ("batch", "heads", "kv_heads", "head_dim", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    args.argv = [f"--{k.replace('_', '-')} {v}" for k, v in (
        ("backend", args.backend), ("T", args.T), ("S", args.S), ("device", args.device), ("dtype", args.dtype),
        ("batch", args.batch), ("heads", args.heads), ("kv_heads", args.kv_heads), ("head_dim", args.head_dim),
        ("warmup", args.warmup), ("repeats", args.repeats))]
    return run(args)
