"""The text side of generation, shared by the server and the CLI: incremental detokenization and stop strings.

The engine sees token ids only. A stop string is a property of the text, not of the ids (the same string can be
tokenized many ways), so it is matched here, on the consumer's side (the HTTP handler, the CLI loop), never on the
engine's step thread; the consumer cancels the request when `TextState.stopped` turns true.

Every id costs O(1): `tokenizers`' `DecodeStream` decodes only a small window of recent ids (it holds back bytes
that do not yet form a whole UTF-8 character), and only the tail that could still grow into a stop string
(`hold` = longest stop string - 1 characters) is kept back and re-scanned.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers.decoders import DecodeStream

from ..tokenizer import Tokenizer

# No UTF-8 character spans more than 4 bytes, so more ids than this without a character are invalid bytes:
# emit them as U+FFFD (as a full decode would) rather than let the stream's window grow without bound.
MAX_PENDING_IDS = 8


class TextState:
    """One request's text: feed it the generated ids as they arrive; it returns the text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max(map(len, self.stop), default=1) - 1
        self._backend = tokenizer.backend  # DecodeStream needs the tokenizers.Tokenizer itself
        self._stream = DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []  # ids the stream holds without a whole character yet
        self._tail = ""  # decoded but not shown: it could be the start of a stop string
        self._shown: list[str] = []
        self.stopped = False  # a stop string occurred; the text ends before it
        self.tokens = 0  # ids consumed, up to and including the one that completed a stop string

    def feed(self, ids: Iterable[int], final: bool = False) -> str:
        """New text after `ids`; `final` (the engine finished the request) flushes everything held back."""
        pieces = []
        for token in ids:
            if self.stopped:
                break
            self.tokens += 1
            pieces.append(self._release(self._decode(token)))
        if final and not self.stopped:
            pieces.append(self._release(self._flush_pending()) + self._tail)
            self._tail = ""
        piece = "".join(pieces)
        self._shown.append(piece)
        return piece

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

    def _release(self, new: str) -> str:
        """Scan the held tail plus `new` for a stop string; return what is now safe, keep what could still match."""
        text = self._tail + new
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._tail = True, ""
            return text[: min(hits)]
        cut = len(text) - self.hold
        self._tail = text[max(cut, 0):]
        return text[:max(cut, 0)]

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return "".join(self._shown)
