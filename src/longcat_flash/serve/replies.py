"""A chat reply as the tool-call parser reads it: the generated text's pieces turned into content and tool-call
events (cut at a stop string a call block handed back as content holds), then joined into one message or turned
into stream deltas, so that both response shapes come from the same events.
"""
from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence

from ..tokenizer import TOOL_CALL_TOKENS
from . import responses as resp
from .tools import Event, ParsedToolCall, PlainText, ToolCallParser

TAGS = re.compile("|".join(map(re.escape, TOOL_CALL_TOKENS)))


async def parsed(pieces: AsyncIterator[tuple[str, str | None, int]], parser: ToolCallParser | PlainText,
                 stop: Sequence[str] = (), end: Callable[[], None] = lambda: None
                 ) -> AsyncIterator[tuple[list[Event], str | None, int]]:
    """`Generation.pieces` (serve/app.py) read through the tool-call parser: (events, finish reason or None, tokens
    so far).

    The reason is `tool_calls` once a call was made, unless `max_tokens` or the context cut the reply (`length`,
    as OpenAI reports a cut, calls made or not). With parallel calls off, the first complete call ends the
    request: closing `pieces` cancels it on the engine, so the tokens after the closing tag are never generated.
    `stop`: the stop strings the text was not scanned for inside call blocks; a block the parser hands back as
    content (its JSON no call, or never closed) is scanned for them here, and cut at the first (a reply that
    max_tokens cut still finishes with `length`, though the stop string came first: generation did not stop
    there, and an agent must see that its last block was cut). `end` is called
    once the reply is complete (`TextState.end`), before `pieces` is closed, so that the request's cancel on the
    engine counts as finished, not as a client gone.
    """
    try:
        async for delta, reason, n in pieces:
            events = parser.feed(delta)
            if parser.done or reason:
                events = events + parser.finish()
            events, stopped = cut_at_stop(events, stop)
            reason = "stop" if stopped and reason != "length" else reason  # max_tokens cut it all the same
            if parser.done or reason:
                end()
                yield events, "tool_calls" if parser.calls and reason != "length" else reason, n
                return
            yield events, None, n
    finally:
        await pieces.aclose()


def cut_at_stop(events: list[Event], stop: Sequence[str]) -> tuple[list[Event], bool]:
    """The events up to the first stop string in their content, and whether there was one. The tags of a block
    handed back as content are markup, not text: no stop string matches them or any part of them."""
    for i, event in enumerate(events):
        hits = [k for s in stop for k in _text_matches(event, s)] if isinstance(event, str) else []
        if hits:
            return [*events[:i], event[:min(hits)]], True
    return events, False


def _text_matches(content: str, stop: str) -> list[int]:
    """Where `stop` starts in `content`, its matches that overlap a tool-call tag left out."""
    tags = [(m.start(), m.end()) for m in TAGS.finditer(content)]
    starts = [m.start() for m in re.finditer(f"(?={re.escape(stop)})", content)] if stop else []
    return [k for k in starts if not any(a < k + len(stop) and k < b for a, b in tags)]


async def answer(turns: AsyncIterator[tuple[list[Event], str | None, int]]
                 ) -> tuple[resp.AssistantMessage, str, int]:
    """A non-streamed reply: the same events joined (content is null when the reply is only tool calls)."""
    content, calls, reason, n = "", [], "length", 0
    async for events, done, n in turns:
        content += "".join(event for event in events if isinstance(event, str))
        calls += [event.message() for event in events if isinstance(event, ParsedToolCall)]
        reason = done or reason
    return resp.AssistantMessage(content=content or (None if calls else ""), tool_calls=calls or None), reason, n


def deltas(events: list[Event]) -> list[resp.Delta]:
    """Stream deltas for parser events: content pieces, and per call its header delta then its arguments."""
    deltas = []
    for event in events:
        if isinstance(event, str):
            deltas.append(resp.Delta(content=event))
        else:
            deltas += [resp.Delta(tool_calls=[call_delta]) for call_delta in event.deltas()]
    return deltas
