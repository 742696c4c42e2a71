"""Render a model's chat template in a Jinja sandbox.

A chat template is Jinja code written by whoever published the checkpoint: the compiler copies it from
the checkpoint's tokenizer into the artifact's manifest, and `awqc run --chat` renders it. Rendered by a
plain `jinja2.Environment`, a template reaches Python internals through attributes such as
`cycler.__init__.__globals__` and runs shell commands (the hole of CVE-2024-34359 in llama-cpp-python).
So templates are rendered only in jinja2's ImmutableSandboxedEnvironment, which refuses underscore and
interpreter-internal attributes and calls that modify the data passed in, with the helpers transformers
gives templates (`tojson`, `raise_exception`, `strftime_now`), so real templates render the same text as
transformers' `apply_chat_template`. The compiler trial-renders the template too
(`check_chat_template`), so a bad one fails `awqc compile` instead of reaching a device.

Imports only jinja2 and the standard library (the runtime must not need transformers).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# jinja2 releases before 3.1.6 have known sandbox escapes (CVE-2024-56326, CVE-2025-27516).
_MIN_JINJA = (3, 1, 6)
_RUN_FIX = "recompile the artifact from a checkpoint whose chat template you trust, or run without --chat"
_COMPILE_FIX = "fix or remove the checkpoint's chat template before compiling"


class ChatTemplateError(ValueError):
    """A chat template that does not compile, is refused by the sandbox, or fails while rendering."""


class _TemplateRaised(TemplateError):
    """raise_exception() called by the template; render_chat adds where the template came from."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON, as in transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict` for templates. It builds dicts but is not the dict type itself, whose unbound methods
    (`dict.update(messages[0], ...)`) would modify the caller's data past the immutable sandbox's check."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _jinja_version() -> tuple[int, ...]:
    parts = []
    for piece in jinja2.__version__.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    if _jinja_version() < _MIN_JINJA:
        raise ChatTemplateError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes, so chat templates are not rendered with it; "
            f"upgrade it (pip install -U 'jinja2>={'.'.join(map(str, _MIN_JINJA))}')")
    # trim_blocks, lstrip_blocks and loopcontrols as transformers sets them: templates are written for that
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    return env


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    # Keyed by the template text alone: a compiled template holds no source, and errors are not cached.
    return _environment().from_string(template)


def _compile(template: str, what: str, fix: str) -> jinja2.Template:
    try:
        return _compiled(template)
    except TemplateSyntaxError as err:
        problem = (err.message or "").rstrip(".")
        raise ChatTemplateError(f"{what} has a syntax error at line {err.lineno}: {problem}; {fix}") from None


def _render(template: str, messages: list[dict[str, Any]], what: str, fix: str, context: dict[str, Any]) -> str:
    compiled = _compile(template, what, fix)
    try:
        return compiled.render(messages=messages, **context)
    except _TemplateRaised as err:
        raise ChatTemplateError(f"{what} raised an error: {err.message}") from None
    except SecurityError as err:
        refused = str(err).rstrip(".")
        raise ChatTemplateError(
            f"{what} tried to access unsafe attributes and was refused ({refused}); nothing was run. "
            f"Do not use this template: {fix}") from None
    # Errors of the template's own logic: undefined names, wrong types, bad indices, too large a range()
    except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as err:
        raise ChatTemplateError(f"{what} failed while rendering: {type(err).__name__}: {err}; {fix}") from None


def compile_chat_template(template: str, source: str) -> jinja2.Template:
    """The template compiled in the sandbox; source (a path or description) names it in errors."""
    return _compile(template, f"the chat template in {source}", _RUN_FIX)


def render_chat(template: str, messages: list[dict[str, Any]], source: str, *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]), rendered in the sandbox.
    Raises ChatTemplateError, naming `source`, for any failure of the template."""
    # tools and documents are None unless given, as transformers passes them, so `{% if tools %}` agrees
    context = {"tools": None, "documents": None, "add_generation_prompt": add_generation_prompt,
               "bos_token": bos_token, "eos_token": eos_token, **extra}
    return _render(template, messages, f"the chat template in {source}", _RUN_FIX, context)


def check_chat_template(template: str, source: str, bos_token: str, eos_token: str) -> None:
    """Compile-time check of a checkpoint's template: compiles it and renders one user turn, which is
    the prompt `awqc run --chat` renders, so a template that would fail there fails the compile instead.
    source: the checkpoint path."""
    context = {"tools": None, "documents": None, "add_generation_prompt": True,
               "bos_token": bos_token, "eos_token": eos_token}
    _render(template, [{"role": "user", "content": "Hello"}], f"the chat template of {source}", _COMPILE_FIX,
            context)
