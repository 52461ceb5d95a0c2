"""Transitional: ``hold_plans`` is a no-op (the compiled decoder, compiled.py, checks its plan
cheaply at every call). Removed once no caller uses it."""

import contextlib


@contextlib.contextmanager
def hold_plans():
    yield
