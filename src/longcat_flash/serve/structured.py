"""What a request's `response_format` and tool fields constrain its output to: one Lark grammar (infer/grammar.py)
per request, or none when the output is free text (docs/serving.md §3.3).

- `response_format` json_object / json_schema: the output is one compact JSON value of that schema.
- `tool_choice` "required": the prompt ends with the opening tag (serve/tools.py prefills it), so the grammar
  starts inside a call: `{"name": <one of the tools>, "arguments": <that tool's schema>}`, the closing tag, then,
  with parallel_tool_calls, more such blocks or the end. A named function: its prefill already holds the name,
  so the grammar starts at the arguments.
- `tool_choice` "auto" with a `strict` tool (or with a JSON response_format): the answer is text (or the JSON) or
  tool calls; a call's arguments follow its tool's schema when the tool is strict, and are any JSON object when
  not. The text may not spell the opening tag out of ordinary tokens, since the parser would read a call there
  that the grammar never checked.
Each call schema sits at the root of its own `%json`, so a tool's `$ref`s into its own `$defs` resolve.

Stop strings never cut what a grammar or the tool parser must read whole (`stop_scope`): with an output that is
all JSON (a JSON response_format, a forced call) they are refused, and text is scanned only outside call blocks.
"""
from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from jsonschema import Draft4Validator, Draft6Validator, Draft7Validator, Draft201909Validator, Draft202012Validator
from jsonschema.exceptions import best_match

from ..infer.grammar import Grammar, GrammarBusy, GrammarCompiler, GrammarError, GrammarTimeout, json_part
from ..tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from . import protocol as p
from .tools import ToolPlan

# Free text that never spells the opening tag (the tag itself is a token of its own in trained vocabularies).
TEXT = f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{TOOL_CALL_OPEN}(.|\\n)*/"
WS = "WS: /[ \\t\\r\\n]{1,8}/"  # JSON's whitespace, bounded: an untrained model would write it for ever
ANY_OBJECT = {"type": "object"}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# The drafts a tool's parameters may be written in (pydantic v1 wrote draft-07 tuples, `items: [...]`), newest first;
# their meta-schemas without format checks (Python's `re` is not ECMA-262: it refused `\p{L}`, which llguidance reads)
META_SCHEMAS = tuple(draft(draft.META_SCHEMA) for draft in (Draft202012Validator, Draft201909Validator,
                                                              Draft7Validator, Draft6Validator, Draft4Validator))
CHECKED_SCHEMA_CACHE = 256  # verdicts kept for schemas up to MAX_SCHEMA_CHARS: agents send the same tools each turn


class ConstraintError(ValueError):
    """A response_format or tool schema that cannot be honoured; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema the answer must follow, or None for free text (protocol.py checked the shape)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return ANY_OBJECT
    return response_format["json_schema"]["schema"] if kind == "json_schema" else None


def stop_scope(body: p._Sampling, plan: ToolPlan | None) -> tuple[list[str], tuple[str, str] | None]:
    """The stop strings the request's text is scanned for, and the (opening, closing) tags of blocks it is not
    scanned in: tool-call blocks when the reply may call tools (an output that is all JSON has no stop strings:
    `request_grammar` refuses them)."""
    return body.stop, (TOOL_CALL_OPEN, TOOL_CALL_CLOSE) if plan is not None and plan.tools else None


def lark(compiler: GrammarCompiler, body: p._Sampling, plan: ToolPlan | None) -> str | None:
    """The request's grammar, or None when nothing constrains it."""
    schema = response_schema(body.response_format)
    if plan is None or plan.tools is None:
        return None if schema is None else f"start: {json_part(schema)}\n"
    choice, tools = plan.choice, {tool["function"]["name"]: tool["function"] for tool in plan.tools}
    forced = plan.forced
    if forced and schema is not None:
        raise ConstraintError("response_format", "response_format: a JSON format cannot apply when tool_choice "
                                                 "forces a tool call (the output is then the call)")
    if not forced and schema is None and not any(fn.get("strict") for fn in tools.values()):
        return None  # auto, no strict tool: free text and unconstrained calls, as the parser reads them
    close = compiler.token(TOOL_CALL_CLOSE)
    if isinstance(choice, p.NamedToolChoice):  # the prefill ends right before the arguments; one call (OpenAI, vLLM)
        return f'start: {json_part(arguments_schema(tools[choice.function.name]))} "}}" WS? {close}\n{WS}\n'
    bodies = " | ".join(_call_body(name, fn, forced) for name, fn in tools.items())
    # JSON whitespace may pad a call inside its tags, as a template that writes `<tag>\n{...}\n</tag>` trained it
    rules = f"call: {compiler.token(TOOL_CALL_OPEN)} WS? call_body WS? {close}\ncall_body: {bodies}\n{WS}\n"
    if choice == "required":  # the prefill is the opening tag
        return f"start: WS? call_body WS? {close} {'call*' if plan.parallel else ''}\n{rules}"
    if schema is not None:
        return f"start: {json_part(schema)} | {'call+' if plan.parallel else 'call'}\n{rules}"
    return f"start: TEXT {'call*' if plan.parallel else 'call?'}\n{TEXT}\n{rules}"


