"""Structured output through the server, in-process (FastAPI's TestClient over a real engine) from random weights
at temperature 1: json_schema answers always parse and validate, forced tool calls always name an offered tool
with arguments its schema accepts, a strict tool under "auto" too; bad formats and schemas are 400s naming the
field."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import torch
from fastapi.testclient import TestClient
from infer_support import one_thread, randomized  # noqa: F401  (autouse fixture)
from test_infer_grammar import SCHEMAS

from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.grammar import GrammarCompiler
from longcat_flash.presets import tiny
from longcat_flash.serve import protocol as p
from longcat_flash.serve.app import ServerConfig, create_app
from longcat_flash.serve.bridge import AsyncEngine
from longcat_flash.serve.structured import lark
from longcat_flash.serve.tools import plan_tools
from longcat_flash.tokenizer import TOOL_CALL_OPEN, stdlib_tokenizer

SHORT = {"type": "string", "maxLength": 10}
TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": SHORT, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"],
        "additionalProperties": False}},
    {"name": "search", "parameters": {"type": "object", "properties": {
        "query": SHORT, "limit": {"type": "integer", "minimum": 1, "maximum": 20},
        "filters": {"type": "array", "items": {"enum": ["news", "images", "video"]}, "maxItems": 3}},
        "required": ["query", "limit"], "additionalProperties": False}},
    {"name": "book", "parameters": {"type": "object", "$defs": {"day": {"type": "integer", "minimum": 1,
                                                                       "maximum": 31}},
                                    "properties": {"guest": {"type": "object", "properties": {"name": SHORT},
                                                             "required": ["name"], "additionalProperties": False},
                                                   "day": {"$ref": "#/$defs/day"}},
                                    "required": ["guest", "day"], "additionalProperties": False}},
]
ASK = [{"role": "user", "content": "Help me."}]


@pytest.fixture(scope="module")
def served():
    tokenizer = stdlib_tokenizer(256)
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size, max_position_embeddings=4096))
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=16, cache_tokens=32768))).start()
    app = create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=4096))
    with TestClient(app) as client:
        yield client, tokenizer
    bridge.stop()


def tools(*names: str, strict: bool | None = None) -> list[dict]:
    return [{"type": "function", "function": {**tool, **({} if strict is None else {"strict": strict})}}
            for tool in TOOLS if tool["name"] in names]


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 200,
                                                  "temperature": 1.0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def valid_calls(choice: dict, offered: list[dict]) -> list[dict]:
    """The choice's tool calls, each checked: an offered name, arguments that validate against its schema."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in offered}
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    return calls


def test_a_schema_is_checked_off_the_event_loop(served, monkeypatch):
    """The schema walk (every subschema, each key against the JSON Schema keywords) ran on the event loop: a large
    schema stalled /health and every stream while it ran."""
    from serve_support import on_a_loop

    from longcat_flash.serve import structured

    calls = []
    monkeypatch.setattr(structured, "lark", lambda *args: calls.append(on_a_loop()) or lark(*args))
    client, _ = served
    chat(client, max_tokens=4, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": SHORT}}}})
    assert calls == [False]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_answers_validate(served, schema):
    client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(3):
        choice = chat(client, response_format=fmt, seed=seed)
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_completions_with_several_prompts_and_copies_batch_constrained_rows(served):
    """One request, three prompts with n=2 copies each: six constrained rows decoded in the same engine steps,
    each copy with its own matcher."""
    client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMAS[1]}}
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 200,
                                             "seed": 7, "response_format": fmt})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 6
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS[1])


def test_json_object_answers_are_objects_when_complete(served):
    client, _ = served
    for seed in range(3):
        choice = chat(client, response_format={"type": "json_object"}, seed=seed, max_tokens=400)
        if choice["finish_reason"] == "stop":  # any object: a random model may nest past the limit
            assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_validate(served, parallel):
    client, _ = served
    offered = tools("get_weather", "search", "book")
    for seed in range(4):
        choice = chat(client, tools=offered, tool_choice="required", parallel_tool_calls=parallel, seed=seed)
        calls = valid_calls(choice, offered)
        assert calls and (parallel or len(calls) == 1)


@pytest.mark.parametrize("name", [tool["name"] for tool in TOOLS])
def test_named_tool_calls_validate(served, name):
    """A named function is called exactly once, parallel_tool_calls or not (OpenAI, vLLM)."""
    client, _ = served
    offered = tools("get_weather", "search", "book")
    for seed in range(3):
        choice = chat(client, tools=offered, tool_choice={"type": "function", "function": {"name": name}},
                      seed=seed)
        assert [call["function"]["name"] for call in valid_calls(choice, offered)] == [name]


