"""Pydantic models of the requests of the OpenAI API subset we serve (docs/serving.md), with the field limits enforced
at parse time; what we send back is serve/responses.py.

Requests reject what we do not implement instead of silently ignoring it, and
bound every field, so a request either runs as asked or fails with a 400 naming the field. Limits that depend on
the model (prompt length, max_tokens against the context) are checked in app.py after tokenization.
"""
from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..data.conversations import TOOL_NAME

MAX_STOP = 64  # vLLM sets none; evaluators send a task's whole list (OpenAI's 4 refused them)
MAX_STOP_CHARS = 256
MAX_MESSAGES = 512
MAX_PROMPT_CHARS = 1_000_000  # before tokenization; the token limit is the context
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # int64, as OpenAI and vLLM take it
MAX_TOOLS = 128
MAX_PROMPTS = 128  # prompts in one completions request (each is one engine request; the queue still applies)
MAX_N = 32  # copies of a prompt (they share its cache pages); prompts x n is capped at MAX_PROMPTS too
MAX_LOGPROBS = 20  # infer/sampling.py's limit
MAX_LOGPROB_ENTRIES = 2**20  # scored tokens x n x (alternatives + 1) in one reply, echoed prompts and generated
# tokens (unless streamed) each (~30 MB of JSON; 128 echoed prompts of 4096 tokens with logprobs 1, an evaluator's
# batch, fit)
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit (infer/sampling.py's)
FORMAT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for response_format.json_schema.name
MAX_DEPTH = 64  # nesting of a JSON value in a request (a tool's parameters, a response schema)
UNSUPPORTED = "not supported by this server (docs/serving.md §3); remove the field"  # a field we do not honour
MAX_SCHEMA_CHARS = 64 * 1024  # a response_format schema, as JSON text (the compiled grammar has its own bound)
# On a message: an assistant's refusal and citations (OpenAI's replies carry them, and clients send replies back),
# the openai SDK's client-side `parsed` value (its `parse()` and `stream()` helpers add it to a reply): no chat
# template has a place for them
MESSAGE_METADATA = ("refusal", "annotations", "parsed")
# A participant's name (agent frameworks send it) and the reasoning other backends' replies carry (vLLM's reasoning
# parsers): passed to the chat template as text, which renders them or not (Qwen3's renders reasoning_content)
MESSAGE_TEXTS = ("name", "reasoning_content", "reasoning")


def well_formed(value: Any, field: str) -> Any:
    """`value` unchanged if every string in it is valid Unicode, every number finite, and it nests at most
    MAX_DEPTH deep. JSON escapes can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer or grammar
    compiler accepts; Python's JSON reader takes NaN and Infinity, which are not JSON (a schema's `default: NaN`
    failed inside the grammar compiler, a tool's `maximum: Infinity` reached the prompt); and a schema nested
    hundreds deep overflows the recursion of whatever reads it next (the chat template's rendering, the grammar
    compiler). Refused here, naming the field. C's JSON writer checks the numbers and strings of a whole tool set
    (10 MB) in a fraction of a second, where walking every value in Python took seconds on the event loop; the
    walk, without recursion, then finds what it refused. The nesting is checked first, a level at a time."""
    _within_depth(value, field)
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        return value
    except (ValueError, TypeError):  # NaN or Infinity ("Out of range float values ..."), a lone surrogate, or a
        pass  # value that is no JSON (a model built in Python): found below, or passed over as the walk did
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{field}: holds {_constant(item)}, which is not JSON")
        if isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{field}: contains a lone UTF-16 surrogate, which is not valid Unicode") from None
        elif isinstance(item, dict):
            stack += [x for pair in item.items() for x in pair]
        elif isinstance(item, list):
            stack += item
    return value


def _within_depth(value: Any, field: str) -> None:
    """ValueError naming `field` if its lists and objects nest more than MAX_DEPTH deep."""
    level, depth = [value] if isinstance(value, (dict, list)) else [], 0  # the containers `depth` levels down
    while level:
        inside = [x for item in level for x in (item.values() if isinstance(item, dict) else item)]
        if inside and depth >= MAX_DEPTH:  # values (keys too) at depth + 1
            raise ValueError(f"{field}: nested more than {MAX_DEPTH} levels deep")
        level, depth = [x for x in inside if isinstance(x, (dict, list))], depth + 1


def _constant(number: float) -> str:
    """NaN, Infinity or -Infinity: the constant as Python's JSON reader took it."""
    return "NaN" if math.isnan(number) else "Infinity" if number > 0 else "-Infinity"


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


STRICT_JSON = json.JSONDecoder(parse_constant=_not_json)  # json.loads, refusing NaN and Infinity


class _Part(BaseModel):
    """A request or a part of one, read as OpenAI's API reads it: a field it does not know is refused (a 400
    naming it), unless it is null (clients send SDK objects back with unset fields as null) or one of `dropped`;
    values must have their declared JSON types ("2" is not a number, true is not 1) and numbers are finite (Python's
    JSON reader takes NaN and Infinity)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    dropped: ClassVar[tuple[str, ...]] = ()  # fields clients send that change nothing here: dropped, not refused

    @model_validator(mode="before")
    @classmethod
    def _drop(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.__pydantic_fields__  # (not `model_fields`: a property that cost 4 us a read, twice a part)
        return {key: value for key, value in data.items()
                if key in fields or (key not in cls.dropped and value is not None)}


class StreamOptions(_Part):
    include_usage: bool = False


class _Sampling(_Part):
    """Fields shared by completions and chat completions; `null` stands for a field's default, as in the OpenAI
    API. `user` and `metadata`, what clients say about themselves, change no output: checked as OpenAI's API
    checks them (a string; at most 16 string pairs), then unused."""

    model: str | None = Field(None, min_length=1, max_length=256)  # none: the served one, as vLLM reads it
    user: str | None = Field(None, max_length=256)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=1_000_000)  # extension (vLLM, SGLang); 0 or vLLM's -1 = off
    n: int = Field(1, ge=1, le=MAX_N)  # samples per prompt: copies that share the prompt's cache pages
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # normalised to a list
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)  # extension (vLLM, SGLang); 1 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension (vLLM, SGLang); 0 = off
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias; ids checked against the model
    ignore_eos: bool = False  # extension: generate exactly max_tokens (benchmarks)
    # text, json_object or json_schema (constrained decoding: serve/structured.py)
    response_format: dict[str, Any] | None = None
    best_of: int | None = None  # only n (nothing to rank): any other would be accepted and change nothing

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_null(cls, data: Any) -> Any:
        """`null` where the field itself is not nullable: its default applies."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items() if not (
            value is None and key in fields and type(None) not in get_args(fields[key].annotation))}

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """OpenAI's shapes: {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name",
        "schema", "strict", "description"}}; anything else is refused rather than read loosely."""
        if value is None:
            return None
        shapes = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
        kind = value.get("type")
        fields = shapes.get(kind) if isinstance(kind, str) else None
        if fields is None:
            raise ValueError('type: must be "text", "json_object" or "json_schema"')
        if extra := sorted(set(value) - fields):
            raise ValueError(f"{extra[0]}: {UNSUPPORTED}")
        if value["type"] != "json_schema":
            return value
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError('json_schema: must be an object with "name", "schema" and optionally "strict" and '
                             '"description"')
        if extra := sorted(set(spec) - {"name", "schema", "strict", "description"}):
            raise ValueError(f"json_schema.{extra[0]}: {UNSUPPORTED}")
        if not isinstance(spec.get("name"), str) or not FORMAT_NAME.match(spec["name"]):
            raise ValueError("json_schema.name: must be 1 to 64 letters, digits, underscores or dashes")
        if not isinstance(spec.get("schema"), dict):
            raise ValueError("json_schema.schema: must be a JSON Schema object")
        if spec.get("strict") not in (None, True, False):
            raise ValueError("json_schema.strict: must be a boolean")
        if not isinstance(spec.get("description", ""), str) or len(spec.get("description", "")) > MAX_PROMPT_CHARS:
            raise ValueError(f"json_schema.description: must be a string of at most {MAX_PROMPT_CHARS} characters")
        well_formed(value, "json_schema")
        if len(json.dumps(spec["schema"])) > MAX_SCHEMA_CHARS:
            raise ValueError(f"json_schema.schema: longer than {MAX_SCHEMA_CHARS} characters as JSON")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        if not all(key.isascii() and key.isdigit() and len(key) <= 12 and str(int(key)) == key for key in value):
            raise ValueError("keys must be token ids (non-negative integers as strings of ASCII digits, without "
                             "leading zeros: \"05\" and \"5\" would name one token twice)")
        if not all(-100.0 <= bias <= 100.0 for bias in value.values()):
            raise ValueError("biases must be in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return well_formed(stops, "stop")

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        return self

    @model_validator(mode="after")
    def _best_of_covers_n(self) -> _Sampling:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of: {self.best_of} is fewer than n ({self.n}): it must be at least n")
        if self.best_of is not None and self.best_of > self.n:  # equal: nothing to rank, every candidate returned
            raise ValueError(f"best_of: {self.best_of} is more than n ({self.n}): this server does not rank "
                             "candidates, so best_of may only equal n")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """`prompt` is one prompt (a string or token ids) or a list of them: one choice per prompt, in order.
    `logprobs: k` reports each token's logprob and its k likeliest alternatives; `echo` returns the prompt in the
    text (and, with `logprobs`, scores its tokens); `max_tokens: 0` with `echo` scores a prompt without generating.
    With `n`, prompt i's copy j is choice i * n + j, in a stream as in a whole answer."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: a text prompt gets what the tokenizer's post-processor adds (a bos)
    suffix: None = None  # insertion (text after the completion) is not served: refused, not dropped

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_insertion(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("insertion (text the completion must lead up to) is not supported by this server")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        """A list of prompts is all strings or all token-id lists (else pydantic blamed a good first element)."""
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            kind = type(value[0])
            if odd := next((i for i, item in enumerate(value) if not isinstance(item, kind)), None):
                names = {str: "a string", list: "a list of token ids", int: "a number", float: "a number"}
                raise ValueError(f"{odd}: {names.get(type(value[odd]), type(value[odd]).__name__)} in a list of "
                                 f"{'strings' if kind is str else 'token-id lists'}: send prompts of one kind")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        """Normalised to a list of prompts, each a string or a list of token ids."""
        many = isinstance(value, list) and bool(value) and isinstance(value[0], (str, list))
        prompts = value if many else [value]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for i, prompt in enumerate(prompts):
            where = f"{i}: " if many else ""
            if not prompt:
                raise ValueError(f"{where}must not be empty")
            if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"{where}longer than {MAX_PROMPT_CHARS} characters")
        return well_formed(prompts, "prompt")

    @model_validator(mode="after")
    def _supported_combination(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is allowed only with echo (scoring the prompt)")
        if len(self.prompt) * self.n > MAX_PROMPTS:
            raise ValueError(f"n: prompts x n is {len(self.prompt) * self.n}; at most {MAX_PROMPTS} choices per "
                             "request")
        return self


class TextPart(_Part):
    """A content part; only text parts exist for a text-only model."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        """An image, audio or file part is named as such, not as a part whose type should have been 'text'."""
        if isinstance(data, dict) and isinstance(data.get("type"), str) and data["type"] != "text":
            raise ValueError(f"type: {data['type']!r} parts are not supported: this model reads text only (send a "
                             "string or text parts)")
        return data


class FunctionCall(_Part):
    dropped = ("parsed_arguments",)  # the openai SDK's parse() helpers add it to a strict tool's call
    name: str = Field(pattern=TOOL_NAME)
    arguments: str  # a JSON object, as a string

    @field_validator("arguments")
    @classmethod
    def _object(cls, value: str) -> str:
        if not value.strip():  # a call without arguments, accumulated from a stream whose argument deltas were ""
            return "{}"
        try:
            parsed = STRICT_JSON.decode(value)
        except RecursionError:
            raise ValueError("arguments: nested too deep to parse") from None
        except ValueError as err:  # json.JSONDecodeError, or a NaN / Infinity constant
            raise ValueError(f"arguments must be a JSON object in a string: {err}") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object in a string")
        return value


class ToolCall(_Part):
    """A call in an assistant message: sent back by clients in the history (with the `index` of the stream's
    deltas when they were accumulated from one), returned in responses."""

    dropped = ("index",)
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Part):
    """`content` as a string or as a list of text parts (what current clients send), joined into one string;
    the "developer" role (the newer name of "system") is read as "system". An assistant message may carry
    `tool_calls` (then `content` may be null); a `tool` message answers one call by its `tool_call_id`.
    Fields no chat template has a place for are dropped if they are MESSAGE_METADATA or null (clients echo SDK
    objects with `audio: null`); any other is refused. MESSAGE_TEXTS reach the template as sent, as vLLM passes
    them. A tool message's `name` (the function it answers, as LangChain sends it) is checked against the call and
    rendered as `longcat sft` renders it from data."""

    dropped = MESSAGE_METADATA
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)  # [] (vLLM's replies carry it): none
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)
    name: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    reasoning_content: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    reasoning: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _texts_only(cls, data: Any) -> Any:
        """A participant's name or reasoning that is no text is dropped unread (metadata, whatever it holds); a tool
        message's name is checked (it names a function)."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if key not in MESSAGE_TEXTS or isinstance(value, str)
                or (key == "name" and data.get("role") == "tool")}

    @field_validator(*MESSAGE_TEXTS)
    @classmethod
    def _unicode(cls, value: str | None, info: ValidationInfo) -> str | None:
        return well_formed(value, info.field_name)

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        return "system" if value == "developer" else value

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | list[TextPart] | None) -> str | None:
        if value == []:
            raise ValueError("content: an empty list of parts; send at least one text part, or a string")
        text = value if isinstance(value, str) or value is None else "".join(part.text for part in value)
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"content is longer than {MAX_PROMPT_CHARS} characters")
        return well_formed(text, "content")

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages carry tool calls, not {self.role!r} ones")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: a tool message needs one, and only tool messages may have one")
        if self.content is None and not self.tool_calls:
            raise ValueError("content: must be a string or a list of text parts (null only in an assistant message "
                             "with tool_calls)")
        if self.name == "":  # what some clients send for none
            self.name = None
        return self


