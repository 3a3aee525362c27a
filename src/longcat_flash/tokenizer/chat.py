"""The chat format's side of the tokenizer: LongCat's default chat template (docs/chat_format.md) and the checks
a conversation passes before any template renders it, plus the blanking `Tokenizer.render_chat` uses to tell the
template's special tokens from a message's."""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

CHAT_ROLES = ("system", "user", "assistant", "tool")

# LongCat-Flash-Chat's round format with tools (docs/chat_format.md):
#   SYSTEM:{s}\n\n{tools} [Round 0] USER:{u} ASSISTANT:{a}<longcat_tool_call>{...}</longcat_tool_call></s>
#   [Round 1] USER:<longcat_tool_response>{result}</longcat_tool_response> ASSISTANT:
# Tool-call arguments are written verbatim when a string (the OpenAI wire form), as JSON when a dict (the HF form).
DEFAULT_CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{- content -}}{%- else -%}{%- for part in content or [] -%}{{- part['text'] -}}\
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(round=0) -%}
{%- set has_system = messages[0]['role'] in ['system', 'developer'] -%}
{%- if has_system or tools -%}
{{- 'SYSTEM:' + (text(messages[0]['content']) if has_system else '') -}}
{%- if tools -%}
{%- if has_system -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\nYou can call these functions, each given as a JSON object with its name, description and \
the JSON Schema of its arguments:\n<longcat_tools>\n' -}}
{%- for tool in tools -%}{{- (tool['function'] if tool['function'] is defined else tool) | tojson + '\n' -}}\
{%- endfor -%}
{{- '</longcat_tools>\nTo call a function, write its name and arguments as a JSON object inside \
<longcat_tool_call></longcat_tool_call> tags, one block per call:\n<longcat_tool_call>{"name": <function-name>, \
"arguments": <arguments-object>}</longcat_tool_call>' -}}
{%- endif -%}
{{- ' ' -}}
{%- endif -%}
{%- for message in messages -%}
{%- set previous = messages[loop.index0 - 1]['role'] if not loop.first else none -%}
{%- if message['role'] in ['system', 'developer'] -%}
{%- if not loop.first -%}{{- raise_exception('only the first message may be a system message') -}}{%- endif -%}
{%- elif message['role'] in ['user', 'tool'] -%}
{%- if previous in ['user', 'tool'] and (message['role'] == 'user' or previous == 'user') -%}{{- '\n' -}}
{%- elif previous not in ['user', 'tool'] -%}{{- '[Round ' + ns.round|string + '] USER:' -}}{%- endif -%}
{%- if message['role'] == 'user' -%}{{- text(message['content']) -}}
{%- else -%}{{- '<longcat_tool_response>' + text(message['content']) + '</longcat_tool_response>' -}}{%- endif -%}
{%- elif message['role'] == 'assistant' -%}
{%- if previous == 'assistant' -%}{{- raise_exception('two assistant messages in a row') -}}{%- endif -%}
{{- ' ASSISTANT:' -}}
{%- generation -%}
{{- text(message['content']) -}}
{%- for call in message['tool_calls'] or [] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{%- set args = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}
{{- '<longcat_tool_call>{"name": ' + fn['name'] | tojson + ', "arguments": ' + args + '}</longcat_tool_call>' -}}
{%- endfor -%}
{{- eos_token -}}
{%- endgeneration -%}
{%- set ns.round = ns.round + 1 -%}
{%- else -%}
{{- raise_exception('unknown role ' + message['role']|string) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}
"""


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Fail early on malformed chat input, naming the message, instead of rendering a broken prompt."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role = message.get("role")
        if role not in CHAT_ROLES and role != "developer":
            raise ValueError(f"messages[{i}]['role'] must be one of {CHAT_ROLES} (or 'developer', read as "
                             f"'system'), got {role!r}")
        content = message.get("content")
        text_parts = isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content)
        if not (isinstance(content, str) or text_parts
                or (content is None and role == "assistant" and message.get("tool_calls"))):
            raise ValueError(f"messages[{i}]['content'] must be a str or a list of text parts (or None in an "
                             f"assistant message with tool_calls), got {content!r}")
        if role in ("system", "developer") and i != 0:
            raise ValueError(f"messages[{i}] is a {role} message; only messages[0] may be one")
        if role == "assistant" and i and messages[i - 1].get("role") == "assistant":
            raise ValueError(f"messages[{i}] is an assistant message right after another; a conversation "
                             "alternates (consecutive user messages are joined, assistant ones are not)")


def validate_tools(tools: Sequence[dict[str, Any]] | None) -> None:
    """Tools are a list of JSON objects (OpenAI's {"type": "function", "function": {...}}): a string or a dict
    rendered character by character, or key by key, as tools."""
    if tools is None:
        return
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool definitions (JSON objects), got {tools!r}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be a tool definition (a JSON object such as {{'type': 'function', "
                             f"'function': {{...}}}}), got {tool!r}")


@functools.lru_cache(maxsize=8)
def special_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Matches any of `tokens`, the longest first (as the tokenizer splits them)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def blanked(value: Any, pattern: re.Pattern, blank: str) -> Any:
    """`value` (JSON-like) with every match of `pattern` in its strings replaced by as many `blank`s."""
    if isinstance(value, str):
        return pattern.sub(lambda m: blank * len(m.group()), value)
    if isinstance(value, dict):
        return {k: blanked(v, pattern, blank) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [blanked(v, pattern, blank) for v in value]
    return value
