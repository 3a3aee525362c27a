"""The text side of generation, shared by the server and the CLI: incremental detokenization and stop strings.

The engine sees token ids only. A stop string is a property of the text, not of the ids (the same string can be
tokenized many ways), so it is matched here, on the consumer's side (the HTTP handler, the CLI loop), never on the
engine's step thread; the consumer cancels the request when `TextState.stopped` turns true.

Every id costs O(1): `tokenizers`' `DecodeStream` decodes only a small window of recent ids (it holds back bytes
that do not yet form a whole UTF-8 character), and only the tail that could still grow into a stop string
(`hold` = longest stop string - 1 characters) is kept back and re-scanned.

Text between a pair of `blocks` tags (a tool call's `<longcat_tool_call>` ... `</longcat_tool_call>`) is never
scanned: a stop string there would cut the call into markup that is neither a call nor content.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from ..tokenizer import Tokenizer

# No UTF-8 character spans more than 4 bytes, so more ids than this without a character are invalid bytes:
# emit them as U+FFFD (as a full decode would) rather than let the stream's window grow without bound.
MAX_PENDING_IDS = 8
CONTEXT_IDS = 5  # prompt ids the first generated id is decoded after (vLLM's detokenizer starts 5 back too)
_ESCAPE = re.compile(r"\\.", re.DOTALL)  # a backslash escape in JSON text: its quote is no string's end


def block_end(body: str, closing: str, start: int = 0) -> int:
    """Where the `closing` tag of a block whose text so far is `body` starts (searched from `start`: a tag before it
    was text already), or -1. The first tag that is not inside a string of the JSON the block opens: a tool call's
    argument may hold the tag's text (`{"note": "</longcat_tool_call>"}`, as a schema's const can force); in a block
    that is no JSON's start (a malformed call, `{"q": "5" tall"}`) every tag ends it."""
    at = body.find(closing, start)
    while at >= 0 and _inside_json_string(body[:at]):
        at = body.find(closing, at + 1)
    return at


def _inside_json_string(text: str) -> bool:
    """Whether `text` is the start of a JSON value that ends inside one of its strings: closed there (as a value,
    or as a key) with the brackets left open, it parses."""
    unescaped = _ESCAPE.sub("", text)
    if unescaped.count('"') % 2 == 0:
        return False
    depth: list[str] = []
    for part in unescaped.split('"')[::2]:  # the text outside strings
        for char in part:
            if char in "{[":
                depth.append("}" if char == "{" else "]")
            elif char in "}]" and depth:
                depth.pop()
    closers = "".join(reversed(depth))
    for end in ('"', '": 0'):
        try:
            json.loads(text + end + closers)
            return True
        except (ValueError, RecursionError):  # RecursionError: nested past what json reads, no call either
            pass
    return False


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that could still grow into `tag` (held back while streaming)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)