def _call_body(name: str, fn: dict[str, Any], forced: bool) -> str:
    """`{"name": <name>, "arguments": <arguments>}`: the schema's when forced or strict, else any object."""
    arguments = arguments_schema(fn) if forced or fn.get("strict") else ANY_OBJECT
    head = json.dumps(f'{{"name": {json.dumps(name)}, "arguments": ')
    return f'{head} {json_part(arguments)} "}}"'


def arguments_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """A function's `parameters`; without them (OpenAI: "an empty parameter list") the empty object."""
    return fn.get("parameters", NO_ARGUMENTS)


async def request_grammar(compiler: GrammarCompiler, body: p._Sampling, plan: ToolPlan | None = None
                          ) -> Grammar | None:
    """The request's compiled grammar, or None; ConstraintError naming the field. Built off the event loop: the
    schemas' check walks every subschema of a body of up to --max-request-mb."""
    def build() -> Grammar | None:
        check_tool_schemas(getattr(body, "tools", None))
        if body.stop and ((plan is not None and plan.forced) or response_schema(body.response_format) is not None):
            raise ConstraintError("stop", "stop: stop strings cannot apply to an output that is all JSON (a JSON "
                                          "response_format, a forced tool call): a cut would leave it invalid, and "
                                          "the grammar ends it when it is complete; send one or the other")
        text = lark(compiler, body, plan)
        if text is not None and compiler.unavailable is not None:
            param = constraining_field(body, plan)
            raise ConstraintError(param, f"{param}: this server cannot constrain output (a JSON response_format, a "
                                         f"forced or strict tool call): {compiler.unavailable}")
        return None if text is None else compiler.compile(text)

    try:
        return await asyncio.to_thread(build)
    except GrammarBusy:
        raise
    except GrammarTimeout as err:  # compiled again to find the culprit, it would take as long once more
        param = constraining_field(body, plan)
        raise ConstraintError(param, f"{param}: the schema cannot be used to constrain the output: {err}") from None
    except GrammarError as err:
        param = await asyncio.to_thread(_culprit, compiler, body, plan)
        # llguidance's hint names its own option, which a request cannot set
        reason = str(err).replace("Enable 'coerce_one_of' option to approximate oneOf with anyOf", "Use anyOf instead")
        raise ConstraintError(param, f"{param}: the schema cannot be used to constrain the output: {reason}") from None


def check_tool_schemas(tools: list[p.Tool] | None) -> None:
    """Every tool's parameters a JSON Schema, whatever tool_choice: as OpenAI checks them, so a broken tool is
    refused on the request that sends it, not only on the first that forces a call (its grammar is compiled only
    then)."""
    for i, tool in enumerate(tools or []):
        text = json.dumps(arguments_schema(tool.function.model_dump(exclude_none=True)), sort_keys=True)
        if reason := (_cached_schema_error if len(text) <= p.MAX_SCHEMA_CHARS else _schema_error)(text):
            param = f"tools.{i}.function.parameters"
            raise ConstraintError(param, f"{param}: not a valid JSON Schema {reason}")


def _schema_error(text: str) -> str | None:
    """Why a schema (as JSON text) is valid in none of the drafts of META_SCHEMAS, as the newest one says; None
    when one accepts it."""
    schema = json.loads(text)
    errors = [best_match(meta.iter_errors(schema)) for meta in META_SCHEMAS]
    if any(err is None for err in errors):
        return None
    where = f"(at {'.'.join(map(str, errors[0].path))})" if errors[0].path else "(at its root)"
    return f"{where}: {errors[0].message:.300}"


_cached_schema_error = functools.lru_cache(maxsize=CHECKED_SCHEMA_CACHE)(_schema_error)


def constraining_field(body: p._Sampling, plan: ToolPlan | None) -> str:
    """The field that asks for the request's constraint: its JSON response_format, a tool_choice that forces a call,
    else its strict tools."""
    if response_schema(body.response_format) is not None:
        return "response_format"
    return "tool_choice" if plan is not None and plan.forced else "tools"


def _culprit(compiler: GrammarCompiler, body: p._Sampling, plan: ToolPlan | None) -> str:
    """Which field made the grammar fail: response_format if its schema fails alone, else the first tool whose
    parameters fail alone, else the tools together."""
    named = [("response_format.json_schema.schema", response_schema(body.response_format))]
    named += [(f"tools.{i}.function.parameters", arguments_schema(tool["function"]))
              for i, tool in enumerate(plan.tools if plan is not None and plan.tools else [])]
    for param, schema in named:
        if schema is None:
            continue
        try:
            compiler.json_schema(schema)
        except GrammarError:
            return param
    return "tools" if plan is not None and plan.tools else "response_format"
