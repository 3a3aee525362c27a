"""Tool calls in the LongCat format: what a request's `tools` / `tool_choice` mean for the prompt, and the parser
that turns `<longcat_tool_call>{"name": ..., "arguments": {...}}</longcat_tool_call>` blocks in generated text into
OpenAI `tool_calls` (docs/chat_format.md).

One parser serves both response shapes: a non-streamed answer is the streamed events joined, so the two always
agree. A call is emitted once its closing tag has arrived and its JSON parsed; a block whose JSON is not a
`{"name": str, "arguments": object}` stays in the content as the text it was, so nothing generated is lost.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..chat_template import writes_tool_calls_with
from ..tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer
from . import protocol as p
from . import responses as resp
from .text import block_end, partial_tag


class ToolRequestError(ValueError):
    """A request whose tool fields disagree with each other or with its messages; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ParsedToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as a string (the OpenAI wire form)

    def message(self) -> p.ToolCall:
        return p.ToolCall(id=self.id, function=p.FunctionCall(name=self.name, arguments=self.arguments))

    def deltas(self) -> list[resp.ToolCallDelta]:
        """The OpenAI streaming shape: the id, type and name first, then the arguments."""
        return [resp.ToolCallDelta(index=self.index, id=self.id, type="function",
                                function=resp.FunctionDelta(name=self.name, arguments="")),
                resp.ToolCallDelta(index=self.index, function=resp.FunctionDelta(arguments=self.arguments))]


Event = str | ParsedToolCall  # a piece of content, or a complete call


def parse_call(body: str, index: int) -> ParsedToolCall | None:
    """The call in one block's text, or None when it is not `{"name": str, "arguments": object}` JSON (other
    members, `"id"` or `"type"`, are passed over, as vLLM's parser does; arguments left out mean `{}`, but not
    beside another member, such as `"parameters"`: read as a call, the model's arguments were lost). The arguments
    are passed on as the model wrote them, as OpenAI does: re-encoded, a number too large for a double became
    `-Infinity`, which is not JSON."""
    members = _members(body)
    if members is None or not isinstance(name := members.get("name", (None,))[0], str) or not name:
        return None
    if "arguments" not in members and members.keys() - {"name"}:
        return None
    arguments, text = members.get("arguments", ({}, "{}"))
    return ParsedToolCall(index, f"call_{uuid.uuid4().hex[:24]}", name, text) if isinstance(arguments, dict) else None


def _members(text: str) -> dict[str, tuple[object, str]] | None:
    """The members of the JSON object `text` as key -> (value, its text), or None when `text` is not one JSON
    object (NaN and Infinity, which Python's json reads, are not JSON)."""
    decoder, i = p.STRICT_JSON, _WHITESPACE.match(text).end()
    if text[i:i + 1] != "{":
        return None
    members, i = {}, _WHITESPACE.match(text, i + 1).end()
    try:
        while text[i:i + 1] != "}" or members:
            key, i = decoder.raw_decode(text, i)
            i = _WHITESPACE.match(text, i).end()
            if not isinstance(key, str) or text[i:i + 1] != ":":
                return None
            start = _WHITESPACE.match(text, i + 1).end()
            value, i = decoder.raw_decode(text, start)
            members[key] = value, text[start:i]
            i = _WHITESPACE.match(text, i).end()
            if text[i:i + 1] == "}":
                break
            if text[i:i + 1] != ",":
                return None
            i = _WHITESPACE.match(text, i + 1).end()
    except (ValueError, RecursionError):  # json.JSONDecodeError, a NaN / Infinity constant, or nested past json's reach
        return None
    return members if _WHITESPACE.match(text, i + 1).end() == len(text) else None