class FunctionDef(_Part):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    parameters: dict[str, Any] | None = None  # the JSON Schema of the arguments; None: the function takes none
    strict: bool | None = None  # arguments constrained to `parameters` even under tool_choice auto

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """An object schema; one without a type ({} or only `properties`) is read as one, as OpenAI reads it."""
        if value is None:
            return None
        if value.setdefault("type", "object") != "object":
            raise ValueError('must be a JSON Schema with "type": "object" (arguments are a JSON object)')
        return well_formed(value, "parameters")


class Tool(_Part):
    """A function the model may call. `given` is the tool as the client sent it, which the prompt renders: key
    order and all, as `longcat sft` and transformers render a tool from data (the parsed fields are normalised)."""

    type: Literal["function"]
    function: FunctionDef
    _given: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_given(cls, data: Any, handler: Any) -> Tool:
        """Its known, non-null fields in the client's order (what parsing drops, the prompt does not show)."""
        given = {}
        if isinstance(data, dict) and isinstance(data.get("function"), dict):
            function = {k: dict(v) if isinstance(v, dict) else v for k, v in data["function"].items()
                        if k in FunctionDef.model_fields and v is not None}  # a copy of what parsing writes into
            given = {k: function if k == "function" else v for k, v in data.items()
                     if k in cls.model_fields and v is not None}
        tool = handler(data)
        tool._given = given or tool.model_dump(exclude_none=True)  # built from objects, not a client's JSON
        return tool

    @property
    def given(self) -> dict[str, Any]:
        return self._given


