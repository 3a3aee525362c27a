"""Structured generation: grammars compiled with llguidance, and the per-sequence matchers that mask the sampler.

`GrammarCompiler` turns a Lark grammar (with `%json {schema}` for JSON parts, `<[id]>` for single special tokens,
docs/serving.md §3.3) into a `Grammar`: immutable, hashable by its text, so it can ride on the frozen
`SamplingParams`. Compiling builds llguidance's lexer once; each request then gets its own `Matcher`, a cheap deep
copy (`Grammar.matcher`), because a matcher's state is one sequence's position in the grammar: n copies of a
prompt each need their own. The engine asks a matcher for the allowed tokens before sampling
(`sampling.mask_rows`) and advances it after.

Resource bounds, because the grammars come from requests: the grammar text is capped at `MAX_GRAMMAR_CHARS`,
llguidance's parser limits bound compile work and each mask step, compiled grammars are kept in an LRU of
`cache_size` entries, and a compile that runs past `compile_timeout_s` is refused (`GrammarError`).

JSON is compact (", " and ": " separators, no whitespace elsewhere): outputs read as `json.dumps` writes them,
and a grammar that allowed free whitespace would let a weak model pad forever instead of finishing.
"""
from __future__ import annotations

import difflib
import itertools
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import llguidance
import torch

from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_GRAMMAR_CHARS = 256 * 1024
MAX_EXACT_INTEGER = 2**53
# The keywords of JSON Schema (2020-12 and draft 7) and of OpenAPI's schemas: anything else close to one of them is
# a misspelling, which llguidance, as the standard says, would ignore.
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
SCHEMA_VALUES = frozenset({"additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames",
                           "additionalItems", "unevaluatedItems", "unevaluatedProperties"})
KEYWORDS = SCHEMA_MAPS | SCHEMA_LISTS | SCHEMA_VALUES | frozenset({
    "$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$vocabulary", "$comment", "dependencies",
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength",
    "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains", "maxProperties",
    "minProperties", "required", "dependentRequired", "format", "contentEncoding", "contentMediaType",
    "contentSchema", "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
    "example", "nullable", "discriminator", "xml", "externalDocs"})
_JSON_MEDIA = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)  # contentMediaType of JSON text
ANNOTATIONS = frozenset({"$schema", "$id", "$anchor", "$comment", "title", "description", "default", "deprecated",
                         "readOnly", "writeOnly", "examples", "example", "externalDocs", "xml"})  # constrain nothing
# `Enum`, `max_length` (case, snake_case): the keyword that constrains, meant; `Title` would constrain nothing either
_SPELLED_ALIKE = {key.lower().replace("_", ""): key for key in KEYWORDS - ANNOTATIONS}
COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
          "maxContains")