def test_a_function_without_parameters_is_called_with_none(served):
    """OpenAI: omitting `parameters` defines a function with an empty parameter list; a schema without a type
    ({} or only properties) is an object schema."""
    client, _ = served
    ping = {"type": "function", "function": {"name": "ping", "description": "Check the link."}}
    untyped = {"type": "function", "function": {"name": "echo", "parameters": {
        "properties": {"text": SHORT}, "required": ["text"], "additionalProperties": False}}}
    for seed in range(2):
        choice = chat(client, tools=[ping], tool_choice="required", seed=seed)
        assert [call["function"]["arguments"] for call in choice["message"]["tool_calls"]] == ["{}"] * len(
            choice["message"]["tool_calls"])
        choice = chat(client, tools=[untyped], tool_choice="required", parallel_tool_calls=False, seed=seed)
        [call] = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), untyped["function"]["parameters"])
    assert chat(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                tool_choice="required", seed=0)["finish_reason"] in ("tool_calls", "length")


def test_strict_tool_under_auto_constrains_the_call(served):
    """The bias makes the random model open a call at once; the grammar then holds its arguments to the schema.
    A non-strict tool's call under the same grammar need only be a JSON object."""
    client, tokenizer = served
    [open_id] = tokenizer.encode(TOOL_CALL_OPEN, allow_special=True)
    offered = tools("search", strict=True) + tools("get_weather")
    for seed in range(3):
        choice = chat(client, tools=offered, tool_choice="auto", parallel_tool_calls=False, seed=seed,
                      logit_bias={str(open_id): 100})
        [call] = choice["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "search":
            jsonschema.validate(arguments, TOOLS[1]["parameters"])
        assert isinstance(arguments, dict)


def test_stop_strings_never_cut_json_a_grammar_holds_or_a_call(served):
    """Agent frameworks send `stop` with tools and formats; a stop string inside the JSON cut it into markup left
    in the content, with finish_reason "stop". Where the whole output is JSON, stop strings could only break it:
    they were accepted and ignored; now a 400 names `stop`. Under "auto" they cut the text, never a call."""
    client, tokenizer = served
    offered = tools("get_weather", "search")
    for all_json in ({"tools": offered, "tool_choice": "required"},
                     {"tools": offered, "tool_choice": {"type": "function", "function": {"name": "search"}}},
                     {"response_format": {"type": "json_object"}}):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "stop": ["{"], **all_json})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        valid = chat(client, max_tokens=400, seed=0, **all_json)  # the same without stop: served
        assert valid["finish_reason"] in ("tool_calls", "stop", "length")
    [open_id] = tokenizer.encode(TOOL_CALL_OPEN, allow_special=True)
    strict = tools("search", strict=True)  # under "auto": text, or a call the grammar holds
    choice = chat(client, tools=strict, parallel_tool_calls=False, stop=['"name"', "{"], seed=0,
                  logit_bias={str(open_id): 100})
    assert len(valid_calls(choice, strict)) == 1


def test_auto_text_never_spells_the_tag(served):
    """Under a strict tool, free text cannot write the opening tag out of ordinary tokens (the parser would read
    an unchecked call there): after `<longcat_tool_call` spelled byte by byte, `>` is not allowed."""
    _, tokenizer = served
    body = p.ChatCompletionRequest(model="tiny", messages=ASK, tools=tools("search", strict=True))
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    matcher = compiler.compile(lark(compiler, body, plan_tools(body))).matcher()
    spelled = [tokenizer.encode(char)[0] for char in "Hi " + TOOL_CALL_OPEN]
    for token in spelled[:-1]:
        matcher.advance(token)
    bitmask = torch.zeros(-(-tokenizer.vocab_size // 32), dtype=torch.int32)
    matcher.fill(bitmask)
    allowed = {i for i in range(tokenizer.vocab_size) if bitmask[i // 32] >> (i % 32) & 1}
    assert spelled[-1] not in allowed and tokenizer.encode("x")[0] in allowed


@pytest.mark.parametrize("change, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "enum": ["x" * 70_000]}}}}, "response_format"),  # too large
    ({"response_format": {"type": "json_object"}, "tools": tools("search"), "tool_choice": "required"},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}]}, "tools"),
    ({"tools": tools("search") + [{"type": "function", "function": {"name": "f", "parameters": {  # names the tool
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}], "tool_choice": "required"},
     "tools.1.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
])
def test_bad_formats_and_schemas_are_400s_naming_the_field(served, change, param):
    client, _ = served
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 4, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and error["message"], error


ENDLESS = {"response_format": {"type": "json_schema", "json_schema": {"name": "endless", "schema": {
    "type": "array", "items": {"$ref": "#"}, "minItems": 1}}}}  # runs into the parser's item limit at once


def test_a_grammar_that_fails_mid_output_is_an_error_not_a_finished_answer(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 20, **ENDLESS})
    assert r.status_code == 400 and r.json()["error"]["code"] == "grammar_failed", r.text
    assert "limit" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"  # the field whose schema it was (was null)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 20, "stream": True,
                                                  **ENDLESS})
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "grammar_failed"
    assert json.loads(events[-2])["error"]["param"] == "response_format"
    assert not any(choice.get("finish_reason") for event in events[:-2] for choice in json.loads(event)["choices"])


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 10**19, "maximum": 10**19 + 5},  # was 2^63 - 1; near -2^63 a segfault
    {"type": "number", "exclusiveMinimum": 2, "maximum": 2.5},
])
def test_bounds_the_constraint_library_gets_wrong_are_400s(served, schema):
    client, _ = served
    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 4,
                                                  "response_format": response_format})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema", r.text