_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class ToolCallParser:
    """Incremental: `feed` generated text, `finish` at the end; each returns events in order. Markup never
    reaches a content event unless its block is invalid. `prefill` is text the prompt already ends with (a forced
    call's opening); the parser reads it as generated."""

    prefill: str = ""
    parallel: bool = True  # False: `done` turns true after the first call, and the caller stops generation
    calls: list[ParsedToolCall] = field(default_factory=list)
    _buffer: str = ""
    _in_call: bool = False
    _searched: int = 0  # how much of the call's text holds no closing tag
    _blank: str = ""  # trailing whitespace held back: dropped when only calls follow it

    def __post_init__(self) -> None:
        self.feed(self.prefill)

    @property
    def done(self) -> bool:
        return not self.parallel and bool(self.calls)

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while not self.done and self._step(events):
            pass
        return events

    def _step(self, events: list[Event]) -> bool:
        """Consume one tag's worth of the buffer; False when the buffer needs more text."""
        if not self._in_call:
            at = self._buffer.find(TOOL_CALL_OPEN)
            cut = len(self._buffer) - partial_tag(self._buffer, TOOL_CALL_OPEN) if at < 0 else at
            self._content(self._buffer[:cut], events)
            self._buffer = self._buffer[cut + len(TOOL_CALL_OPEN):] if at >= 0 else self._buffer[cut:]
            self._in_call = at >= 0
            return at >= 0
        end = block_end(self._buffer, TOOL_CALL_CLOSE, self._searched)
        if end < 0:  # the tags so far were an argument's text: the next feed searches on from here
            self._searched = max(0, len(self._buffer) - len(TOOL_CALL_CLOSE) + 1)
            return False
        self._searched = 0
        body, self._buffer, self._in_call = self._buffer[:end], self._buffer[end + len(TOOL_CALL_CLOSE):], False
        call = parse_call(body, len(self.calls))
        if call is None:
            self._content(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, events)
        else:
            self.calls.append(call)
            events.append(call)
            self._blank = ""  # whitespace before a call is dropped, not carried to the text after it
        return True

    def finish(self) -> list[Event]:
        """Flush at the end of generation: an unterminated block is content, as generated."""
        events: list[Event] = []
        if not self.done:
            self._content((TOOL_CALL_OPEN if self._in_call else "") + self._buffer, events)
        if self._blank and not self.calls:
            events.append(self._blank)
        self._buffer, self._blank, self._in_call = "", "", False
        return events

    def _content(self, text: str, events: list[Event]) -> None:
        """Trailing whitespace waits for what follows, so the content does not depend on how text was split."""
        text = self._blank + text
        kept = text.rstrip()
        if kept:
            events.append(kept)
        self._blank = text[len(kept):]


@dataclass
class PlainText:
    """The parser's interface without parsing, for requests whose tools are off: every piece is content."""

    calls: tuple = ()
    done: bool = False

    def feed(self, text: str) -> list[Event]:
        return [text] if text else []

    def finish(self) -> list[Event]:
        return []


@dataclass(frozen=True)
class ToolPlan:
    """What one request's tool fields mean for its generation."""

    tools: list[dict] | None  # the tools, normalised (what the grammar reads: parameters typed as objects); None: off
    prefill: str  # appended after the prompt's ` ASSISTANT:` so the model must continue a call
    parallel: bool
    choice: str | p.NamedToolChoice = "none"  # the effective tool_choice (serve/structured.py constrains by it)
    history: tuple[p.ChatMessage, ...] = ()  # the messages to render: tool results in the order of their calls
    shown: list[dict] | None = None  # the tools as the client sent them: what the prompt renders

    @property
    def forced(self) -> bool:
        """The reply is a call (tool_choice `required` or a named function): it starts inside one."""
        return self.choice == "required" or isinstance(self.choice, p.NamedToolChoice)

    def parser(self) -> ToolCallParser | PlainText:
        return ToolCallParser(self.prefill, self.parallel) if self.tools else PlainText()


def plan_tools(body: p.ChatCompletionRequest) -> ToolPlan:
    """Check the tool fields against each other and the messages, then decide the prompt.

    `none` renders the tools (as vLLM does by default, and as OpenAI's model sees them) and parses nothing: the reply
    is content; `required` prefills the opening tag, a named function also its
    name, so even a model that would rather answer in prose continues a call (whose arguments the grammar of
    serve/structured.py then constrains to the tool's schema).
    """
    history = tuple(in_call_order(body.messages))
    names = [tool.function.name for tool in body.tools or []]
    if len(set(names)) != len(names):
        raise ToolRequestError("tools", f"tool names must be unique, got {names}")
    choice = body.tool_choice or ("auto" if names else "none")
    if choice != "none" and not names:
        raise ToolRequestError("tool_choice", f"tool_choice {_choice_text(choice)} needs a non-empty `tools` list")
    if isinstance(choice, p.NamedToolChoice) and choice.function.name not in names:
        raise ToolRequestError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not among "
                                              f"the tools {names}")
    shown = [t.given for t in body.tools] if body.tools else None
    if choice == "none":
        return ToolPlan(None, "", body.parallel_tool_calls, history=history, shown=shown)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return ToolPlan(tools, _prefill(choice), body.parallel_tool_calls, choice, history, shown)


def _prefill(choice: str | p.NamedToolChoice) -> str:
    if isinstance(choice, p.NamedToolChoice):
        return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(choice.function.name, ensure_ascii=False)}, "arguments": '
    return TOOL_CALL_OPEN if choice == "required" else ""


