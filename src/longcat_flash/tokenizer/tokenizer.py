"""The `Tokenizer`: a byte-level BPE on HF `tokenizers` with the ids and chat template our training and serving
need; encode/decode, conversations, save/load as an HF tokenizer checkpoint.

Why byte-level: every UTF-8 string maps to tokens and back exactly (`decode(encode(s)) == s`), so no text is ever
lost or replaced by `<unk>`, whatever the corpus. Our model configs fix pad=0, bos=1, eos=2; `train_tokenizer`
(bpe.py) puts the special tokens first so those ids hold.

Special tokens inside *text* are not special: `encode("a</s>b")` encodes the five characters `</s>` as ordinary
bytes, so a corpus that happens to contain `</s>` (HTML does) cannot inject an end-of-document. Pass
`allow_special=True` to parse them. A conversation goes through `render_chat` and `encode_chat`, which parse only
the special tokens the chat template writes: `<s>old</s>` inside a message stays text, in training and serving
alike, so no message can end a turn or teach the model to stop mid-answer.

The directory written by `save` is a normal HF tokenizer checkpoint (`tokenizer.json` + `tokenizer_config.json`)
that `transformers.AutoTokenizer` reads with the same ids and the same chat template. The chat template (LongCat's
round format with tool calls, chat.py) is jinja2, rendered exactly as transformers renders it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders

from ..chat_template import (CONFIG_FILE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TemplateError, UndefinedError,
                             check_template, compile_template, read_templates, render_with_arguments)
from .chat import DEFAULT_CHAT_TEMPLATE, blanked, special_pattern, validate_messages, validate_tools

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad, bos, eos (the order our model configs assume)
# Trained tokenizers hold the tool-call tags as single tokens, right after the special tokens. They are added
# tokens but not *special* ones, so `decode(skip_special_tokens=True)` keeps them and the server can parse calls.
TOOL_CALL_TOKENS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
# What the model writes besides text must be one token each: the tool-call tags here, and the end of turn, which
# is eos (a special token of every tokenizer we load). `longcat sft` adds the ones a tokenizer lacks (with_tokens).
CHAT_MARKERS = TOOL_CALL_TOKENS
DEFAULT_MODEL_MAX_LENGTH = 131072  # LongCat-Flash context; set `model_max_length` to the model you save with
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # transformers 4's list of the special tokens

# Fallback names, tried in order, when a tokenizer.json comes without a tokenizer_config.json.
_FALLBACK_NAMES = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos_token": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad_token": ("<pad>", "<|pad|>", "[PAD]"),
}


def utf8_text(text: str) -> str:
    """`text`, refused by name when it holds a lone surrogate: an undecodable input byte, as Python carries one from
    argv and stdin, which the tokenizer library would reject with a TypeError."""
    if not isinstance(text, str):
        raise TypeError(f"the text must be a str, got {type(text).__name__}: {text!r:.80}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text is not valid UTF-8: {err.object[err.start:err.end]!r} at character {err.start} "
                         "(an undecodable byte in the input)") from None
    return text


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered with the chat template, and the special tokens the template itself wrote in it."""

    text: str
    specials: tuple[tuple[int, int, int], ...]  # (start, end, id) of each, in order, as offsets into text


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + n): b for n, b in enumerate(others)}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and chat template our training and serving code needs."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = SPECIAL_TOKENS[1],
                 eos_token: str | None = SPECIAL_TOKENS[2], pad_token: str | None = SPECIAL_TOKENS[0],
                 chat_template: str = DEFAULT_CHAT_TEMPLATE, tool_chat_template: str | None = None,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, other_config: dict[str, Any] | None = None,
                 other_templates: dict[str, str] | None = None) -> None:
        self._backend = backend
        self.other_config = dict(other_config or {})  # tokenizer_config.json keys we do not read, written back as read
        # Twins that treat special-token text as plain text; other objects instead of toggling a flag per call
        # keep encode thread-safe (the server may encode from several threads).
        self._plain, self._continuing = _text_twins(backend)  # the second for text after a text's start
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._token_id("bos_token", bos_token)
        self.eos_id = self._token_id("eos_token", eos_token)
        self.pad_id = self._token_id("pad_token", pad_token)
        for name, source in (("chat_template", chat_template), ("tool_chat_template", tool_chat_template)):
            if source is not None:
                check_template(source, name)  # here, not at the first chat request
        self.chat_template = chat_template
        self.tool_chat_template = tool_chat_template  # HF's named "tool_use" template: rendered when tools are given
        self.other_templates = dict(other_templates or {})  # HF's other named ones ("rag", ...): kept, not rendered
        self.model_max_length = model_max_length

    def _token_id(self, field: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Tokenizer.{field}={token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the smallest `ModelConfig.vocab_size` that fits."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def check_fits(self, vocab_size: int) -> None:
        """Every id this tokenizer can produce must have an embedding among a model's `vocab_size`."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {self.vocab_size} ids (added tokens included), but the model's "
                             f"vocab_size is {vocab_size}: ids from {vocab_size} "
                             f"({self._backend.id_to_token(vocab_size)!r}, ...) have no embedding (a tokenizer of "
                             "another model, or tokens added without resizing the embeddings)")

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` underneath, for what needs it whole (incremental decoding: serve/text.py)."""
        return self._backend

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: token shards built with another tokenizer are never reused."""
        return hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()

    def _encoder(self, allow_special: bool) -> tokenizers.Tokenizer:
        return self._backend if allow_special else self._plain

    def encode(self, text: str, *, allow_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Text to ids; special-token text stays text unless `allow_special`; nothing is added unless
        `add_special_tokens`: then what the tokenizer's post-processor adds (`added`), as transformers' and vLLM's
        encoding of a raw prompt adds it (a bos for Llama-style tokenizers; nothing for those this project trains)."""
        return self._encoder(allow_special).encode(utf8_text(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False,
                     add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` over many texts at once, in parallel on the Rust side (the fast path for corpora)."""
        if isinstance(texts, str):  # a str is a sequence of texts too: one per character
            raise TypeError("encode_batch takes a list of texts; encode one text with encode")
        return self._encode_many(self._encoder(allow_special), list(texts), add_special_tokens)

    def _encode_many(self, encoder: tokenizers.Tokenizer, texts: list[str], add_special_tokens: bool = False
                     ) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, about 2x faster than encode_batch.
        batch_fn = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
        try:
            return [enc.ids for enc in batch_fn(texts, add_special_tokens=add_special_tokens)]
        except TypeError:  # the library's "TextEncodeInput must be Union[...]": say which text, and why
            for i, text in enumerate(texts):
                try:
                    utf8_text(text)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"texts[{i}]: {err}") from None
            raise

    @functools.cached_property
    def added(self) -> tuple[int, int]:
        """How many tokens the post-processor puts before and after a text's own with `add_special_tokens`."""
        plain = self._backend.encode("a", add_special_tokens=False).ids
        full = self._backend.encode("a", add_special_tokens=True).ids
        front = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        return front, max(0, len(full) - len(plain) - front)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids to text; `skip_special_tokens` drops pad/bos/eos so a generated sequence reads as plain text."""
        ids = list(ids)
        try:  # ints, numpy ints, integer tensors; not 69.9 read as 69, nor True as 1
            if any(isinstance(i, bool) for i in ids):
                raise TypeError
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise TypeError(f"decode takes token ids (integers), got {ids!r:.80}") from None
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids are >= 0, got {min(ids)}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int, first: bool = False) -> bytes:
        """The bytes one token stands for, a part of a character included (its decoded text is then U+FFFD);
        an added token's are its text's, an id past the tokenizer's vocabulary has none. `first`: the token
        starts a text (see `token_text`)."""
        added = self._added_tokens.get(token)
        piece = added.content if added is not None else self._backend.id_to_token(token)
        if piece is None or added is not None:
            return (piece or "").encode()
        if isinstance(self._backend.decoder, decoders.ByteLevel) and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        if (byte := _BYTE_FALLBACK.fullmatch(piece)) is not None:  # SentencePiece's <0xE9>
            return bytes([int(byte.group(1), 16)])
        return self.token_text(token, first=first).encode()

    def token_text(self, token: int, skip_special_tokens: bool = True, first: bool = False) -> str:
        """A token's text where it follows other text, as it reads in the decoded sequence; `first`: where it
        starts a text. They differ for decoders that strip a text's leading space: SentencePiece's `▁w` is " w"
        inside a text, "w" at its start (and decoded alone)."""
        alone = self.decode([token], skip_special_tokens=skip_special_tokens)
        if first or isinstance(self._backend.decoder, decoders.ByteLevel):  # byte-level: a token reads alike anywhere
            return alone
        anchor, before = self._anchor
        after = self._backend.decode([*anchor, token], skip_special_tokens=skip_special_tokens)  # anchor: no specials
        return after[len(before):] if before and after.startswith(before) else alone

    @functools.cached_property
    def _anchor(self) -> tuple[list[int], str]:
        """The ids of a text for `token_text` to decode a token after, and that text."""
        ids = self._plain.encode("a", add_special_tokens=False).ids  # no bos (Llama's post-processor adds one)
        return ids, self._backend.decode(ids)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None, *, now: datetime | None = None) -> str:
        """Render a conversation (and the OpenAI function schemas in `tools`) to the prompt string the model was
        trained on, as transformers' `apply_chat_template(..., tokenize=False)` would. To encode a conversation as
        the server and `longcat chat` do, use `encode_chat(render_chat(...))`: only the template's special tokens
        become special ids (`encode(text, allow_special=True)` would make a user's `</s>` an eos). One difference:
        a template that needs tool-call arguments as objects (writes them with `tojson`, or reads them as a
        mapping) gets those sent as JSON strings as objects, as vLLM passes them (chat_template.py
        `render_with_arguments`). With `now` (a prompt to answer: the server, the chat) the
        template has transformers' `strftime_now`, which Llama 3.x date their prompts with; without it (training
        data, which must render the same on any day) a template sees it undefined and falls back to its own."""
        validate_messages(messages)
        validate_tools(tools)
        if self.eos_token is None:
            raise ValueError("Tokenizer.eos_token is None; chat templates need it to end assistant turns")
        template = compile_template(self.tool_chat_template if tools and self.tool_chat_template else
                                    self.chat_template)

        dated = {} if now is None else {"strftime_now": now.strftime}

        def render(turns: list[dict[str, Any]]) -> str:
            return template.render(messages=turns, tools=list(tools) if tools else None, documents=None,
                                   add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                   eos_token=self.eos_token, pad_token=self.pad_token, **dated)

        try:
            return render_with_arguments(render, list(messages))
        except TemplateError as err:  # its raise_exception (what it cannot render), or a name it does not define
            if not isinstance(err, UndefinedError):
                raise ValueError(f"the chat template refuses this conversation: {err}") from None
            raise ValueError(f"the chat template fails on this conversation (UndefinedError: {err}); it cannot "
                             "render it") from None
        except (TypeError, AttributeError, KeyError, IndexError, ArithmeticError) as err:  # its own code on this input
            raise ValueError(f"the chat template fails on this conversation ({type(err).__name__}: {err}); it "
                             "cannot render it") from None

    @functools.cached_property
    def _added_tokens(self) -> dict[int, tokenizers.AddedToken]:
        return self._backend.get_added_tokens_decoder()

    @functools.cached_property
    def special_ids(self) -> dict[str, int]:
        """Text -> id of every special token (bos, eos, pad and the rest the tokenizer marks special)."""
        return {t.content: i for i, t in self._added_tokens.items() if t.special}

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text longer than context x this cannot fit the context."""
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)))

    def cannot_fit(self, chars: int, context: int, scoring: bool = False) -> str | None:
        """Why a prompt of `chars` characters cannot fit `context` with a token left to generate (`scoring`: at
        all), known without tokenizing it: a prompt of millions of characters takes seconds and GBs to encode.
        None when it may fit."""
        if chars <= (context - (not scoring)) * self.max_token_chars:
            return None
        spare = "" if scoring else " with one to spare"
        return (f"{chars} characters cannot fit the context of {context} tokens{spare} (a token holds at most "
                f"{self.max_token_chars} characters)")

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, suffix: str = "", *,
                    now: datetime | None = None) -> RenderedChat:
        """`apply_chat_template(...) + suffix`, with the places where the template (not a message) wrote a special
        token. Found by rendering again with every special-token text inside the messages and tools blanked out
        (the same length in a character no special token has): what is left matching is the template's."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, now=now) + suffix
        pattern = special_pattern(tuple(self.special_ids))
        blank = next(c for c in "#~^`|@$%&*" if not any(c in t for t in self.special_ids))
        masked = [blanked(value, pattern, blank) for value in (list(messages), list(tools or []))]
        template_text = text
        if masked != [list(messages), list(tools or [])]:
            template_text = self.apply_chat_template(masked[0], add_generation_prompt, masked[1] or None,
                                                     now=now) + suffix
            if len(template_text) != len(text):
                raise ValueError("a message holds the text of a special token (one of "
                                 f"{', '.join(self.special_ids)}), which this chat template does not render "
                                 "verbatim; remove it from the message")
        specials = tuple((m.start(), m.end(), self.special_ids[m.group()]) for m in pattern.finditer(template_text))
        return RenderedChat(text, specials)

    def encode_chat(self, chat: RenderedChat, cuts: Sequence[int] = (), start: int = 0) -> list[list[int]]:
        """The ids of `chat.text` cut at the non-decreasing character offsets `cuts`: one list per piece (len(cuts)
        + 1 of them, an empty piece an empty list; no token straddles a cut), the template's special tokens as their
        ids, everything else as text. From `start` on, when not 0 (a cut of an earlier call's): the pieces after
        it, as the whole text's encoding reads them."""
        bounds = [start, *cuts, len(utf8_text(chat.text))]
        if any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cuts must be non-decreasing offsets into the text, got {list(cuts)}")
        if any(a < cut < b for a, b, _ in chat.specials for cut in bounds):
            raise ValueError("a cut falls inside a special token of the rendered conversation")
        texts, layout = [], []  # layout: per piece, a special token's id or ("text", index into texts)
        specials = iter([s for s in chat.specials if s[0] >= start])
        special = next(specials, None)
        starts_text = False  # the conversation's text begins with text, not a special token
        for at, end in zip(bounds, bounds[1:]):
            piece = []
            while special is not None and special[0] < end:
                if special[0] > at:
                    starts_text |= at == 0
                    piece.append(("text", len(texts)))
                    texts.append(chat.text[at:special[0]])
                piece.append(special[2])
                at = special[1]
                special = next(specials, None)
            if at < end:
                starts_text |= at == 0
                piece.append(("text", len(texts)))
                texts.append(chat.text[at:end])
            layout.append(piece)
        # each text as the whole text's encoding reads it: only the one at its very start gets a SentencePiece "▁"
        first = [self.encode(texts[0])] if starts_text else []
        encoded = first + self._encode_many(self._continuing, texts[len(first):])
        return [[i for part in piece for i in (encoded[part[1]] if isinstance(part, tuple) else [part])]
                for piece in layout]

    def with_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """This tokenizer, plus each of `tokens` that does not already encode as one token, as an added (not
        special) token at the end of the vocabulary; itself when none is missing. Existing ids never change."""
        missing = [t for t in tokens if len(self.encode(t, allow_special=True)) != 1]
        if not missing:
            return self
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in missing])
        return Tokenizer(backend, bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                         chat_template=self.chat_template, tool_chat_template=self.tool_chat_template,
                         model_max_length=self.model_max_length, other_config=self.other_config,
                         other_templates=self.other_templates)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` (HF layout) into `directory`; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / TOKENIZER_FILE))
        named = {"default": self.chat_template, **({"tool_use": self.tool_chat_template} if self.tool_chat_template
                                                   else {}), **self.other_templates}
        config = {
            **self.other_config,  # unk_token, additional special tokens, ... as the source had them
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,  # keeps transformers' decode byte-exact, like ours
            "chat_template": self.chat_template if named == {"default": self.chat_template} else [  # HF's list
                {"name": name, "template": template} for name, template in named.items()],
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` (or a directory holding one) and, if beside it, its `tokenizer_config.json`
        and `chat_template.jinja`.

        Special tokens are read from `special_tokens_map.json` too, as transformers reads it (some tokenizers name
        their eos only there); without either, guessed from common names; without a template, the default is used.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (a model directory or a tokenizer.json)")
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the library raises a bare Exception for a file it cannot read
            raise ValueError(f"{file}: not a tokenizer.json that the tokenizers library can read ({err})") from None
        config_file = file.parent / CONFIG_FILE
        config = _json_object(config_file)
        config = {**config, **_special_tokens_map(file.parent / SPECIAL_TOKENS_MAP, config)}
        if missing := _tokens_not_held(backend, config):
            raise ValueError(f"{config_file} lists special tokens that {file.name} does not hold "
                             f"({', '.join(missing)}): transformers would add them with ids past the vocabulary, and "
                             "here they would be encoded as plain text; add them to the tokenizer (and resize the "
                             "model's embeddings)")
        names = {field: _special_token_name(backend, config, field) for field in _FALLBACK_NAMES}
        other = {k: v for k, v in config.items() if k not in _CONFIG_WRITTEN}
        try:
            templates = read_templates(file.parent, config)
            return cls(backend, **names, chat_template=templates.pop("default", DEFAULT_CHAT_TEMPLATE),
                       tool_chat_template=templates.pop("tool_use", None),
                       model_max_length=int(config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)),
                       other_config=other, other_templates=templates)
        except ValueError as err:
            raise ValueError(f"{file.parent}: {err}") from None


# tokenizer_config.json keys `save` writes itself, or that would be stale after `with_tokens` (the added tokens'
# ids are tokenizer.json's) or name code we do not ship (auto_map)
_CONFIG_WRITTEN = ("tokenizer_class", "bos_token", "eos_token", "pad_token", "model_max_length",
                   "clean_up_tokenization_spaces", "chat_template", "added_tokens_decoder", "auto_map")


def _text_twins(backend: tokenizers.Tokenizer) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer]:
    """Copies of `backend` that spell special-token text as text: its added tokens are not matched (nor, in a
    Unigram model, its special pieces, which T5's vocabulary holds with a score that wins). The second is for text
    that does not start the whole text: without the "▁" a SentencePiece pre-tokenizer gives the start only
    (prepend_scheme "first", as in Llama 2 and Gemma); the first again when there is no such pre-tokenizer."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "Unigram" and model.get("vocab"):
        special = {token["id"] for token in spec.get("added_tokens", []) if token.get("special")}
        floor = min(score for _, score in model["vocab"]) - 100.0  # below the unknown piece's penalty
        for token in special & set(range(len(model["vocab"]))):
            model["vocab"][token][1] = floor

    def twin() -> tokenizers.Tokenizer:
        made = tokenizers.Tokenizer.from_str(json.dumps(spec))
        made.encode_special_tokens = True
        return made
    plain = twin()
    first = [step for step in _steps(spec.get("pre_tokenizer"))
             if step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first"]
    for step in first:
        step["prepend_scheme"] = "never"
    return plain, twin() if first else plain


def _steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer's steps, those of a Sequence flattened."""
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for inner in pre_tokenizer.get("pretokenizers", []) for step in _steps(inner)]
    return [pre_tokenizer]


