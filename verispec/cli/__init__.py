"""The ``verispec`` command line. Each subcommand lives in its own module here and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

# Listed first in ``verispec --help``; any other module here with ``register`` follows.
FIRST = ["generate", "check", "bench"]


def _commands() -> list[str]:
    import verispec.cli as pkg

    found = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [c for c in FIRST if c in found] + [c for c in found if c not in FIRST]


def build_parser() -> argparse.ArgumentParser:
    from verispec import __version__

    parser = argparse.ArgumentParser(prog="verispec", description="Exact speculative decoding for Llama-family models.")
    parser.add_argument("--version", action="version", version=f"verispec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _commands():
        mod = importlib.import_module(f"verispec.cli.{name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that relaunch themselves
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        if args.verbose:
            raise
        from rich.console import Console
        from rich.markup import escape

        message = escape(f"{type(e).__name__}: {e}")  # shapes like [B, g] are text, not markup
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
