"""Rendering helpers shared by CLI commands: incremental detokenisation and the statistics table."""

from __future__ import annotations


class TextStream:
    """Turn committed token ids into printable text pieces as they arrive.

    Decodes all new tokens so far and emits what extends the text already printed; a piece that
    ends inside a multi-byte character (decoded as U+FFFD) is held back until it completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        piece, self.printed = text[len(self.printed):], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.printed):] if text.startswith(self.printed) else ""
        self.printed = text
        return piece


def _fmt(v, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def stats_table(stats: dict, title: str, extra_rows=()):
    """A rich Table of one run's SpecStats.to_dict(); ``extra_rows`` ((figure, value), ...) follow
    the first rows (e.g. the draft's weight format)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), show_header=False, title_justify="left")  # a path is text, not markup
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    speculative = bool(stats.get("proposed_drafts"))
    rows = [
        ("new tokens", str(stats["new_tokens"])),
        ("tokens/s (after prefill)", _fmt(stats["tokens_per_s"])),
        ("prefill", _fmt(stats["prefill_s"], "{:.3f} s")),
        ("one-token decode step", _fmt(None if stats["decode_step_s"] is None else stats["decode_step_s"] * 1e3, "{:.1f} ms")),
        *extra_rows,
    ]
    if speculative:
        ks = ", ".join(f"k={k}: {n}" for k, n in sorted(stats["k_counts"].items()))
        pos = " ".join(_fmt(a, "{:.2f}") for a in stats["position_acceptance"][:8])
        total = stats["draft_s"] + stats["target_s"] + stats["accept_s"]
        split = (f"draft {100 * stats['draft_s'] / total:.0f}% / target {100 * stats['target_s'] / total:.0f}% / "
                 f"accept {100 * stats['accept_s'] / total:.0f}%") if total else "-"
        rows += [
            ("draft / acceptor", f"{stats['draft']} / {stats['acceptor']}" + ("" if stats["lossless"] else " (LOSSY)")),
            ("k policy", f"{stats.get('policy', '')}  ({ks})"),
            ("acceptance rate", _fmt(stats["acceptance_rate"], "{:.3f}")),
            ("per-position acceptance", pos),
            ("mean tokens per verify pass", _fmt(stats["mean_tokens_per_pass"])),
            ("time split", split),
            ("draft step c / verify pass r (x decode step)", f"{_fmt(stats['c'], '{:.3f}')} / {_fmt(stats['r'], '{:.3f}')}"),
            ("speedup predicted (Leviathan, measured a, c, r)", _fmt(stats["predicted_speedup"], "{:.2f}x")),
            ("speedup measured (vs one-token decode step)", _fmt(stats["measured_speedup"], "{:.2f}x")),
        ]
    for name, value in rows:
        table.add_row(name, value)
    return table