def _tokens_not_held(backend: tokenizers.Tokenizer, config: dict[str, Any]) -> list[str]:
    """The special tokens tokenizer_config.json lists (`additional_special_tokens`; transformers 5 spells it
    `extra_special_tokens`, a list, or 4.x's dict of named ones) that tokenizer.json lacks, quoted; as transformers
    writes them, each is in both. (`added_tokens_decoder` is tokenizer.json's added tokens again, and may be
    stale: `_CONFIG_WRITTEN`.)"""
    tokens = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        listed = config.get(key)
        listed = list(listed.values()) if isinstance(listed, dict) else listed if isinstance(listed, list) else []
        tokens += [t.get("content") if isinstance(t, dict) else t for t in listed]
    return [repr(t) for t in dict.fromkeys(tokens) if isinstance(t, str) and backend.token_to_id(t) is None]


def _special_tokens_map(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The special tokens a transformers 4 `special_tokens_map.json` names, as transformers reads it: only beside a
    config without `added_tokens_decoder` (one written before transformers 4.34, or by hand), where a token it
    names (not null) wins over the config's. Some tokenizers name their eos only there."""
    named = {} if "added_tokens_decoder" in config else _json_object(path)
    return {field: named[field] for field in _FALLBACK_NAMES if named.get(field) is not None}


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path` ({} when there is no such file), refused naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _content(token: Any) -> Any:
    """A special token's text, from a string or an HF AddedToken dict."""
    return token["content"] if isinstance(token, dict) else token


def _special_token_name(backend: tokenizers.Tokenizer, config: dict[str, Any], field: str) -> str | None:
    """The config's token (a string or an HF AddedToken dict), else the first common name in the vocabulary."""
    if field in config:
        return _content(config[field])
    return next((name for name in _FALLBACK_NAMES[field] if backend.token_to_id(name) is not None), None)
