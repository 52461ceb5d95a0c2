"""What ``verispec generate`` decides before it loads any weights: the checks of its arguments,
the draft (chosen by vocabulary when ``--draft`` is not given), the draft's weight format, the
prompt's tokens and the cache length. Reads configs (GGUF metadata, config.json) and the
tokenizer, never weights: every bad input fails here, in a second, not after a minute of loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
NON_MODEL_DRAFTS = ("ngram", "ngram:N", "self:N", "none")


@dataclass
class Plan:
    target_path: Path
    config: object  # the target's LlamaConfig
    k: int | str
    max_k: int
    draft: str | None  # None: the target alone; else a model name/path, 'ngram', 'self:N', ...
    draft_path: Path | None = None  # where a draft model's files are
    quant: str | None = None  # the draft's weight quantization
    quant_label: str = ""  # for the statistics table: "w8a8 weights, auto"
    quant_row: str = ""  # ... and its "draft weights" row
    notes: list = field(default_factory=list)  # lines for stderr
    tokenizer: object = None
    text: str | None = None  # None: the prompt is not read yet (stdin, before a torchrun relaunch)
    ids: list | None = None
    n_positions: int | None = None


def parse_k(text: str):
    """'4' -> 4, 'auto' / 'auto:MAX' kept as text (the generator turns it into AdaptiveK)."""
    from verispec.spec.policy import as_policy

    k = int(text) if text.strip().lstrip("-").isdigit() else text.strip()
    try:
        as_policy(k)  # validates: a clear error before any model is loaded
    except TypeError as e:  # 'k must be an int, ...': a bad value on the command line
        raise ValueError(str(e)) from None
    return k


def check_args(args):
    """The checks that need no file: -> k (an int, or 'auto' / 'auto:MAX')."""
    from verispec.kernels.registry import check_backend_name
    from verispec.model.sampling import SamplingParams, validate_seed
    from verispec.spec.resolve import make_acceptor

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.n_positions is not None and args.n_positions < 1:
        raise ValueError(f"--n-positions must be >= 1, got {args.n_positions}")
    if args.tp_degree < 1:
        raise ValueError(f"--tp-degree must be >= 1, got {args.tp_degree}")
    k = parse_k(args.k)
    SamplingParams(args.temperature, args.top_k, args.top_p)  # temperature, top_k, top_p (one definition)
    validate_seed(args.seed)
    if args.kernel_backend is not None:
        check_backend_name(args.kernel_backend)
    if getattr(args, "tree", None) is not None:
        from verispec.spec.tree_step import resolve_tree

        if args.draft is not None and not is_model_draft(args.draft) and not args.draft.startswith("self:"):
            raise ValueError(f"--tree needs a draft that drafts trees (a draft model or self:N), not {args.draft!r}")
        resolve_tree(args.tree, args.children, tree_acceptor(args), None)  # bad trees and inexact combinations fail now
    elif args.acceptor not in (None, "default"):
        make_acceptor(args.acceptor, None)  # unknown names and bad import strings fail now
    return k


def tree_acceptor(args):
    """--acceptor with --tree: 'default' is multistep."""
    return None if args.acceptor in (None, "default") else args.acceptor


def tree_k(args, k):
    """k with --tree: a static tree's depth sets it (None); a dynamic tree's depth is k - 1 (5 unless
    -k is a number); auto keeps k=auto[:MAX]."""
    if args.tree == "auto":
        return k
    if str(args.tree).startswith("dynamic:"):
        return k if isinstance(k, int) else 5
    return None


def is_model_draft(draft: str | None) -> bool:
    if not draft or draft == "ngram" or draft.startswith(("ngram:", "self:")):
        return False
    return ":" not in draft or Path(os.path.expanduser(draft)).exists()  # 'module:attr' names a provider


def approx_parameters(config) -> int:
    """Parameters of a decoder from its config (embeddings, attention, MLP; norms left out)."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = H * (2 * q + 2 * kv) + 3 * H * config.intermediate_size
    return V * H * (1 if config.tie_word_embeddings else 2) + L * per_layer


def target_parameters(target: str, config) -> int:
    from verispec.model import hub

    if hub.is_registered(target) and hub.get(target).parameters:
        return hub.get(target).parameters
    return approx_parameters(config)


def registered_drafts(target: str, config) -> list[str]:
    """Registered models that share the target's vocabulary (known without fetching) and have at
    most half its parameters, smallest first: the drafts worth running for it."""
    from verispec.model import hub

    size = target_parameters(target, config)
    fits = [m for m in hub.REGISTRY.values() if m.name != target and m.vocab_size == config.vocab_size
            and 0 < m.parameters <= size / 2]
    return [m.name for m in sorted(fits, key=lambda m: m.parameters)]


def drafts_that_fit(target: str, config) -> str:
    names = registered_drafts(target, config)
    return ", ".join(names + ["ngram", f"self:N (N <= {config.num_hidden_layers})", "none"])


def default_draft(target: str, config) -> tuple[str, str | None]:
    """(draft, a note for stderr or None) when --draft is not given: the smallest registered model
    that fits (:func:`registered_drafts`), else 'ngram' (exact, and no second model)."""
    names = registered_drafts(target, config)
    if names:
        note = None if target == DEFAULT_TARGET else (
            f"note: drafting with {names[0]} (registered; shares the {config.vocab_size}-token vocabulary of "
            f"{target}); --draft chooses another")
        return names[0], note
    return "ngram", (f"note: no registered draft model shares the {config.vocab_size}-token vocabulary of {target} "
                     "at half its size or less; drafting with 'ngram' (exact, no second model). --draft NAME|PATH "
                     "chooses a draft model; self:N or none also work")


