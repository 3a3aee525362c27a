"""Chat templates compiled as transformers compiles them (jinja2, sandboxed), so that a conversation renders to
the same prompt here and in `transformers.AutoTokenizer.apply_chat_template`. Imports nothing from the package:
every layer may use it."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "TemplateError", "UndefinedError", "check_template", "compile_template",
           "render_with_arguments", "writes_tool_calls_with"]

# LongCat's tool-call block (docs/chat_format.md), the only call format the server parses
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<longcat_tool_call>", "</longcat_tool_call>"


class _GenerationBlock(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (what marks the assistant's tokens for
    `return_assistant_tokens_mask` and TRL's assistant-only loss), rendered here as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)  # compiling takes ~10 ms, rendering ~0.05 ms; transformers caches it too
def compile_template(source: str) -> Any:
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks, loop controls, its
    `tojson` that keeps non-ASCII and does not HTML-escape), so both render the same prompt."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationBlock])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    return env.from_string(source)


def check_template(source: Any, name: str) -> None:
    """ValueError naming `name` unless `source` is a template jinja2 compiles (a syntax error would otherwise fail
    every conversation later, as a 500 from the server)."""
    if not isinstance(source, str):
        raise ValueError(f"{name} must be a string (a Jinja template), got {type(source).__name__}")
    try:
        compile_template(source)
    except TemplateSyntaxError as err:
        raise ValueError(f"{name} is not a valid Jinja template (line {err.lineno}: {err.message})") from None


def render_with_arguments(render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]]) -> str:
    """render(messages), with the calls' arguments given as JSON strings (OpenAI's wire form) passed as the objects
    they hold where the template needs objects, as vLLM passes them to every template: where it writes them with
    `tojson` (Qwen 2.5, Llama 3.1, Mistral), the string would come out quoted, and a model fine-tuned on that would
    learn to call with a string; where it reads them as a mapping (`arguments|items`: Qwen3-Coder, GLM-4.5), a
    string fails. A template that writes the string as it is (LongCat's, DeepSeek-V3's, Hermes') gets it verbatim."""
    strings = [c["function"]["arguments"] for m in messages for c in m.get("tool_calls") or []
               if isinstance(c.get("function", {}).get("arguments"), str)]
    if not strings:
        return render(messages)
    try:
        text = render(messages)
    except (TypeError, AttributeError, UndefinedError):  # the template's own code on a string: try the objects
        return render(_with_objects(messages))
    if any(json.dumps(s, ensure_ascii=False) in text for s in strings):  # written quoted: the template tojson'd it
        return render(_with_objects(messages))
    return text


def _with_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "tool_calls": [_as_object(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
            for m in messages]


def _as_object(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call.get("function", {}).get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return call  # not JSON: the template writes what it was given
    return {**call, "function": {**call["function"], "arguments": value}}


def writes_tool_calls_with(tokenizer: Any, tag: str) -> bool:
    """Whether the tokenizer's chat template writes an assistant's tool call inside `tag` (LongCat's opening tag:
    the only format `longcat serve` parses), found by rendering one call; once per template."""
    templates = tokenizer.chat_template, tokenizer.tool_chat_template, tag
    if templates not in _CALL_FORMAT:
        call = {"id": "call_0", "type": "function", "function": {"name": "probe", "arguments": "{}"}}
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {
                "role": "assistant", "content": None, "tool_calls": [call]}], add_generation_prompt=False,
                tools=[{"type": "function", "function": {"name": "probe"}}])
        except ValueError:
            text = ""
        _CALL_FORMAT[templates] = tag in text
    return _CALL_FORMAT[templates]


_CALL_FORMAT: dict[tuple[str | None, str | None, str], bool] = {}  # (templates, tag) -> whether they write it
