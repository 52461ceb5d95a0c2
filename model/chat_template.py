"""Chat templates: jinja2 rendering with the environment transformers uses (sandboxed,
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a non-ASCII-escaping ``tojson``,
``raise_exception`` and ``strftime_now``), so the same template gives the same text."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """``messages``: [{"role": ..., "content": ...}, ...]. Extra variables (bos_token, tools, ...)
    are passed to the template as transformers passes them."""
    import jinja2

    from .tokenizer import TokenizerError

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TokenizerError("messages must be a list of dicts, each with a 'role' (and usually 'content')")
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None
