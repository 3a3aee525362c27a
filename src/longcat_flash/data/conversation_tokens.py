"""Conversations -> tokens for supervised fine-tuning: each checked conversation (conversations.py) rendered with the
model's chat template, cut at its assistant turns, encoded, and its assistant tokens marked as trained; a template
that cannot show the model what training needs is refused naming the row and field (docs/sft.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, writes_tool_calls_with
from .conversations import Conversation, ConversationError


class ChatTokenizer(Protocol):
    fingerprint: str
    chat_template: str
    tool_chat_template: str | None
    bos_token: str | None
    eos_id: int | None
    eos_token: str | None
    pad_token: str | None
    special_ids: dict[str, int]
    pad_id: int | None

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None) -> str: ...

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, suffix: str = "") -> Any: ...

    def encode_chat(self, chat: Any, cuts: Sequence[int] = (),  # chat: render_chat's
                    start: int = 0) -> list[list[int]]: ...


def turn_bounds(tokenizer: ChatTokenizer, conversation: Conversation, ends: Sequence[str] = (),
                window: int | None = None) -> tuple[Any, list[int], list[bool], list[list[int]]]:
    """The rendered conversation (`render_chat`), the offsets cutting it into pieces, whether each is trained, and
    the first pieces' ids where the window's count encoded them (`tokenize` encodes the rest); `ends`: the texts
    of the tokens generation stops at (default: the tokenizer's eos), one of which ends a turn.

    An assistant turn is what the template adds after the generation prompt of the messages before it, up to
    and including its end-of-turn token: exactly what the model writes when served. Found by rendering the
    prefixes, so any template that renders a conversation as an extension of its prefixes works. That costs time
    quadratic in a conversation's length (an agent trace of 200 tool calls took 14 s), so with `window` (the
    tokens training keeps of it) the turns that start past it are not looked for: cut away, they train nothing,
    and every token within the window is the same as without it."""
    messages, tools = conversation.messages, conversation.tools
    try:
        full = tokenizer.render_chat(messages, add_generation_prompt=False, tools=tools)
    except ValueError as err:
        raise ConversationError(f"{conversation.where}: {conversation.in_row_terms(str(err))}") from None
    if tools and full.text == _rendered_without_tools(tokenizer, messages):
        raise ConversationError(f"{conversation.where}: tools: the chat template does not render tools (the "
                                "conversation reads the same without them), so the model would learn calls to tools "
                                "it was never shown")
    cuts, trained, done, eos = [], [], 0, tokenizer.eos_token or ""
    counted: list[list[int]] = []  # the pieces encoded for the window's count: those before cuts[len(counted) - 1]
    stops = [e for e in ends or [eos] if e]  # the texts of the tokens generation stops at
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
            turn = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tools=tools)
        except ValueError as err:
            raise ConversationError(f"{conversation.where}: {conversation.field(i)}: "
                                    f"{conversation.in_row_terms(str(err))}") from None
        if eos and not full.text.startswith(turn) and turn.endswith(eos) and full.text.startswith(turn[:-len(eos)]):
            turn = turn[:-len(eos)]  # a template that closes every render with eos (Phi-3's): the turn is before it
        if not (len(prompt) >= done and turn.startswith(prompt) and full.text.startswith(turn)):
            raise ConversationError(f"{conversation.where}: {conversation.field(i)}: the chat template does not render "
                                    f"the conversation as an extension of its prefixes; cannot find the "
                                    f"assistant turn")
        if window is not None:
            counted = _encoded_to(tokenizer, full, cuts, len(prompt), window, counted)
            if sum(map(len, counted)) >= window:
                _check_call_format(tokenizer, conversation)
                return full, cuts + [len(prompt)], trained + [False, False], counted  # this turn on: past the window
        written = [(a, b) for a, b, _ in full.specials if len(prompt) <= a and b <= len(turn)]
        _check_turn(tokenizer, conversation, i, prompt, turn[len(prompt):], stops, [full.text[a:b] for a, b in written])
        cuts += [len(prompt), _end_of_reply(tokenizer, full.text, written, stops, len(prompt), len(turn))]
        trained += [False, i not in conversation.untrained]
        done = len(turn)
    _check_call_format(tokenizer, conversation)
    return full, cuts, trained + [False], counted


def _check_call_format(tokenizer: ChatTokenizer, conversation: Conversation) -> None:
    """A conversation with tool calls needs a template that writes them as `longcat serve` parses them (after the
    turns' own checks, which name the message)."""
    if any(m.get("tool_calls") for m in conversation.messages) and not writes_tool_calls_with(tokenizer,
                                                                                              TOOL_CALL_OPEN):
        raise ConversationError(f"{conversation.where}: tool_calls: the chat template writes tool calls in another "
                                f"format than {TOOL_CALL_OPEN}...{TOOL_CALL_CLOSE}, the only one `longcat serve` "
                                "parses: the model would learn calls the server returns as text")


def _encoded_to(tokenizer: ChatTokenizer, full: Any, cuts: list[int], end: int, window: int,
                counted: list[list[int]]) -> list[list[int]]:
    """The pieces of full.text[:end] as `tokenize` encodes them (`end`: the next cut), going on from `counted`
    (`_encoded_on`), so each text is encoded once however many turns are counted (from the start each time, a
    conversation's encoding grew with the square of its turns). While full.text[:end] has fewer UTF-8 bytes than
    `window` nothing is encoded and `counted` comes back as it is: its tokens are fewer still, so under `window`
    too (a token holds a byte at least; a tokenizer may add one in front)."""
    if len(full.text[:end].encode("utf-8", "surrogatepass")) + 1 < window:
        return counted
    return _encoded_on(tokenizer, type(full)(full.text[:end], tuple(s for s in full.specials if s[1] <= end)), cuts,
                       counted)


def _encoded_on(tokenizer: ChatTokenizer, chat: Any, cuts: list[int], counted: list[list[int]]) -> list[list[int]]:
    """The pieces of `chat` cut at `cuts`: `counted`, encoded already, then the rest. `counted` must be the pieces
    before cuts[len(counted) - 1], whole: turn_bounds cuts at every offset it counts to."""
    start = cuts[len(counted) - 1] if counted else 0
    return counted + tokenizer.encode_chat(chat, cuts[len(counted):], start=start)


def _rendered_without_tools(tokenizer: ChatTokenizer, messages: Sequence[dict[str, Any]]) -> str | None:
    """The conversation rendered with no tools, or None when the template cannot render it so (a named `default`
    template beside a `tool_use` one, failing on a call: it reads the tools)."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tools=None)
    except ValueError:
        return None


def _check_turn(tokenizer: ChatTokenizer, conversation: Conversation, i: int, prompt: str, turn: str,
                stops: list[str], written: list[str]) -> None:
    """What training needs of assistant turn i as the template renders it: its prompt shows the tools (or the
    model would learn calls to tools it never saw), the turn holds each of the message's calls (or it would learn
    to answer without them) and a token generation stops at (or it would never stop), written by the template
    (`written`: its special tokens in the turn; a special token's text inside a message is text, not the token)."""
    where, message = f"{conversation.where}: {conversation.field(i)}", conversation.messages[i]
    for k, tool in enumerate(conversation.tools or []):
        if tool["function"]["name"] not in prompt:
            raise ConversationError(f"{conversation.where}: tools[{k}]: the chat template does not render the tools "
                                    f"(no {tool['function']['name']!r} in the prompt of {conversation.field(i)}), so "
                                    "the model would learn calls to tools it was never shown")
    for j, call in enumerate(message.get("tool_calls") or []):
        if call["function"]["name"] not in turn:
            raise ConversationError(f"{conversation.where}: {conversation.call_field(i, j)}: the chat template does "
                                    f"not render this call to {call['function']['name']!r}, so the model would "
                                    "learn to answer without it")
    if stops and not any(end in written if end in tokenizer.special_ids else end in turn for end in stops):
        raise ConversationError(f"{where}: the chat template ends the assistant turn without a token generation "
                                f"stops at ({', '.join(map(repr, stops))}): the model would never learn to stop (end "
                                "the template's assistant turns with eos_token, or add the template's end of turn to "
                                "the model's eos_token_id)")


def _end_of_reply(tokenizer: ChatTokenizer, text: str, written: list[tuple[int, int]], stops: list[str],
                  start: int, end: int) -> int:
    """The offset just past the first stop token in text[start:end] (`written`: the template's special tokens
    there): what the model writes when served, since generation ends there. What the template puts after it
    (ChatML's newline after `<|im_end|>`) is never generated, so it is not trained."""
    found = [b for a, b in written if text[a:b] in stops]
    found += [text.find(s, start, end) + len(s) for s in stops
              if s not in tokenizer.special_ids and s in text[start:end]]
    return min(found, default=end)


def tokenize(tokenizer: ChatTokenizer, conversation: Conversation, ends: Sequence[str] = (),
             window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), trained (N,) bool): the pieces encoded one by one (only the template's special tokens parsed,
    as the server encodes a prompt), so no token straddles the start or end of an assistant turn. With `window`,
    assistant turns that start past the first `window` tokens are not trained (turn_bounds)."""
    try:
        full, cuts, trained, counted = turn_bounds(tokenizer, conversation, ends, window)
        encoded = _encoded_on(tokenizer, full, cuts, counted)  # one piece per entry of `trained`
    except ConversationError:
        raise
    except ValueError as err:  # text the tokenizer cannot take, a cut it cannot make (met first by the window's
        raise ConversationError(f"{conversation.where}: {err}") from None  # count or by this): the row is named
    ids = np.fromiter((i for piece in encoded for i in piece), dtype=np.int32)  # the windows' dtype
    mask = np.fromiter((t for piece, t in zip(encoded, trained) for _ in piece), dtype=bool, count=len(ids))
    return ids, mask
