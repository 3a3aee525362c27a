"""The text side of generation, shared by the server and the CLI: incremental detokenization and stop strings.

The engine sees token ids only. A stop string is a property of the text, not of the ids (the same string can be
tokenized many ways), so `TextState.stop_hit` decodes the generated ids and is handed to the engine as its stop
hook; `TextState.delta` then yields the text safe to show: cut at the first stop string, never ending inside a
UTF-8 character, and holding back a tail that could still grow into a stop string while generation goes on.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what decode yields for a UTF-8 character split across tokens


class TextState:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max(map(len, self.stop), default=1) - 1
        self.sent = ""

    def _cut(self, text: str) -> tuple[str, bool]:
        """Text before the earliest stop string, and whether one occurred."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def stop_hit(self, ids: list[int]) -> bool:
        """The engine's stop hook: does the generated text contain a stop string yet?"""
        return bool(self.stop) and self._cut(self.tokenizer.decode(ids))[1]

    def delta(self, ids: list[int], final: bool) -> str:
        """New text to emit after the generated ids `ids`; `final` flushes everything left."""
        text, stopped = self._cut(self.tokenizer.decode(ids))
        if not (final or stopped):
            text = text[: len(text) - self.hold] if self.hold else text
            text = text.rstrip(INCOMPLETE)
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    @property
    def text(self) -> str:
        return self.sent
