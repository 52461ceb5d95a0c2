"""The ``verispec`` command line. Each subcommand lives in its own module here and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.

Errors: a bad input (a ValueError, a missing file, a model that cannot be fetched, NaN logits,
an error the project raises on purpose) ends the command with one line on stderr and exit
status 1; anything else is a bug and keeps its traceback. ``--debug`` (or ``VERISPEC_DEBUG=1``)
shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import linecache
import logging
import os
import pkgutil
import sys
from pathlib import Path

# Listed first in ``verispec --help``; any other module here with ``register`` follows.
FIRST = ["generate", "check", "bench"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _commands() -> list[str]:
    import verispec.cli as pkg

    found = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [c for c in FIRST if c in found] + [c for c in found if c not in FIRST]


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter for ``parser`` and every subcommand parser below it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _use_formatter(sub)


def build_parser() -> argparse.ArgumentParser:
    from verispec import __version__

    parser = argparse.ArgumentParser(prog="verispec", description="Exact speculative decoding for Llama-family models.")
    parser.add_argument("--version", action="version", version=f"verispec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information (and show tracebacks)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (also: VERISPEC_DEBUG=1); without it a bad input "
                             "is one line on stderr and exit status 1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _commands():
        mod = importlib.import_module(f"verispec.cli.{name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    _use_formatter(parser)
    return parser


def _user_errors() -> tuple:
    """Exception types that report a bad input (or environment), never a bug of ours."""
    errors = [ValueError, OSError, FloatingPointError, MemoryError]
    from verispec.kernels.registry import BackendUnavailable
    from verispec.model.hub import FetchError

    errors += [BackendUnavailable, FetchError]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def _project_dirs() -> list[Path]:
    return [Path(m.__file__).resolve().parent for name, m in list(sys.modules.items())
            if name.startswith("verispec") and getattr(m, "__file__", None)]


def raised_on_purpose(e: BaseException) -> bool:
    """True when the innermost frame of ``e`` is a ``raise`` statement in verispec's own code
    (a check that names the problem), not an error out of Python, torch or a library."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not any(d == path.parent or d in path.parents for d in _project_dirs()):
        return False
    return linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise")


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # torch's CPU allocator: too large a run
        return True
    return isinstance(e, _user_errors()) or (isinstance(e, Exception) and raised_on_purpose(e))


def report(e: BaseException) -> None:
    """One line on stderr: ``error: Type: message``."""
    from rich.console import Console
    from rich.markup import escape

    text = " ".join(str(e).split()) or repr(e)  # one line, whatever the message held
    message = escape(f"{type(e).__name__}: {text}")  # shapes like [B, g] are text, not markup
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False, markup=True)


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
    except Exception as e:
        if args.verbose or args.debug or os.environ.get("VERISPEC_DEBUG", "") not in ("", "0") or not is_user_error(e):
            raise
        report(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
