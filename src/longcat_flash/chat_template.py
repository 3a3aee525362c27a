"""Chat templates compiled as transformers compiles them (jinja2, sandboxed), so that a conversation renders to
the same prompt here and in `transformers.AutoTokenizer.apply_chat_template`. Imports nothing from the package:
every layer may use it."""
from __future__ import annotations

import functools
import json
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateError", "compile_template", "with_argument_objects"]


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


_PROBE_ARGUMENTS = '{"probe": 1}'


@functools.lru_cache(maxsize=16)
def _writes_arguments_as_json(source: str) -> bool:
    """Whether a template writes a call's arguments through `tojson` (Qwen 2.5's, Llama 3.1's, Mistral's do): given the
    OpenAI wire form, a JSON string, it would write that string quoted and escaped. Found by rendering one call."""
    call = {"id": "call00000", "type": "function",  # 9 characters: Mistral's template refuses other ids
            "function": {"name": "probe", "arguments": _PROBE_ARGUMENTS}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call00000", "content": "y"}]
    tools = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}]
    try:
        text = compile_template(source).render(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=False, bos_token="", eos_token="", pad_token="")
    except (TemplateError, TypeError, AttributeError, KeyError, IndexError, ValueError):  # cannot render the probe:
        return False  # it gets the messages as they are
    return json.dumps(_PROBE_ARGUMENTS) in text


def with_argument_objects(source: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for template `source`: where the template writes a call's arguments with `tojson`, each call's
    arguments given as a JSON string (the OpenAI wire form) are passed as the object it holds, as vLLM passes them
    (the string would be written quoted, and a model fine-tuned on that would learn to call with a string). A
    template that writes strings as they are (LongCat's, DeepSeek-V3's) gets them verbatim."""
    if not any(isinstance(c.get("function", {}).get("arguments"), str) for m in messages
               for c in m.get("tool_calls") or []) or not _writes_arguments_as_json(source):
        return messages
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
