"""models/: render a Hugging Face chat template (Jinja) without transformers, the way its apply_chat_template does.

What the template sees is what transformers gives it: the messages (keys whose value is None dropped, reasoning
copied under the names templates read), ``add_generation_prompt``, ``tools`` and ``documents`` (None here), and the
tokenizer's special tokens (``bos_token``, ``eos_token``...). The environment matches transformers' own: a sandbox
whose values cannot be changed, blocks trimmed and left-stripped, loop controls, ``tojson`` without HTML escaping,
``raise_exception`` and ``strftime_now``. Templates come from model files, i.e. from strangers: the sandbox stays.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

_REASONING = ("reasoning_content", "thinking", "reasoning")  # the first is the name most templates read


class TemplateUnsupported(Exception):
    """The template needs something only transformers' renderer has (e.g. the ``{% generation %}`` tag)."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template; TemplateUnsupported when this renderer cannot compile it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    from jinja2.utils import Namespace

    def check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat template: namespace attribute {name!r} (names starting with _ are refused)")

    class SafeNamespace(Namespace):
        def __setitem__(self, name, value):
            check(name)
            super().__setitem__(name, value)

    def namespace(*args, **kwargs) -> SafeNamespace:
        attrs = dict(*args, **kwargs)
        for k in attrs:
            check(k)
        return SafeNamespace(attrs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_now, dict=_Dict(), namespace=namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateUnsupported(f"{e.message} (line {e.lineno})") from None


def _plain(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(source: str, messages: list[dict], special_tokens: dict[str, Any],
                add_generation_prompt: bool = True) -> str:
    """The prompt text ``source`` makes of ``messages`` (ending with the assistant's turn when asked)."""
    return compile_template(source).render(messages=_plain(messages), tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **special_tokens)
