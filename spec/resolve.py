"""Turn user-facing names and objects into the loop's parts (``protocols.py``).

Drafts: a model with the model interface (-> ModelDraft), ``"ngram"`` / ``"ngram:N"`` (prompt
lookup, n-grams up to N), ``"self:N"`` (layer-skip self-draft), any object with ``propose``,
or a ``"module:attr"`` import string naming one of these (a class is instantiated).
Acceptors: ``"default"``, ``"greedy"``, ``"sample-match"``, ``"coupled"``, ``"typical"``, any callable with
the acceptor protocol, or a ``"module:attr"`` import string.
k: an int, ``"auto"`` / ``"auto:MAX"``, or a k-policy object (``policy.as_policy``).

A user's object that is not an instance of its protocol (the bases subclass it; so does an object
with every member) is wrapped once, here, in an adapter: the object's own members where it has
them, the base's no-op defaults elsewhere, and every other attribute read through to the object
(``adapter.inner``). So the loop calls every hook unconditionally.
"""

from __future__ import annotations

import importlib

from .acceptors import ACCEPTORS, DefaultTokenAcceptor
from .drafts import LayerSkipDraft, ModelDraft, NGramDraft
from .policy import as_policy
from .protocols import Acceptor, AcceptorBase, Draft, DraftBase, KPolicy, KPolicyBase, Target, TargetBase, read_through

TARGET_REQUIRED = ("forward", "prefill", "keep_rows", "vocab_size", "batch_size", "n_positions")


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
    """Resolve ``draft`` to a provider with every member of ``protocols.Draft`` (not yet bound)."""
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
    if isinstance(draft, DraftBase):
        _check_overridden(draft, DraftBase, "propose", "propose(tokens, lengths, g, params, uniforms)")
        return draft
    if hasattr(draft, "propose"):
        return draft if isinstance(draft, Draft) else DraftAdapter(draft)
    if hasattr(draft, "forward") and hasattr(draft, "vocab_size"):
        return ModelDraft(draft)
    raise TypeError(
        f"draft must be a model (LlamaForSampling), a draft provider with propose(), or a name; got {type(draft).__name__}"
    )


def make_acceptor(acceptor, target, extra: dict | None = None):
    """Resolve ``acceptor`` to an acceptor with every member of ``protocols.Acceptor``."""
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
    if isinstance(acceptor, AcceptorBase):
        _check_overridden(acceptor, AcceptorBase, "__call__", "__call__(draft_ids, draft_probs, target_probs, rng)")
        return acceptor
    if not callable(acceptor):
        raise TypeError(f"acceptor must be callable (draft_ids, draft_probs, target_probs, rng), got {type(acceptor).__name__}")
    return acceptor if isinstance(acceptor, Acceptor) else AcceptorAdapter(acceptor)


def make_policy(k):
    """Resolve ``k`` (an int, ``"auto[:MAX]"`` or a k-policy object) to a k-policy."""
    policy = as_policy(k)
    if isinstance(policy, KPolicyBase):
        _check_overridden(policy, KPolicyBase, "next_k", "next_k()")
        return policy
    return policy if isinstance(policy, KPolicy) else KPolicyAdapter(policy)


def as_target(target):
    """The target with every member of ``protocols.Target``: as is, or in an adapter."""
    missing = [m for m in TARGET_REQUIRED if not hasattr(target, m)]
    if missing:
        raise TypeError(f"target {type(target).__name__} lacks {', '.join(map(repr, missing))} of the model interface")
    return target if isinstance(target, Target) else TargetAdapter(target)


def _check_overridden(obj, base, method: str, signature: str) -> None:
    if isinstance(obj, _Adapter):  # resolved before (the user's object inside has the method)
        return
    if getattr(type(obj), method) is getattr(base, method):
        raise TypeError(f"{type(obj).__name__} subclasses {base.__name__} but does not define {signature}")


# ---- adapters ---------------------------------------------------------------------------------------


class _Adapter:
    """Holds the user's object as ``inner``; members the adapter does not define are read from it."""

    def __init__(self, inner, hooks: tuple[str, ...]):
        self.inner = inner
        for hook in hooks:  # the object's own bound methods, looked up once, shadow the base's no-ops
            if callable(getattr(inner, hook, None)):
                setattr(self, hook, getattr(inner, hook))

    def __getattr__(self, attr):
        if attr == "inner":  # not yet set (copying, unpickling)
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    @property
    def name(self) -> str:
        inner = self.inner
        return getattr(inner, "name", None) or getattr(inner, "__name__", None) or type(inner).__name__

    def __repr__(self) -> str:
        return repr(self.inner)


