"""The plots of ``verispec bench e2e``: tokens/s, measured and predicted speedup, and per-position
acceptance, one panel per (prompt set, temperature)."""

from __future__ import annotations

from .common import results_dir


def _grid(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["prompt_set"] for r in runs))
    temps = list(dict.fromkeys(r["temperature"] for r in runs))
    fig, axes = plt.subplots(len(sets), len(temps), figsize=(5 * len(temps), 3.8 * len(sets)), squeeze=False)
    cells = [(r, axes[sets.index(r["prompt_set"])][temps.index(r["temperature"])]) for r in runs]
    return plt, fig, cells


def _panel(ax, run, xlabel: str, ylabel: str, **limits) -> None:
    """Title, labels, integer x ticks, grid and legend of one (prompt set, temperature) panel."""
    from matplotlib.ticker import MaxNLocator

    ax.set(title=f"{run['prompt_set']}, T={run['temperature']:g}", xlabel=xlabel, ylabel=ylabel, **limits)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _chains(run):
    """The fixed-k chain paths of a cell by acceptor: {acceptor: [paths by k]} (token trees and
    k=auto apart)."""
    out = {}
    for p in run["paths"]:
        if p["mode"] == "speculative" and p["k"] != "auto" and p.get("verify", "chain") == "chain":
            out.setdefault(p.get("acceptor"), []).append(p)
    return out


def _chain_label(acceptor) -> str:
    return "" if acceptor in (None, "default") else f" ({acceptor})"


def plot_tokens_per_s(runs, args, data):
    """End-to-end tokens/s against fixed k, with horizontal lines for the other paths."""

    plt, fig, cells = _grid(runs)
    lines = {("verispec", "target-only"): ("verispec target-only", "grey", "-"),
             ("transformers", "target-only"): ("HF target-only", "tab:red", ":"),
             ("transformers", "assisted"): ("HF assisted", "tab:red", "--")}
    for run, ax in cells:
        for acc, fixed in _chains(run).items():
            ax.plot([p["k"] for p in fixed], [p["e2e_tokens_per_s"] for p in fixed], "o-",
                    label="verispec speculative" + _chain_label(acc))
        for p in run["paths"]:
            if p["k"] == "auto" and p.get("verify", "chain") == "chain":
                ax.axhline(p["e2e_tokens_per_s"], color="tab:green", ls="-.", label="verispec k=auto")
            elif (p["engine"], p["mode"]) in lines:
                label, color, ls = lines[(p["engine"], p["mode"])]
                ax.axhline(p["e2e_tokens_per_s"], color=color, ls=ls, label=label)
        ax.set_ylim(bottom=0)
        _panel(ax, run, "k (tokens per verify pass)", "tokens/s (prefill included)")
    fig.suptitle(f"{data['draft']} -> {data['target']} ({data['amp']}, {data['max_new_tokens']} new tokens)")
    return _save(plt, fig, results_dir(args.out_dir) / f"{args.name}_tokens_per_s.png")


def plot_acceptance(runs, args):
    """P(draft i accepted | drafts before it accepted) against i, one line per k."""

    plt, fig, cells = _grid(runs)
    for run, ax in cells:
        for p in run["paths"]:
            if p["mode"] == "speculative" and p["position_acceptance"] and p.get("verify", "chain") == "chain":
                pos = [(i + 1, a) for i, a in enumerate(p["position_acceptance"]) if a is not None]
                ax.plot([i for i, _ in pos], [a for _, a in pos], "o-" if p["k"] != "auto" else "s--",
                        label=p.get("label") or f"k={p['k']}")
        _panel(ax, run, "draft position", "acceptance given earlier accepted", ylim=(0, 1.02))
    return _save(plt, fig, results_dir(args.out_dir) / f"{args.name}_acceptance.png")


def plot_speedup(runs, args, data):
    """Decode speedup over target-only against fixed k, measured and predicted (Leviathan's
    formula with the run's acceptance and costs), k=auto as a horizontal line."""

    plt, fig, cells = _grid(runs)
    for run, ax in cells:
        for acc, fixed in _chains(run).items():
            ks = [p["k"] for p in fixed]
            line, = ax.plot(ks, [p["speedup_vs_target_only"] for p in fixed], "o-", label="measured" + _chain_label(acc))
            if all(p.get("predicted_speedup") is not None for p in fixed):
                ax.plot(ks, [p["predicted_speedup"] for p in fixed], "x--", color=line.get_color(),
                        label="predicted (Leviathan)" + _chain_label(acc))
        for p in run["paths"]:
            if p["k"] == "auto" and p.get("verify", "chain") == "chain" and p.get("speedup_vs_target_only") is not None:
                ax.axhline(p["speedup_vs_target_only"], color="tab:green", ls="-.", label="measured, k=auto")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylim(bottom=0)
        _panel(ax, run, "k (tokens per verify pass)", "decode speedup over target-only")
    fig.suptitle(f"{data['draft']} -> {data['target']} ({data['amp']}, {data['max_new_tokens']} new tokens)")
    return _save(plt, fig, results_dir(args.out_dir) / f"{args.name}_speedup.png")


def plot_flat64(runs, args, data):
    """Per cell, every speculative path (chains per acceptor, trees per acceptor and children,
    k=auto): measured decode speedup over target-only beside the speedup its measured tokens per
    pass predicts on a flat verify curve (one decode step up to 64 tokens; draft cost per level as
    measured), horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["prompt_set"] for r in runs))
    temps = list(dict.fromkeys(r["temperature"] for r in runs))
    n = max([sum(p["mode"] == "speculative" for p in r["paths"]) for r in runs] or [1])
    fig, axes = plt.subplots(len(sets), len(temps), figsize=(6 * len(temps), (1.2 + 0.32 * n) * len(sets)),
                             squeeze=False)
    for run in runs:
        ax = axes[sets.index(run["prompt_set"])][temps.index(run["temperature"])]
        spec = [p for p in run["paths"] if p["mode"] == "speculative"]
        y = list(range(len(spec)))
        measured = [p.get("speedup_vs_target_only") or 0.0 for p in spec]
        flat = [p.get("predicted_speedup_flat64") or 0.0 for p in spec]
        ax.barh([i - 0.2 for i in y], measured, height=0.4, label="measured (this machine)")
        ax.barh([i + 0.2 for i in y], flat, height=0.4, label="predicted, flat verify cost to 64 tokens")
        ax.set_yticks(y, [p.get("label") or f"k={p['k']}" for p in spec], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set(title=f"{run['prompt_set']}, T={run['temperature']:g}", xlabel="decode speedup over target-only")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['draft']} -> {data['target']} ({data['amp']}, {data['max_new_tokens']} new tokens): "
                 "measured and flat-64 predicted speedup")
    return _save(plt, fig, results_dir(args.out_dir) / f"{args.name}_flat64.png")
