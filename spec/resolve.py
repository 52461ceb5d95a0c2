"""Turn user-facing names into draft providers and acceptors.

Drafts: a model with the model interface (-> ModelDraft), ``"ngram"`` / ``"ngram:N"`` (prompt
lookup, n-grams up to N), ``"self:N"`` (layer-skip self-draft), any object with ``propose``,
or a ``"module:attr"`` import string naming one of these (a class is instantiated).
Acceptors: ``"default"``, ``"greedy"``, ``"sample-match"``, ``"coupled"``, ``"typical"``, any callable with
the acceptor protocol, or a ``"module:attr"`` import string.
"""

from __future__ import annotations

import importlib

from .acceptors import ACCEPTORS, DefaultTokenAcceptor
from .drafts import LayerSkipDraft, ModelDraft, NGramDraft


def import_string(spec: str):
    """``"package.module:attr"`` -> the attribute (dotted attr paths allowed)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{spec!r} is not an import string of the form 'package.module:attr'")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import module {module!r} named in {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _positive_suffix(spec: str, prefix: str) -> int:
    tail = spec[len(prefix):]
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"draft {spec!r}: expected {prefix}N with N a positive integer")
    return int(tail)


def make_draft(draft, target):
    """Resolve ``draft`` to a provider object (not yet bound)."""
    if isinstance(draft, str):
        if draft == "ngram":
            return NGramDraft()
        if draft.startswith("ngram:"):
            return NGramDraft(max_ngram=_positive_suffix(draft, "ngram:"))
        if draft.startswith("self:"):
            return LayerSkipDraft(_positive_suffix(draft, "self:"))
        if ":" in draft:
            obj = import_string(draft)
            return make_draft(obj() if isinstance(obj, type) else obj, target)
        raise ValueError(
            f"unknown draft {draft!r}: use a model, 'ngram', 'ngram:N', 'self:N', a provider object or 'module:attr'"
        )
    if hasattr(draft, "propose"):
        return draft
    if hasattr(draft, "forward") and hasattr(draft, "vocab_size"):
        return ModelDraft(draft)
    raise TypeError(
        f"draft must be a model (LlamaForSampling), a draft provider with propose(), or a name; got {type(draft).__name__}"
    )


def make_acceptor(acceptor, target, extra: dict | None = None):
    """Resolve ``acceptor`` to a callable with the acceptor protocol."""
    extra = extra or {}
    if acceptor is None or acceptor == "default":
        return DefaultTokenAcceptor.for_target(target)
    if isinstance(acceptor, str):
        if acceptor in ACCEPTORS:
            return ACCEPTORS[acceptor]()
        if acceptor in extra:
            return extra[acceptor]()
        if ":" in acceptor:
            obj = import_string(acceptor)
            return make_acceptor(obj() if isinstance(obj, type) else obj, target)
        names = ", ".join(list(ACCEPTORS) + list(extra))
        raise ValueError(f"unknown acceptor {acceptor!r}: use one of {names}, a callable or 'module:attr'")
    if isinstance(acceptor, type):
        return make_acceptor(acceptor(), target)
    if not callable(acceptor):
        raise TypeError(f"acceptor must be callable (draft_ids, draft_probs, target_probs, rng), got {type(acceptor).__name__}")
    return acceptor
