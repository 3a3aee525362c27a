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

__all__ = ["TemplateError", "compile_template"]


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