def _choice_text(choice: str | p.NamedToolChoice) -> str:
    return repr(choice) if isinstance(choice, str) else f"naming {choice.function.name!r}"


def in_call_order(messages: list[p.ChatMessage]) -> list[p.ChatMessage]:
    """The history as the template renders it, checked: the run of `tool` messages after an assistant message with
    calls answers each call exactly once (a call left unanswered is refused, at the end too), as OpenAI requires,
    and is put in the order of the calls (the prompt does not carry the ids, so the model pairs results with calls
    by position); any order is accepted."""
    ordered: list[p.ChatMessage] = []
    calls: dict[str, str] = {}  # the latest assistant message's calls: id -> function name
    run: dict[str, p.ChatMessage] = {}  # results seen since it, by id
    for i, message in enumerate([*messages, None]):
        if message is not None and message.role == "tool":
            if message.tool_call_id in run:
                raise ToolRequestError(f"messages.{i}.tool_call_id", f"messages[{i}] answers tool call "
                                       f"{message.tool_call_id!r} a second time; one tool message answers each call")
            if message.tool_call_id not in calls:
                before = (f"the assistant message before it did not make (its calls: {list(calls)})" if calls else
                          "no assistant message with tool calls made right before it")
                raise ToolRequestError(f"messages.{i}.tool_call_id", f"messages[{i}] answers tool call "
                                       f"{message.tool_call_id!r}, which {before}")
            if message.name is not None and message.name != calls[message.tool_call_id]:
                raise ToolRequestError(f"messages.{i}.name", f"messages[{i}] is named {message.name!r}, but the call "
                                       f"{message.tool_call_id!r} it answers is to {calls[message.tool_call_id]!r}")
            run[message.tool_call_id] = message
            continue
        if len(run) < len(calls):  # none answered too: the conversation went on (or ends) as if it never called
            missing = [c for c in calls if c not in run]
            raise ToolRequestError(f"messages.{i - 1}", f"tool calls {missing} have no result: an assistant message "
                                                        "with tool_calls must be followed by one tool message per call")
        ordered += [run[c] for c in calls if c in run]
        if message is not None:
            ordered.append(message)
            ids, run = [call.id for call in message.tool_calls or []], {}
            calls = {call.id: call.function.name for call in message.tool_calls or []}
            for k, call_id in enumerate(ids):
                if call_id in ids[:k]:  # its results could not be told apart
                    raise ToolRequestError(f"messages.{i}.tool_calls.{k}.id", f"messages[{i}] makes two tool calls "
                                           f"with the id {call_id!r}; each call needs its own id, which its tool "
                                           "message names")
    return ordered


def template_drops(tokenizer: Tokenizer, history: list[dict[str, Any]], tools: list[dict] | None
                   ) -> tuple[str, str] | None:
    """(param, what) when the model's chat template cannot show the model what the request holds, found by
    rendering without it (the prompt is then the same): the tools, the calls or the results in the history; or
    when it writes calls in another format than the LongCat one, the only one the server parses. None when
    nothing is lost. A model served with its own template (a plain ChatML one) would otherwise be prompted
    without them, silently."""
    def same_without(changed: list[dict[str, Any]], changed_tools: list[dict] | None) -> bool:
        try:
            return tokenizer.apply_chat_template(changed, tools=changed_tools) == full
        except ValueError:  # the template refuses the reduced conversation: it did read what was removed
            return False
    full = tokenizer.apply_chat_template(history, tools=tools)
    if tools and same_without(history, None):
        return "tools", "does not render tools (the prompt is the same without them), so the model would never see them"
    if tools and not writes_tool_calls_with(tokenizer, TOOL_CALL_OPEN):
        return "tools", (f"writes tool calls in another format than {TOOL_CALL_OPEN}...{TOOL_CALL_CLOSE}, the only "
                         "one this server parses into tool_calls")
    calls = [i for i, m in enumerate(history) if m.get("tool_calls")]
    without_calls = [{**{k: v for k, v in m.items() if k != "tool_calls"}, "content": m.get("content") or ""}
                     if m.get("tool_calls") else m for m in history]
    if calls and same_without(without_calls, tools):
        return f"messages.{calls[0]}.tool_calls", "does not render the tool calls in the history"
    results = [i for i, m in enumerate(history) if m["role"] == "tool"]
    if results and same_without([m for m in history if m["role"] != "tool"], tools):
        return f"messages.{results[0]}", "does not render tool results"
    return None