class TextState:
    """One request's text: feed it the generated ids as they arrive; it returns the text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), blocks: tuple[str, str] | None = None,
                 context: Sequence[int] = ()) -> None:
        """`context`: the prompt's ids, whose end the first generated id is decoded after, so that the text reads
        as the whole sequence decodes (a SentencePiece token's leading space is dropped at the start of a text)."""
        self.stop = [s for s in stop if s]
        self.hold = max(map(len, self.stop), default=1) - 1
        self.blocks = blocks if self.stop else None  # (opening tag, closing tag) of text never scanned
        self._block: list[str] | None = None  # the text of the block being passed through, from its opening tag on
        self._backend = tokenizer.backend  # DecodeStream needs the tokenizers.Tokenizer itself
        context = list(context[-CONTEXT_IDS:])
        if context and self._backend.decode(context).endswith("\ufffd"):  # it ends inside a character, which the
            context = []  # stream would show again, whole, with the id that completes it: decode without it
        self._stream = DecodeStream(context or None, skip_special_tokens=True)
        self.starts_text = not self._backend.decode(context)  # no text before the reply: it starts one
        self._pending: list[int] = []  # ids the stream holds without a whole character yet
        self._tail = ""  # decoded but not shown: it could be the start of a stop string
        self._shown: list[str] = []
        self.stopped = False  # a stop string occurred (the text ends before it), or the reply was ended (`end`)
        self.tokens = 0  # ids consumed, up to and including the one that completed a stop string

    def feed(self, ids: Sequence[int], final: bool = False, stop_token: bool = False) -> str:
        """New text after `ids`; `final` (the engine finished the request) flushes everything held back;
        `stop_token`: the last id ended the request (an EOS or stop token), counted but not shown, as vLLM leaves
        it out of the text (an EOS that is no special token, e.g. ChatML's `<|im_end|>` in some tokenizers, would
        otherwise end every reply with its text)."""
        pieces = []
        for i, token in enumerate(ids):
            if self.stopped:
                break
            self.tokens += 1
            if not (stop_token and i == len(ids) - 1):
                pieces.append(self._release(self._decode(token)))
        if final and not self.stopped:
            pieces.append(self._release(self._flush_pending(), final=True))
        piece = "".join(pieces)
        self._shown.append(piece)
        return piece

    def end(self) -> None:
        """The reply is complete though the engine has not finished it (the tool-call parser read a complete call
        with parallel calls off, or found a stop string in a returned block): nothing more is fed, and the request's
        cancel counts as finished, as a stop string's does."""
        self.stopped = True

    def _decode(self, token: int) -> str:
        """The text this id completes ("" while a character is still split across ids)."""
        piece = self._stream.step(self._backend, token)
        if piece is not None:
            self._pending.clear()
            return piece
        self._pending.append(token)
        return self._flush_pending() if len(self._pending) > MAX_PENDING_IDS else ""

    def _flush_pending(self) -> str:
        """Decode the held ids as they are (incomplete bytes become U+FFFD) and start a fresh stream."""
        if not self._pending:
            return ""
        text = self._backend.decode(self._pending, skip_special_tokens=True)
        self._pending.clear()
        self._stream = DecodeStream(skip_special_tokens=True)
        return text

    def _release(self, new: str, final: bool = False) -> str:
        """Scan the held tail plus `new` for a stop string outside blocks; return what is now safe, keep what could
        still match (or still turn into a tag); `final` keeps nothing back."""
        text, start, shown = self._tail + new, 0, []
        while self.blocks is not None:
            opening, closing = self.blocks
            if self._block is not None:  # pass the block through up to its closing tag, which may be arriving
                end = self._block_end(text[start:], closing)
                if end < 0:
                    safe = len(text) if final else len(text) - partial_tag(text[start:], closing)
                    shown.append(text[start:safe])
                    self._block.append(text[start:safe])
                    self._tail = text[safe:]
                    return "".join(shown)
                shown.append(text[start:start + end + len(closing)])
                start, self._block = start + end + len(closing), None
                continue
            tag = text.find(opening, start)
            if tag < 0:
                break
            hit = self._first_stop(text, start, tag)
            if hit is not None:
                return "".join(shown) + hit
            shown.append(text[start:tag + len(opening)])
            start, self._block = tag + len(opening), []
        scanned = len(text) if final or self.blocks is None else len(text) - partial_tag(text[start:], self.blocks[0])
        hit = self._first_stop(text, start, scanned)
        if hit is not None:
            return "".join(shown) + hit
        cut = len(text) if final else max(start, scanned - self.hold)
        self._tail = text[cut:]
        return "".join(shown) + text[start:cut]

    def _block_end(self, new: str, closing: str) -> int:
        """`block_end` in the block's text, searched in `new` alone: the text before it held no tag that ends it
        (a tag's verdict depends on the text before it only), so each id costs the new text, not the block's."""
        body = "".join(self._block) + new if closing in new else new
        return block_end(body, closing, len(body) - len(new)) - (len(body) - len(new))

    def _first_stop(self, text: str, start: int, end: int) -> str | None:
        """The text from `start` up to the first stop string wholly inside text[start:end] (then stopped), or None."""
        hits = [i for i in (text.find(s, start, end) for s in self.stop) if i >= 0]
        if not hits:
            return None
        self.stopped, self._tail = True, ""
        return text[start:min(hits)]

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return "".join(self._shown)
