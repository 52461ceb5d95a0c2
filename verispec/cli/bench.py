"""``verispec bench NAME``: benchmarks. Each module in ``verispec.bench`` (the repo's bench/
folder) that defines ``register(subparsers)`` is one NAME."""

from __future__ import annotations

import importlib
import pkgutil


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (JSON and plots go to --out / --out-dir, $VERISPEC_RESULTS or ./bench-results)")
    inner = p.add_subparsers(dest="bench", metavar="NAME")
    import verispec.bench as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name.startswith("_") or m.name == "common":
            continue
        mod = importlib.import_module(f"verispec.bench.{m.name}")
        if hasattr(mod, "register"):
            mod.register(inner)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