def w8a8_here() -> bool:
    """Whether W8A8 runs natively on this CPU (what ``--draft-quant auto`` asks)."""
    from verispec.kernels.cpu.quant import w8a8_native

    return w8a8_native()


def resolve_quant(choice: str, draft: str | None, amp: str) -> tuple[str | None, str, str]:
    """--draft-quant -> (quant for from_pretrained, title label, 'draft weights' row)."""
    if not is_model_draft(draft):
        if choice in ("int8", "w8a8"):
            raise ValueError(f"--draft-quant {choice} needs a draft model; the draft is {draft or 'none'!r}")
        return None, "", ""
    if choice == "auto":
        if w8a8_here():
            return "w8a8", "w8a8 weights, auto", "w8a8 (auto: w8a8 kernels here)"
        return None, f"{amp} weights, auto", f"{amp} (auto: no w8a8 kernels here)"
    if choice == "none":
        return None, "", f"{amp} (--draft-quant none)"
    return choice, f"{choice} weights", f"{choice} (--draft-quant {choice})"


def read_prompt(args, tokenizer) -> tuple[str, list[int]]:
    import sys

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text:
        raise ValueError("the prompt is empty")
    if args.chat:
        if not tokenizer.chat_template:
            raise ValueError(f"--chat: {args.target} has no chat template")
        return text, tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    return text, tokenizer.encode(text)


def cache_length(args, config, prompt_len: int, max_k: int) -> int:
    """n_positions: --n-positions or what the run needs (prompt + new tokens), checked against
    k (the API's limit, :func:`verispec.spec.policy.check_k_fits`) and max_position_embeddings."""
    from verispec.spec.policy import check_k_fits

    new = args.max_new_tokens
    needed = prompt_len + new
    n = args.n_positions or needed
    if n < needed:
        raise ValueError(f"--n-positions {n} is too small: prompt {prompt_len} + {new} new tokens needs {needed}")
    where = (f" (--n-positions {n}); lower -k or raise --n-positions" if args.n_positions else
             f" (the cache holds prompt {prompt_len} + {new} new tokens); lower -k or raise --n-positions")
    check_k_fits(max_k, n, where)
    limit = config.max_position_embeddings
    if n > limit and not args.allow_beyond_max_positions:
        if needed > limit:
            raise ValueError(
                f"prompt {prompt_len} + {new} new tokens = {needed} positions exceed the max_position_embeddings="
                f"{limit} of {args.target}; lower --max-new-tokens or pass --allow-beyond-max-positions (past "
                "that length the model runs on positions it was not trained for)")
        raise ValueError(f"--n-positions {n} exceeds the max_position_embeddings={limit} of {args.target} (the run "
                         f"needs {needed}); lower it or pass --allow-beyond-max-positions")
    return n


def plan(args, progress: bool = True, with_prompt: bool = True) -> Plan:
    """Every check and choice before loading. ``with_prompt=False`` leaves the prompt (and the
    cache length that depends on it) for later: the parent of a torchrun relaunch reading stdin."""
    from verispec.model import Tokenizer, open_source
    from verispec.spec.policy import as_policy

    k = check_args(args)
    config, _, target_path = open_source(args.target, progress=progress)  # config only: no weights
    if args.tp_degree > 1:
        from verispec.parallel.plan import check_tp_degree

        check_tp_degree(config, args.tp_degree)
    notes = []
    draft = args.draft
    if draft is None and k != 1:
        draft, note = default_draft(args.target, config)
        notes += [note] if note else []
    if draft is None or draft.lower() == "none" or k == 1:
        if args.draft_quant in ("int8", "w8a8"):  # named here, before the draft is dropped
            why = "-k 1 runs the target alone" if k == 1 else "the draft is 'none'"
            raise ValueError(f"--draft-quant {args.draft_quant} needs a draft model; {why}")
        draft, k = None, 1
    if draft is not None and draft.startswith("self:") and draft[5:].isdigit() and int(draft[5:]) > config.num_hidden_layers:
        raise ValueError(f"layer-skip draft {draft!r} asks for more layers than the target has ({config.num_hidden_layers})")
    p = Plan(target_path=target_path, config=config, k=k, max_k=as_policy(k).max_k, draft=draft, notes=notes)
    p.quant, p.quant_label, p.quant_row = resolve_quant(args.draft_quant, draft, args.amp)
    if getattr(args, "target_amx", False):  # before any weights load: the same checks as from_pretrained's
        from verispec.kernels import get_backend
        from verispec.model.for_sampling import check_amx

        check_amx(get_backend(args.kernel_backend, device="cpu"), args.amp, None, args.tp_degree)
    if is_model_draft(draft):
        from verispec.model import hub

        known = hub.get(draft).vocab_size if hub.is_registered(draft) else 0  # a named draft: no fetch to know
        vocab = known or None
        if not known or known == config.vocab_size:
            draft_config, _, p.draft_path = open_source(draft, progress=progress)
            vocab = draft_config.vocab_size
        if vocab != config.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: draft {draft} has {vocab} tokens, target {args.target} "
                f"{config.vocab_size}; drafts that fit: {drafts_that_fit(args.target, config)}")
    if with_prompt:
        p.tokenizer = Tokenizer.from_pretrained(target_path)
        p.text, p.ids = read_prompt(args, p.tokenizer)
        n = args.n_positions or len(p.ids) + args.max_new_tokens
        if p.k == "auto" and p.max_k >= n:  # the implicit MAX of plain 'auto' shrinks to a short run's cache
            p.k = f"auto:{n - 1}"
            p.max_k = as_policy(p.k).max_k
        p.n_positions = cache_length(args, config, len(p.ids), p.max_k)
    return p