@pytest.mark.parametrize("choice, prefill", [
    ("required", ""),
    ({"type": "function", "function": {"name": "search"}}, None),
    ("auto", TOOL_CALL_OPEN),
])
def test_a_call_may_be_padded_inside_its_tags_as_a_template_writes_it(served, choice, prefill):
    """A template writing `<longcat_tool_call>\\n{...}\\n</longcat_tool_call>` trains that layout, but a forced or
    strict call allowed only `<tag>{"name": ...}</tag>`: the model's likeliest token (the newline) was masked and the
    call degenerated."""
    from longcat_flash.tokenizer import TOOL_CALL_CLOSE

    _, tokenizer = served
    body = p.ChatCompletionRequest(model="tiny", messages=ASK, tools=tools("search", strict=True), tool_choice=choice)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    matcher = compiler.compile(lark(compiler, body, plan_tools(body))).matcher()
    arguments = '{"query": "x", "limit": 2}}\n'
    text = arguments if prefill is None else prefill + '\n{"name": "search", "arguments": ' + arguments
    for token in tokenizer.encode(text, allow_special=True) + tokenizer.encode(TOOL_CALL_CLOSE, allow_special=True):
        matcher.advance(token)
        assert matcher.error is None, text
    assert matcher.done == (prefill is None)  # a named call is one call; else (parallel) more calls may follow


def test_a_tokenizer_the_constraint_library_cannot_read_serves_all_but_constrained_output():
    """A WordPiece (or Metaspace) decoder stopped `longcat serve` at start with llguidance's "can't determine
    decoder type"; the server now starts, and only the requests that need a constraint are refused, by field."""
    from tokenizer_support import wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer()
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=2, cache_tokens=1024))).start()
    app = create_app(bridge, tokenizer, ServerConfig(model_name="wp", context=model.config.max_position_embeddings))
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    try:
        with TestClient(app) as client:
            plain = client.post("/v1/completions", json={"model": "wp", "prompt": "a b", "max_tokens": 2})
            refused = client.post("/v1/completions", json={"model": "wp", "prompt": "a b", "max_tokens": 2,
                                                           "response_format": schema})
    finally:
        bridge.stop()
    assert plain.status_code == 200, plain.text
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "response_format"
    assert "cannot constrain output" in error["message"] and "decoder" in error["message"]


def test_a_slow_compile_is_named_without_compiling_again_and_a_queued_one_is_busy(monkeypatch):
    """A schema whose compile ran past the limit was compiled once more to find its field (a minute of CPU for an
    18 KB schema); requests queued behind such compiles got the same 400, blaming their own schema ("tools" where
    they had none): they are a retryable busy now."""
    import asyncio
    import threading
    import time

    from longcat_flash.infer.grammar import GrammarBusy
    from longcat_flash.serve.structured import ConstraintError, request_grammar

    tokenizer = stdlib_tokenizer(256)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, compile_timeout_s=0.2)
    builds, go = [], threading.Event()
    monkeypatch.setattr(compiler, "_build", lambda lark: builds.append(lark) or go.wait(5))
    body = p.ChatCompletionRequest.model_validate({"model": "tiny", "messages": ASK, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    with pytest.raises(ConstraintError, match="response_format: .*took longer than 0.2 s") as slow:
        asyncio.run(request_grammar(compiler, body))
    assert slow.value.param == "response_format" and len(builds) == 1
    other = body.model_copy(update={"response_format": {"type": "json_object"}})
    with pytest.raises(ConstraintError):
        asyncio.run(request_grammar(compiler, other))  # the second worker, held too
    with pytest.raises(GrammarBusy):
        asyncio.run(request_grammar(compiler, body.model_copy(update={"response_format": {
            "type": "json_schema", "json_schema": {"name": "y", "schema": {"type": "array"}}}})))
    go.set()
    time.sleep(0.1)
    assert len(builds) == 2  # the queued one never ran


def test_a_grammar_the_engine_could_not_compile_in_time_is_a_busy_server(served, monkeypatch):
    """The engine process compiles a grammar again; one that ran out of time there (behind others' slow ones) came
    back as a refusal the handler read as a bad prompt: a 400 on `prompt` whose message said to retry."""
    from longcat_flash.infer.grammar import GrammarBusy

    async def busy(self, jobs):
        raise GrammarBusy("the grammar waited 10.0 s for a compile worker behind other requests' grammars; retry")
    monkeypatch.setattr(AsyncEngine, "submit", busy)
    client, _ = served
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 4,
                                                  "response_format": {"type": "json_object"}})
    assert r.status_code == 503 and r.json()["error"]["code"] == "grammar_busy" and r.headers["Retry-After"] == "1"