class ToolName(_Part):
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: ToolName


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False  # each generated token's logprob in choices[i].logprobs.content
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token; needs logprobs
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    continue_final_message: bool = False  # vLLM's: the reply continues the last (assistant) message, left open
    add_generation_prompt: bool = True  # vLLM's: false leaves out the template's opening of the reply's turn
    functions: None = None  # the legacy form of tools: refused (use `tools`), not dropped
    function_call: None = None  # the legacy form of tool_choice: refused (use `tool_choice`)
    # what OpenAI's API takes and this server does anyway (nothing is stored; text out; one tier); other values refused
    store: Literal[False] | None = None
    modalities: list[Literal["text"]] | None = Field(None, max_length=1)
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice(cls, value: Any) -> Any:
        """An error that names the field and its choices, instead of one error per member of the union."""
        if not (value is None or value in ("none", "auto", "required") or isinstance(value, dict)):
            raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
        return value

    @field_validator("functions", "function_call", mode="before")
    @classmethod
    def _legacy(cls, value: Any, info: ValidationInfo) -> None:
        if value is not None:
            modern = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(f"the legacy form of {modern} is not supported by this server; send {modern}")
        return value

    @model_validator(mode="after")
    def _fields_that_need_others(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if "parallel_tool_calls" in self.model_fields_set and not self.tools:
            raise ValueError("parallel_tool_calls: only allowed when tools are given")
        if self.continue_final_message:
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls or not last.content:
                raise ValueError("continue_final_message: the last message must be an assistant message with text "
                                 "(the reply continues it)")
            if self.response_format is not None and self.response_format.get("type") != "text":
                raise ValueError("continue_final_message: cannot apply with a JSON response_format (the grammar "
                                 "starts at the reply, inside the continued text)")
            if self.tool_choice not in (None, "auto", "none"):
                raise ValueError("continue_final_message: cannot apply when tool_choice forces a call")
            if "add_generation_prompt" in self.model_fields_set and self.add_generation_prompt:
                raise ValueError("add_generation_prompt: cannot be true with continue_final_message (the reply "
                                 "continues the final message, in no turn of its own)")
        if not self.add_generation_prompt and self.tool_choice not in (None, "auto", "none"):
            raise ValueError("add_generation_prompt: false cannot apply when tool_choice forces a call (the call "
                             "opens the reply's turn)")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Part):
    """vLLM's /tokenize, its completion form: the ids a completions prompt of this text becomes (special-token text
    parsed, and with `add_special_tokens` what the tokenizer's post-processor adds, as there and in vLLM)."""

    model: str | None = None
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _completion_form(cls, data: Any) -> Any:
        """vLLM's chat form (`messages` with its own flags) is refused by `messages`, before its other fields."""
        if isinstance(data, dict) and data.get("messages") is not None:
            raise ValueError("messages: the chat form of /tokenize is not served here; send `prompt`, the "
                             "conversation rendered with the chat template (GET /tokenizer_info holds it)")
        return data


class DetokenizeRequest(_Part):
    """vLLM's /detokenize: the text of token ids, special tokens' text included (so it inverts /tokenize)."""

    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_CHARS)