MAX_COUNT = 2**32 - 1  # the regex library under llguidance reads no longer repetition count
# coerce_one_of: `oneOf` read as `anyOf` (refused unless its branches are plainly disjoint), admitting a value two
# branches match, as vLLM's default backend (xgrammar) reads it
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}
# llguidance's own defaults, tightened where a request could make one mask step or one compile expensive.
LIMITS = {"max_grammar_size": 200_000, "initial_lexer_fuel": 1_000_000, "step_lexer_fuel": 200_000,
          "step_max_items": 50_000, "max_lexer_states": 50_000, "verbose_errors": False}


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled (invalid, unsupported, too large, too slow)."""


class GrammarTimeout(GrammarError):
    """A grammar whose compile ran past the time limit: too slow to compile."""


class GrammarBusy(GrammarError):
    """A grammar whose compile never started within the time limit, behind others' slow ones: the server is busy,
    not the grammar bad (a retry may pass)."""


def json_part(schema: dict[str, Any]) -> str:
    """A JSON value matching `schema`, as a Lark fragment, compact (JSON_OPTIONS override any x-guidance);
    GrammarError for what llguidance would not honour (`check_schema`)."""
    check_schema(schema)
    return f"%json {json.dumps({**with_nullable_types(schema), 'x-guidance': JSON_OPTIONS}, ensure_ascii=False)}"


def with_nullable_types(node: Any) -> Any:
    """`node` with OpenAPI 3.0's `nullable: true`, which llguidance ignores (null was never allowed), spelled as
    it reads it: a `type` that takes null too, or a choice of null; and without `uniqueItems: false`, which
    constrains nothing but which llguidance refuses as unimplemented (pydantic writes it for lists)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "uniqueItems" and value is False:
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            value = {name: with_nullable_types(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            value = [with_nullable_types(sub) for sub in value]
        elif key in SCHEMA_VALUES:
            value = with_nullable_types(value)
        out[key] = value
    if out.pop("nullable", False) is not True:
        return out
    if isinstance(out.get("type"), str | list):
        types = [out["type"]] if isinstance(out["type"], str) else out["type"]
        return {**out, "type": types if "null" in types else [*types, "null"]}
    return out if "enum" in out or "const" in out else {"anyOf": [out, {"type": "null"}]}


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse, in each (sub)schema, what llguidance would silently constrain to something else: numeric bounds it
    gets wrong (`_check_bounds`), a minProperties that repeated keys could meet, a string's content it would not
    check (a string of JSON, an encoding), misspelt keywords; and `$ref`s that lead back to themselves, which it
    fails on without saying so."""
    _check_ref_cycles(schema)
    for node in _subschemas(schema):
        _check_bounds(node)
        if "contentEncoding" in node:
            raise GrammarError("contentEncoding is not supported: the string would not be checked to be in that "
                               "encoding (base64, say); describe the string with a pattern instead")
        if "contentSchema" in node or _JSON_MEDIA.fullmatch(str(node.get("contentMediaType", ""))):
            raise GrammarError("a string holding JSON (contentMediaType / contentSchema, as pydantic's Json[...] "
                               "fields write it) is not supported: its content would not be checked, so the field "
                               "would get any string; ask for the value itself, not a string holding it")
        named = set(node.get("required") or ()) & set(node.get("properties") or ())
        open_keys = node.get("additionalProperties", True) is not False or "patternProperties" in node
        least = node.get("minProperties")
        if open_keys and isinstance(least, int) and least > len(named):
            raise GrammarError(f"minProperties={least} on an object whose keys are not all named is not supported: "
                               "the output cannot be kept from repeating a key, and repeated keys count once; name "
                               "the properties and list them in required, or set additionalProperties to false")
        for key in node:
            if key not in KEYWORDS and not key.startswith("x-") and (close := _misspelt(key)):
                raise GrammarError(f"unknown keyword {key!r} (did you mean {close!r}?): it would constrain nothing")


def _check_ref_cycles(schema: dict[str, Any]) -> None:
    """Refuse a `$ref` that leads back to itself before any value is written (through `$ref`s and `allOf`s
    alone, `{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}`): it describes no value, and
    llguidance fails on it with "NoExtensionBias". A reference inside `properties`, `items` or `anyOf` is
    recursion, which is fine, and a definition no reference reaches is never read. Read as llguidance reads the
    schema (`with_nullable_types`); each reference is followed once (a depth-first search over them)."""
    schema = with_nullable_types(schema)

    def onward(node: Any) -> Iterator[str]:  # the local $refs a (sub)schema is, before it writes anything
        if not isinstance(node, dict):
            return
        if _local_ref(node.get("$ref")):
            yield node["$ref"]
        for member in node["allOf"] if isinstance(node.get("allOf"), list) else []:
            yield from onward(member)

    reached: dict[str, None] = {}  # the references the root reaches, in the order met: one message for a schema
    todo: list[Any] = [schema]
    while todo:
        for node in _subschemas(todo.pop(), definitions=False):
            if _local_ref(ref := node.get("$ref")) and ref not in reached:
                reached[ref] = None
                todo.append(_resolve(schema, ref))
    finished: set[str] = set()
    for start in reached:
        if start in finished:
            continue
        path, on_path, stack = [start], {start}, [iter(list(onward(_resolve(schema, start))))]
        while stack:
            ref = next(stack[-1], None)
            if ref is None:
                on_path.discard(done := path.pop())
                finished.add(done)
                stack.pop()
            elif ref in on_path:
                cycle = " -> ".join([*path[path.index(ref):], ref])
                raise GrammarError(f"the $ref {cycle:.300} comes back to where it started before any value is written: "
                                   "the schema describes no value")
            elif ref not in finished:
                path.append(ref)
                on_path.add(ref)
                stack.append(iter(list(onward(_resolve(schema, ref)))))


def _local_ref(ref: Any) -> bool:
    """Whether a `$ref` is a JSON pointer into its own schema ("#", "#/$defs/a"; not an $anchor's name)."""
    return ref == "#" or isinstance(ref, str) and ref.startswith("#/")


def _resolve(schema: dict[str, Any], ref: str) -> Any:
    """The subschema a local `$ref` ("#", "#/$defs/a") points at; None where it points at nothing (llguidance
    names that itself)."""
    node: Any = schema
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _misspelt(key: str) -> str | None:
    """The keyword `key` is most likely a misspelling of: the same but for case and underscores, else one within
    a letter or two."""
    alike = _SPELLED_ALIKE.get(key.lower().replace("_", "").replace("-", ""))
    return alike or next(iter(difflib.get_close_matches(key, KEYWORDS, n=1, cutoff=0.85)), None)


def _subschemas(schema: Any, definitions: bool = True) -> Iterator[dict[str, Any]]:
    """Every schema object in `schema`, itself included, by the keywords that hold schemas (not into enum, const,
    default or examples values, nor property names); `definitions`: into `$defs` / `definitions` too (what only
    a `$ref` reaches)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node
        for key, value in node.items():
            if key in ("$defs", "definitions") and not definitions:
                continue
            if key in SCHEMA_MAPS and isinstance(value, dict):
                stack.extend(value.values())
            elif key in SCHEMA_LISTS and isinstance(value, list):
                stack.extend(value)
            elif key in SCHEMA_VALUES:
                stack.append(value)


def _check_bounds(node: dict[str, Any]) -> None:
    """Refuse the bounds llguidance 1.9 gets wrong, rather than constrain to something else or fail inside it:
    a length or count beyond 2^32 - 1 fails there as a regex parse error (or, beyond 2^64, "not a positive
    integer"); numeric bounds beyond +-2^53 (JSON's exact integers) it clamps to 64 bits or crashes the process;
    an integral exclusiveMinimum n >= 0 whose upper bound lies below n + 1 admits n itself (exclusiveMaximum
    n <= 0 above n - 1, likewise)."""
    for key in COUNTS:
        if isinstance(node.get(key), int) and not isinstance(node[key], bool) and node[key] > MAX_COUNT:
            raise GrammarError(f"{key}={node[key]} is more than this server supports (at most {MAX_COUNT})")
    bounds = {key: node[key] for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
              if isinstance(node.get(key), (int, float)) and not isinstance(node.get(key), bool)}
    for key, value in bounds.items():
        if not abs(value) <= MAX_EXACT_INTEGER:
            raise GrammarError(f"{key}={value} is outside +-2^53, the numbers JSON carries exactly")
    low, high = bounds.get("exclusiveMinimum"), bounds.get("exclusiveMaximum")
    upper = min(bounds.get("maximum", math.inf), bounds.get("exclusiveMaximum", math.inf))
    lower = max(bounds.get("minimum", -math.inf), bounds.get("exclusiveMinimum", -math.inf))
    if low is not None and low >= 0 and low == int(low) and upper < low + 1:
        raise GrammarError(f"exclusiveMinimum={low} with an upper bound of {upper} is not supported (the "
                           "constraint library would admit the bound itself); use minimum or a wider range")
    if high is not None and high <= 0 and high == int(high) and lower > high - 1:
        raise GrammarError(f"exclusiveMaximum={high} with a lower bound of {lower} is not supported (the "
                           "constraint library would admit the bound itself); use maximum or a wider range")


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar; equal and hashable by its Lark text, so SamplingParams stay frozen values."""

    lark: str
    _template: Any = field(compare=False, repr=False)  # llguidance.LLMatcher at the start state, never advanced

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


class Matcher:
    """One sequence's position in a grammar: the tokens it allows next, advanced by each sampled token."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into bitmask (W,) int32 on the CPU, bit i of word w = token 32 w + i."""
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())

    def advance(self, token: int) -> None:
        """Consume a sampled token; an EOS completes the grammar where it accepts. A refusal (the mask allowed the
        token, so only a limit llguidance hit can cause one, such as a recursive schema that never lets its value
        end) puts the matcher in its error state (`error`): that request ends with it, the batch goes on."""
        if not self._m.consume_token(token):
            log.warning("grammar matcher refused token %d, ending the request: %s", token, self._m.get_error())

    @property
    def error(self) -> str | None:
        """Why the matcher failed, or None."""
        return _without_grammar_text(self._m.get_error()) if self._m.is_error() else None

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more, or the matcher failed: the request ends."""
        return self._m.is_stopped()


class TextTokens:
    """A vocabulary as `llguidance.TokenizerWrapper` reads it, which spells text with ordinary tokens only.

    llguidance's own reading of a tokenizer.json spells the text a grammar forces (an enum value, a const, a key)
    with the added tokens matched inside it, so a forced `"</s>"` (HTML strike-through) was the EOS id, and a
    forced `"<s>"` an id the grammar then refused. Here the token bytes and special ids are llguidance's, and so is
    the spelling of text (it knows the tokenizers that rewrite text, a SentencePiece prefix space among them),
    except where it holds a special token: such text is spelled by the longest ordinary tokens instead."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._native = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                              eos_token=tokenizer.eos_id)
        ids = range(vocab_size)  # the model's: ids past the tokenizer's are special to llguidance, never allowed
        self.tokens = [self._native.decode_bytes([i]) for i in ids]
        self.special_token_ids = [i for i in ids if self._native.is_special_token(i)]
        self._special = frozenset(self.special_token_ids)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # the wrapper asks once whether bytes are taken: they are not
            raise TypeError("TextTokens encodes str")
        spelled = self._native.tokenize_str(text)
        return self._native.greedy_tokenize(text) if self._special.intersection(spelled) else spelled


class GrammarCompiler:
    """Compiles grammars against one tokenizer and vocabulary (the model's: ids the tokenizer lacks are never
    allowed). Thread-safe: the server compiles off its event loop."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, cache_size: int = 64,
                 compile_timeout_s: float = 10.0) -> None:
        try:
            self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(TextTokens(tokenizer, vocab_size)))
            self.unavailable: str | None = None  # why nothing can be constrained, when nothing can
        except ValueError as err:  # a decoder llguidance does not read (WordPiece, Metaspace): the rest is served
            self._tokenizer = None
            self.unavailable = f"the constraint library cannot read this model's tokenizer ({err})"
            log.warning("structured output and forced or strict tool calls are off: %s", self.unavailable)
        self._backend = tokenizer.backend
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size, self.compile_timeout_s = cache_size, compile_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="longcat-grammar")

    def token(self, text: str) -> str:
        """A Lark fragment for `text`: the single special token it is in this vocabulary (`<[id]>`; trained
        tokenizers hold the tool-call tags so), else the string, spelled by ordinary tokens."""
        token_id = self._backend.token_to_id(text)
        if token_id is not None and self._tokenizer is not None and self._tokenizer.is_special_token(token_id):
            return f"<[{token_id}]>"
        return json.dumps(text)

    def compile(self, lark: str) -> Grammar:
        """A Lark grammar -> a Grammar (cached); GrammarError when it cannot be compiled within the limits."""
        if self.unavailable is not None:
            raise GrammarError(self.unavailable)
        if len(lark) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar has {len(lark)} characters (schemas included); the limit is "
                               f"{MAX_GRAMMAR_CHARS}")
        with self._lock:
            if (hit := self._cache.get(lark)) is not None:
                self._cache.move_to_end(lark)
                return hit
        started: list[float] = []  # when a worker took the build

        def build_now() -> Any:
            started.append(time.monotonic())
            return self._build(lark)
        build = self._pool.submit(build_now)
        try:
            template = build.result(timeout=self.compile_timeout_s)
        except FutureTimeout:  # a compile still queued behind slow ones is dropped (a running one cannot be)
            if build.cancel():
                raise GrammarBusy(f"the grammar waited {self.compile_timeout_s} s for a compile worker behind other "
                                  "requests' grammars; retry") from None
            try:  # started late, behind others: its own compile has the whole limit
                template = build.result(timeout=max(0.0, started[0] + self.compile_timeout_s - time.monotonic()))
            except FutureTimeout:
                raise GrammarTimeout(f"compiling the grammar took longer than {self.compile_timeout_s} s") from None
        grammar = Grammar(lark, template)
        with self._lock:
            self._cache[lark] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        return self.compile(f"start: {json_part(schema)}\n")

    def _build(self, lark: str) -> Any:
        matcher = llguidance.LLMatcher(self._tokenizer, llguidance.LLMatcher.grammar_from_lark(lark),
                                       log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
        matcher.compute_bitmask()  # the first mask builds the lexer: here, not on the engine's step thread
        if matcher.is_error():
            raise GrammarError(_without_grammar_text(matcher.get_error()))
        return matcher


def _without_grammar_text(error: str) -> str:
    """llguidance's message without its position prefix and the grammar lines it quotes, which hold the whole
    schema (a client's 7 KB schema made an 11 KB error) and this module's options."""
    kept = itertools.takewhile(lambda line: not re.match(r"\s*\d+ \| ", line), error.splitlines())
    text = "\n".join(line for line in kept if line.strip() != "<non-verbose/>")
    return re.sub(r"^at \d+\(\d+\): ", "", text).strip()[:1000]
