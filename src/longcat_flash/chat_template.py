"""Chat templates compiled as transformers compiles them (jinja2, sandboxed), so that a conversation renders to
the same prompt here and in `transformers.AutoTokenizer.apply_chat_template`. Imports nothing from the package:
every layer may use it."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import json_text

__all__ = ["CONFIG_FILE", "TEMPLATE_DIR", "TEMPLATE_FILE", "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "TemplateError",
           "UndefinedError", "check_template", "compile_template", "read_templates", "render_with_arguments",
           "writes_tool_calls_with"]

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 saves the template; it wins over the config key
TEMPLATE_DIR = "additional_chat_templates"  # transformers 5's named templates beside it: tool_use.jinja, ...
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
        value = json_text.loads(arguments) if arguments.strip() else {}
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


# ---- a model folder's templates

def _named_templates(config: dict[str, Any]) -> dict[str, str]:
    """HF's list of named templates in tokenizer_config.json (`default`, `tool_use`, ...), as a dict."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return {}
    if not (isinstance(template, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                 and isinstance(e.get("template"), str) for e in template)):
        raise ValueError(f"{CONFIG_FILE}: chat_template must be a string or a list of {{\"name\", \"template\"}} "
                         f"strings, got {template!r:.80}")
    return {entry["name"]: entry["template"] for entry in template}


def read_templates(directory: Path, config: dict[str, Any]) -> dict[str, str]:
    """The chat templates by name ("default", and HF's named ones: "tool_use", ...), as transformers reads them:
    from `chat_template.jinja` and `additional_chat_templates/*.jinja` when there are any (the config's are then
    ignored), else the config's `chat_template` (a string, or HF's list of named ones); none without any (the
    tokenizer's built-in one is then the default)."""
    files = [directory / TEMPLATE_FILE] if (directory / TEMPLATE_FILE).is_file() else []
    files += sorted((directory / TEMPLATE_DIR).glob("*.jinja")) if (directory / TEMPLATE_DIR).is_dir() else []
    templates = {}
    for file in files:
        template = file.read_text(encoding="utf-8")
        check_template(template, str(file.relative_to(directory)))  # named as the file the user edits
        templates["default" if file.name == TEMPLATE_FILE else file.name.removesuffix(".jinja")] = template
    where = f"{TEMPLATE_FILE} and {TEMPLATE_DIR}/" if files else f"{CONFIG_FILE}: chat_template"
    if not files:
        template = config.get("chat_template")
        templates = _named_templates(config) if isinstance(template, list) else {"default": template}
        if template is None:
            return {}
    if "default" not in templates:  # transformers refuses to pick one ("multiple chat templates with no default")
        raise ValueError(f"{where} names {sorted(templates)} but no 'default' template, the one a conversation "
                         "without tools renders with; name one 'default'")
    if isinstance(templates["default"], str) and not templates["default"].strip():  # rendered: an empty prompt
        raise ValueError(f"{TEMPLATE_FILE if files else where} is empty; remove it to use the built-in LongCat "
                         "template, or give the model's own")
    return templates
