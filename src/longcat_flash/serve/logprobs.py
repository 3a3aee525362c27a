"""Logprobs in OpenAI's legacy completions shape and in its chat shape (`choices[i].logprobs`), from what the
engine reports.

The engine scores tokens as token ids (infer/sampling.py `token_logprobs`: the model's raw distribution); this
module gathers one request's scores from its StepOutputs and renders them as text: each token's own decoded text,
its logprob, a dict of the likeliest tokens' texts (the chosen token always among them, so up to k + 1 entries,
as OpenAI does), and its character offset in the choice's `text` (the whole characters of the tokens' bytes before
it). In the chat shape each token carries its text, logprob, its own UTF-8 bytes, and its k alternatives.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from ..infer.engine import StepOutput
from ..infer.sampling import TokenLogprob
from ..tokenizer import Tokenizer
from . import responses as resp


@dataclass
class Scores:
    """One request's logprobs as its StepOutputs bring them (`Generation.pieces` calls `record` on each); `take`
    hands each token's logprob out once, with the chunk (or the whole answer) that shows its text."""

    prompt: list[TokenLogprob | None] = field(default_factory=list)  # the first is None: nothing predicts it
    generated: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0  # generated tokens whose logprobs went out already
    # text read before the next token (the prompt's, for a reply the text decodes after it: `TextState.starts_text`):
    # until there is, a token reads as a text's start (SentencePiece's "▁w" as "w"), as the choice's text has it
    began: bool = True

    def _text(self, tokenizer: Tokenizer, token: int, skip_special_tokens: bool = True) -> tuple[str, bool]:
        """A token's text in the choice's text, and whether it starts that text."""
        first = not self.began
        text = tokenizer.token_text(token, skip_special_tokens, first)
        self.began |= bool(text)
        return text, first

    def record(self, out: StepOutput) -> None:
        self.prompt += out.prompt_logprobs or []
        self.generated += out.logprobs or []

    def _unsent(self, n: int) -> list[TokenLogprob]:
        """Generated tokens sent..n-1 (those the text consumed, up to the one that completed a stop string)."""
        scores, self.sent = self.generated[self.sent:n], max(self.sent, n)
        return scores


@dataclass
class CompletionScores(Scores):
    """A completion choice's scores; with `echo` (the prompt's ids) the first take starts with the prompt's.
    `echo_text`: the prompt came as text, so its special tokens are in the choice's text as written (generated
    ones, those of a prompt of ids, and the `added` (before, after) tokens the tokenizer put around a text, are
    not)."""

    echo: list[int] | None = None
    echo_text: bool = False
    added: tuple[int, int] = (0, 0)
    offset: int = 0  # whole characters of the choice's text before the tokens not yet handed out
    _utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def take(self, tokenizer: Tokenizer, n: int) -> resp.CompletionLogprobs:
        generated = self._unsent(n)
        echoed = len(self.echo or [])
        tokens = [*(self.echo or []), *(s.token for s in generated)]
        scores = [*(self.prompt if self.echo else []), *generated]
        self.echo = None
        front, back = self.added
        shown = [self.echo_text and front <= i < echoed - back for i in range(len(tokens))]  # written in the text
        if echoed:  # the choice's text starts with the echoed prompt
            self.began = False
        texts, starts = [], []
        for token, show in zip(tokens, shown):
            text, first = self._text(tokenizer, token, not show)
            texts.append(text)
            starts.append(first)
        offsets = [self._offset(tokenizer, *args) for args in zip(tokens[:echoed], texts[:echoed], starts)]
        if echoed:  # the echoed prompt is decoded alone: bytes it leaves without a character are its U+FFFD
            self.offset += len(self._utf8.decode(b"", final=True))
            self._utf8.reset()
        offsets += [self._offset(tokenizer, *args) for args in zip(tokens[echoed:], texts[echoed:], starts[echoed:])]
        return resp.CompletionLogprobs(
            tokens=texts, token_logprobs=[None if s is None else s.logprob for s in scores],
            top_logprobs=[None if s is None else _top(tokenizer, s, show, start)
                          for s, show, start in zip(scores, shown, starts)],
            text_offset=offsets)

    def _offset(self, tokenizer: Tokenizer, token: int, text: str, first: bool = False) -> int:
        """Where the token starts in the choice's text: after the characters of the tokens before it (each token of
        a character split over tokens points at it; bytes that never form one are U+FFFD, as in the text).
        `first`: the token starts the text."""
        if not text:  # a special token the choice's text skips
            return self.offset
        held, _ = self._utf8.getstate()  # bytes of earlier tokens that are no whole character yet
        decoded = self._utf8.decode(tokenizer.token_bytes(token, first))
        at = self.offset + (len(held.decode("utf-8", "replace")) if held and decoded.startswith("\ufffd") else 0)
        self.offset += len(decoded)  # held bytes this token shows invalid are U+FFFD before it, not part of it
        return at


def joined(parts: list[resp.CompletionLogprobs]) -> resp.CompletionLogprobs:
    """Consecutive takes of one choice as one object (a non-streamed answer)."""
    return resp.CompletionLogprobs(**{key: [x for part in parts for x in getattr(part, key)]
                                   for key in resp.CompletionLogprobs.model_fields})


def _top(tokenizer: Tokenizer, score: TokenLogprob, show_special: bool = False, first: bool = False
         ) -> dict[str, float]:
    """The likeliest tokens' texts, then the chosen token's; a text two tokens share keeps the higher logprob.
    `show_special`: at a position of a prompt given as text, special tokens are keyed as written there (as in
    `tokens`), so that a harness comparing the best key with the token finds the same text. `first`: the position
    starts the choice's text."""
    top: dict[str, float] = {}
    for token, logprob in (*score.top, (score.token, score.logprob)):
        top.setdefault(tokenizer.token_text(token, not show_special, first), logprob)
    return top


@dataclass
class ChatScores(Scores):
    def take(self, tokenizer: Tokenizer, n: int) -> resp.ChatLogprobs | None:
        """The logprobs of the generated tokens not yet handed out, up to n (None when there are none)."""
        content = self._unsent(n)
        if not content:
            return None
        texts = [self._text(tokenizer, s.token) for s in content]
        return resp.ChatLogprobs(content=[
            resp.ChatTokenLogprob(**_chat_token(tokenizer, s.token, s.logprob, first, text).model_dump(),
                                  top_logprobs=[_chat_token(tokenizer, t, v, first) for t, v in s.top])
            for s, (text, first) in zip(content, texts)])


def _chat_token(tokenizer: Tokenizer, token: int, logprob: float, first: bool = False, text: str | None = None
                ) -> resp.TopLogprob:
    """The token's text (`text`, when the caller has it) and its own UTF-8 bytes (a part of a character: the text is
    U+FFFD, the bytes that part, so the bytes of consecutive tokens join into the characters, as OpenAI's field is
    for); `first`: it starts the reply's text."""
    text = tokenizer.token_text(token, first=first) if text is None else text
    return resp.TopLogprob(token=text, logprob=logprob,
                           bytes=list(tokenizer.token_bytes(token, first) if text else b""))