class DraftAdapter(_Adapter, DraftBase):
    """A draft provider with ``propose`` and any of the optional members."""

    deterministic = read_through("deterministic", False)
    can_stop_early = read_through("can_stop_early", False)
    can_couple = read_through("can_couple", False)
    can_draft_trees = read_through("can_draft_trees", False)
    n_positions = read_through("n_positions", None)
    batch_size = read_through("batch_size", None)

    def __init__(self, draft):
        super().__init__(draft, ("propose", "bind", "prefill", "commit", "keep_rows", "propose_tree", "commit_tree"))


class AcceptorAdapter(_Adapter, AcceptorBase):
    """A callable acceptor; a greedy-id shortcut only if it says ``accepts_greedy_ids = True``."""

    lossless = read_through("lossless", None)
    exact_when_greedy = read_through("exact_when_greedy", False)
    coupled = read_through("coupled", False)
    accepts_greedy_ids = read_through("accepts_greedy_ids", False)

    def __init__(self, acceptor):
        super().__init__(acceptor, ())
        self._own_greedy = getattr(acceptor, "accept_greedy", None)

    def __call__(self, draft_ids, draft_probs, target_probs, rng):
        return self.inner(draft_ids, draft_probs, target_probs, rng)

    def accept_greedy(self, draft_ids, choice):  # the object's own (its output is checked), else the base's rule
        if self._own_greedy is None:
            return super().accept_greedy(draft_ids, choice)
        return self._own_greedy(draft_ids, choice)


class KPolicyAdapter(_Adapter, KPolicyBase):
    """A k-policy with ``max_k`` and ``next_k``; its other hooks where it has them."""

    max_k = read_through("max_k", None)
    keep_drafting = read_through("keep_drafting", None)

    def __init__(self, policy):
        super().__init__(policy, ("next_k", "observe", "begin_sequence", "needs_calibration", "calibrate", "set_gated"))


class TargetAdapter(_Adapter, TargetBase):
    """A model with the required members of the model interface; reset, sync_tokens, device,
    kernels and speculation_lengths where it has them."""

    device = read_through("device", TargetBase.device)
    kernels = read_through("kernels", None)
    speculation_lengths = read_through("speculation_lengths", ())

    def __init__(self, target):
        super().__init__(target, ("forward", "prefill", "keep_rows", "reset", "sync_tokens", "kv_gather"))


# ---- token trees -------------------------------------------------------------------------------------


class TreeAcceptorAdapter(_Adapter):
    """A callable tree acceptor (``tree.py`` protocol) with the optional members' defaults."""

    lossless = read_through("lossless", None)
    children_modes = read_through("children_modes", ())
    exact_when_greedy = read_through("exact_when_greedy", False)
    accepts_greedy_ids = read_through("accepts_greedy_ids", False)

    def __init__(self, acceptor):
        super().__init__(acceptor, ())

    def __call__(self, tree, node_ids, node_q, target_probs, rng):
        return self.inner(tree, node_ids, node_q, target_probs, rng)

    def accept_greedy(self, tree, node_ids, choice):
        from .tree import accept_tree_by_ids

        own = getattr(self.inner, "accept_greedy", None)
        return own(tree, node_ids, choice) if own is not None else accept_tree_by_ids(tree, node_ids, choice)


def make_tree_acceptor(acceptor):
    """Resolve a tree acceptor: None ("multistep"), a name in ``tree.TREE_ACCEPTORS``, a class, a
    callable with the tree acceptor protocol, or ``"module:attr"``."""
    from .tree import TREE_ACCEPTORS, TreeAcceptorBase

    if acceptor is None:
        acceptor = "multistep"
    if isinstance(acceptor, str):
        if acceptor in TREE_ACCEPTORS:
            return TREE_ACCEPTORS[acceptor]()
        if ":" not in acceptor:
            raise ValueError(f"unknown tree acceptor {acceptor!r}: use one of {sorted(TREE_ACCEPTORS)}, a callable "
                             "or 'module:attr'")
        acceptor = import_string(acceptor)
    if isinstance(acceptor, type):
        acceptor = acceptor()
    if not callable(acceptor):
        raise ValueError(f"a tree acceptor must be callable as acceptor(tree, node_ids, node_q, target_probs, rng), "
                         f"got {type(acceptor).__name__}")
    return acceptor if isinstance(acceptor, (TreeAcceptorBase, TreeAcceptorAdapter)) else TreeAcceptorAdapter(acceptor)
