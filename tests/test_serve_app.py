"""The app in-process (FastAPI TestClient, a tiny random model): bounded /metrics, an honest /openapi.json, and
a bounded fuzz of every route that must never get a 5xx."""
from __future__ import annotations

import json
import uuid

import pytest

pytest.importorskip("fastapi")
prometheus_client = pytest.importorskip("prometheus_client")
hypothesis = pytest.importorskip("hypothesis")
hypothesis_jsonschema = pytest.importorskip("hypothesis_jsonschema")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from longcat_flash.infer.engine import Engine, EngineConfig  # noqa: E402
from longcat_flash.presets import tiny  # noqa: E402
from longcat_flash.serve import app as app_module  # noqa: E402
from longcat_flash.serve import protocol as p  # noqa: E402
from longcat_flash.serve.app import ServerConfig, create_app  # noqa: E402
from longcat_flash.serve.bridge import AsyncEngine  # noqa: E402
from longcat_flash.serve.openapi import ROUTE_ERRORS  # noqa: E402
from longcat_flash.serve.prompts import chat_prompt  # noqa: E402
from longcat_flash.tokenizer import stdlib_tokenizer  # noqa: E402

from infer_support import one_thread, randomized  # noqa: E402,F401

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 48  # small, so that no fuzzed request can generate for long


@pytest.fixture(scope="module")
def client():
    tokenizer = stdlib_tokenizer(256)
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=8, cache_tokens=2048, max_waiting=16))).start()
    app = create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=CONTEXT, api_key=KEY))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    bridge.stop()


def series(client: TestClient) -> int:
    return sum(1 for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#"))


def test_a_stream_whose_client_left_before_its_first_chunk_is_closed():
    """uvicorn's h11 server speaks ASGI 2.3, where Starlette cancels a streaming response when its client leaves;
    gone before the body's first chunk, the body generator never started, its `finally` never ran, and the
    request's copies generated on to max_tokens with nobody reading."""
    import asyncio

    closed = []

    async def events():
        yield "never sent"

    async def gone():
        return {"type": "http.disconnect"}

    async def slow_send(message):  # the status line still on its way when the client leaves
        await asyncio.sleep(1)

    response = app_module._event_stream(events(), lambda: closed.append(True))
    asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.3"}}, gone, slow_send))
    assert closed


def test_unknown_paths_add_no_series(client):
    client.get(f"/{uuid.uuid4().hex}")  # the first creates the one "unknown" series
    series(client)  # and the first scrape the /metrics one
    before = series(client)
    statuses = {client.get(f"/{uuid.uuid4().hex}/{i}").status_code for i in range(300)}
    assert statuses == {404} and series(client) == before
    assert 'longcat_http_requests_total{path="unknown",status="404"}' in client.get("/metrics").text


def test_metrics_label_the_route_template_and_count_text_stops_as_finished(client):
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    text = client.post("/v1/completions", json=body, headers=AUTH).json()["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    stopped = client.post("/v1/completions", json={**body, "stop": [stop]}, headers=AUTH).json()
    assert stopped["choices"][0] == {**stopped["choices"][0], "text": text[: text.find(stop)], "finish_reason": "stop"}
    scrape = client.get("/metrics").text
    assert 'longcat_http_requests_total{path="/v1/completions",status="200"}' in scrape
    assert "longcat_requests_cancelled_total 0.0" in scrape


def test_metrics_show_the_cache_pool_before_the_first_request():
    """A scrape after start-up reported a pool of 1 page (a placeholder) until the first request reached the
    engine, so dashboards computing capacity from it were wrong after every restart."""
    import time

    tokenizer = stdlib_tokenizer(256)
    engine = Engine(randomized(tiny().replace(vocab_size=tokenizer.vocab_size)), EngineConfig(cache_tokens=2048))
    bridge = AsyncEngine(engine).start()
    try:
        with TestClient(create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=CONTEXT))) as fresh:
            expected = f"longcat_cache_pages_total {float(engine.cache.config.num_pages - 1)}"
            deadline = time.monotonic() + 10
            while expected not in (scrape := fresh.get("/metrics").text) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert expected in scrape and "longcat_cache_usage_ratio 0.0" in scrape
    finally:
        bridge.stop()


def test_a_json_body_sent_as_a_form_is_told_its_content_type(client):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; the 400 said "body: Input should be a valid
    dictionary or object to extract fields from", which does not point at the header."""
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = AUTH if content_type is None else {**AUTH, "Content-Type": content_type}
        r = client.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "the body must be JSON sent with Content-Type: application/json "
            f"({f'this one was {content_type}' if content_type else 'this one had none'})")
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    assert client.post("/v1/completions", content=body, headers=headers).status_code == 200


def test_a_request_whose_logits_are_not_finite_is_a_500_naming_the_cause():
    """NaN logits gave an empty 200 when greedy and a 500 "engine error: probability tensor contains..." for every
    request in the batch when sampling. /metrics counts such requests, and those of a step that raised, as failed
    (they were "finished", and a failed step's "cancelled (client gone)")."""
    import time

    import torch

    tokenizer = stdlib_tokenizer(256)
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("inf")
    bridge = AsyncEngine(Engine(model, EngineConfig(cache_tokens=2048))).start()
    try:
        with TestClient(create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=CONTEXT))) as fresh:
            for temperature in (0.0, 1.0):
                body = {"model": "tiny", "prompt": [5, 7], "max_tokens": 3, "temperature": temperature}
                r = fresh.post("/v1/completions", json=body)
                assert r.status_code == 500 and r.json()["error"]["code"] == "non_finite_logits"
                assert r.json()["error"]["message"].startswith("the model's logits are NaN or Inf")
                assert fresh.post("/v1/completions", json={**body, "prompt": [5, 8]}).status_code == 200
            def broken():
                raise RuntimeError("a bug")

            step, bridge.engine.step = bridge.engine.step, broken  # the next step raises
            r = fresh.post("/v1/completions", json={**body, "prompt": [5, 8]})
            bridge.engine.step = step
            assert r.status_code == 500 and r.json()["error"]["message"] == "engine error: a bug"
            deadline = time.monotonic() + 10
            while bridge.latest.stats.failed < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            scrape = fresh.get("/metrics").text
            for name, count in (("finished", 2), ("failed", 3), ("cancelled", 0)):
                assert f"longcat_requests_{name}_total {count}.0" in scrape, name
    finally:
        bridge.stop()


def test_an_internal_error_is_a_json_500_and_is_counted(client, monkeypatch):
    """Starlette sends the 500 of an unhandled error from its outermost middleware; it still counts."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "completion_prompts", broken)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}, headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert 'longcat_http_requests_total{path="/v1/completions",status="500"} 1.0' in client.get("/metrics").text

def test_openapi_declares_the_error_statuses(client):
    schema = client.get("/openapi.json").json()
    for path, statuses in ROUTE_ERRORS.items():
        for operation in schema["paths"].get(path, {}).values():
            assert set(operation["responses"]) == {"200", *map(str, statuses)}
    assert "422" not in str(schema["paths"])


def _json_bodies(model: type[p.BaseModel]) -> st.SearchStrategy:
    """Mostly bodies valid by the model's JSON schema (they reach the engine), some arbitrary JSON."""
    junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3), max_leaves=8)
    valid = hypothesis_jsonschema.from_schema(model.model_json_schema()).map(_bounded)
    return st.one_of(valid, valid, junk)


def _bounded(body: dict) -> dict:
    """Keep the served model name most of the time so that requests get past the model check and generate."""
    if isinstance(body, dict) and "model" in body and len(str(body["model"])) % 4:
        body["model"] = "tiny"
    return body


ROUTES = [("POST", "/v1/completions", p.CompletionRequest), ("POST", "/v1/chat/completions", p.ChatCompletionRequest),
          ("POST", "/tokenize", p.TokenizeRequest), ("POST", "/detokenize", p.DetokenizeRequest)]


@pytest.mark.parametrize("method, path, model", ROUTES)
def test_fuzz_post_routes_never_5xx(client, method, path, model):
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(body=_json_bodies(model), authorized=st.booleans() | st.just(True))
    def check(body, authorized):
        r = client.request(method, path, json=body, headers=AUTH if authorized else {})
        assert r.status_code < 500 and r.status_code in {200, *ROUTE_ERRORS[path]}, (body, r.text)
    check()


@pytest.mark.parametrize("path", sorted(set(ROUTE_ERRORS) - {path for _, path, _ in ROUTES}))
def test_get_routes_answer_as_declared(client, path):
    for headers in ({}, AUTH):
        r = client.get(path, headers=headers)
        assert r.status_code in {200, *ROUTE_ERRORS[path]}


def test_every_route_is_declared_and_fuzzed(client):
    from fastapi.routing import APIRoute

    served = {(sorted(r.methods)[0], r.path_format) for r in client.app.routes if isinstance(r, APIRoute)}
    fuzzed = {(m, path) for m, path, _ in ROUTES} | {("GET", path) for path in ROUTE_ERRORS}
    assert {path for _, path in served} <= set(ROUTE_ERRORS) and served <= fuzzed


DEEP = {"type": "object", "properties": {"a": {}}}  # a schema nested 600 deep: the chat template overflowed on it
for _ in range(300):
    DEEP = {"type": "object", "properties": {"a": DEEP}}


def _chat(client: TestClient, **fields) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    headers = {**AUTH, "Content-Type": "application/json"}
    r = client.post("/v1/chat/completions", content=json.dumps(body), headers=headers)  # ASCII: "\ud800" escaped
    return r.status_code, r.json()


def test_null_means_the_default_and_unknown_fields_are_refused(client):
    status, body = _chat(client, temperature=None, top_p=None, n=None, stream=None, logprobs=None, seed=None,
                         presence_penalty=None, parallel_tool_calls=None, user="u-1", metadata={"run": "7"})
    assert status == 200 and len(body["choices"]) == 1, body
    for field, value in [("min_tokens", 3), ("guided_json", {"type": "object"}), ("reasoning_effort", "low")]:
        status, body = _chat(client, **{field: value})
        assert status == 400 and body["error"]["param"] == field and "not supported" in body["error"]["message"]
    for field, value in [("user", 5), ("metadata", {"run": 7}), ("metadata", {f"k{i}": "v" for i in range(17)})]:
        status, body = _chat(client, **{field: value})  # client metadata changes nothing, but was taken unchecked
        assert status == 400 and body["error"]["param"].startswith(field), body


def test_openai_fields_the_server_honours_by_what_it_is_are_taken_other_values_refused(client):
    status, body = _chat(client, store=False, modalities=["text"], service_tier="auto")
    assert status == 200, body
    assert _chat(client, service_tier="default")[0] == 200
    for field, value in [("store", True), ("modalities", ["text", "audio"]), ("service_tier", "flex")]:
        status, body = _chat(client, **{field: value})  # stored, spoken or tiered replies: nothing here does that
        assert status == 400 and body["error"]["param"].startswith(field), body


def test_message_fields_the_template_cannot_hold_are_dropped_only_when_they_carry_nothing(client):
    echoed = {"role": "assistant", "content": "ok", "refusal": None, "audio": None, "function_call": None,
              "annotations": [], "name": "bot", "tool_calls": [],  # an OpenAI (or vLLM) reply sent back, as agent
              "reasoning_content": "hmm"}  # loops do: vLLM's carry tool_calls: [] and its reasoning parsers' text
    status, body = _chat(client, messages=[{"role": "user", "content": "hi", "name": "ann"}, echoed,
                                           {"role": "user", "content": "k"}], max_tokens=1)
    assert status == 200 or body["error"]["code"] == "context_length_exceeded", body  # accepted; the context is 48
    status, body = _chat(client, messages=[{"role": "user", "content": "hi", "audio": {"id": "a1"}}])
    assert status == 400 and body["error"]["param"] == "messages.0.audio"
    streamed_call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    status, body = _chat(client, messages=[  # tool calls accumulated from a stream keep their delta index
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [streamed_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1"}], max_tokens=1)
    assert status == 200 or body["error"]["code"] == "context_length_exceeded", body  # accepted; the context is 48
    parsed_call = {"id": "call_1", "type": "function",  # the openai SDK's parse() / stream() helpers' replies
                   "function": {"name": "f", "arguments": '{"a": 1}', "parsed_arguments": {"a": 1}}}
    status, body = _chat(client, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [parsed_call],
                                           "parsed": None},
        {"role": "tool", "tool_call_id": "call_1", "content": "1"},
        {"role": "assistant", "content": '{"b": 2}', "parsed": {"b": 2}}, {"role": "user", "content": "ok"}],
        max_tokens=1)
    assert status == 200 or body["error"]["code"] == "context_length_exceeded", body


NAMES = ("{% for m in messages %}{{ m['role'] }}{% if m['name'] is defined %}[{{ m['name'] }}]{% endif %}:"
         "{% if m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
         "{{ m['content'] or '' }}{% for c in m['tool_calls'] or [] %}<longcat_tool_call>{{ c['function']['name'] }}"
         "</longcat_tool_call>{% endfor %}|{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_served_prompt_is_dated_today_as_transformers_dates_it():
    """A template dated with transformers' `strftime_now` (Llama 3.x) fell back to its fixed date when served."""
    from datetime import datetime

    tokenizer = stdlib_tokenizer(256)
    tokenizer.chat_template = ("{% if strftime_now is defined %}{{ strftime_now('%Y-%m-%d') }}{% endif %}|"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    body = p.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    before = datetime.now().strftime("%Y-%m-%d")
    text = tokenizer.decode(chat_prompt(tokenizer, body, app_module._tool_plan(body), 4096))
    assert text in (f"{before}|hi", f"{datetime.now().strftime('%Y-%m-%d')}|hi")  # midnight may pass between


def test_names_and_reasoning_reach_the_template_as_vllm_passes_them(client):
    """A tool message's `name` is the function it answers, which a template may render (`longcat sft` gives it to
    the template too). A participant's name and an assistant's reasoning were dropped though a template (ChatML
    variants, Qwen3's) renders them; they reach it now, and are dropped only when they are no text."""
    tokenizer = stdlib_tokenizer(256)
    tokenizer.chat_template = NAMES
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "hi", "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": [call], "name": "bot", "reasoning_content": "r"},
                {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "1"},
                {"role": "user", "content": "ok", "name": 5, "reasoning_content": {"x": 1}}]  # no text: dropped
    body = p.ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages})
    text = tokenizer.decode(chat_prompt(tokenizer, body, app_module._tool_plan(body), 4096),
                            skip_special_tokens=False)
    assert text == ("user[ann]:hi|assistant[bot]:<think>r</think><longcat_tool_call>f</longcat_tool_call>|tool[f]:1|"
                    "user:ok|assistant:")
    for name in ("x" * 300, 123, ""):  # the built-in template renders no participant's name
        status, body = _chat(client, messages=[{"role": "user", "content": "hi", "name": name}], max_tokens=1)
        assert status == 200 or body["error"]["code"] == "context_length_exceeded", body
    status, body = _chat(client, messages=[{"role": "user", "content": "hi", "name": "a\ud800"}], max_tokens=1)
    assert status == 400 and body["error"]["param"] == "messages.0.name", body


def test_any_int64_seed_is_taken(client):
    def texts(**fields) -> list[str]:
        status, body = _chat(client, temperature=1.0, max_tokens=6, **fields)
        assert status == 200, body
        return [c["message"]["content"] for c in body["choices"]]

    assert texts(seed=-1) == texts(seed=-1)  # clients send -1; OpenAI and vLLM take any int64
    assert len(texts(n=3, seed=p.MAX_SEED)) == 3  # the copies' seeds wrap around
    status, body = _chat(client, seed=p.MIN_SEED - 1)
    assert status == 400 and body["error"]["param"] == "seed"


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"), ({"logit_bias": {"\u0663": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x\ud800"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["\udc00"]}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"description": "\udc00"}}}]},
     "tools.0.function.parameters"),
    ({"top_logprobs": 2}, "top_logprobs"),
    # unknown fields inside the request's objects, as at its top level
    ({"tools": [{"type": "function", "cache_control": {}, "function": {"name": "f"}}]}, "tools.0.cache_control"),
    ({"tools": [{"type": "function", "function": {"name": "f", "bogus": 1}}]}, "tools.0.function.bogus"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]},
     "messages.0.content.0.cache_control"),
    ({"tool_choice": {"type": "function", "function": {"name": "f", "x": 1}}}, "tool_choice.function.x"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"response_format": {"type": "xml"}}, "response_format.type"), ({"response_format": {}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": ["x"]}}, "response_format.type"), ({"response_format": {"type": {}}},
                                                                       "response_format.type"),  # were 500s
    # values of other JSON types than declared: refused, not coerced
    ({"n": "2"}, "n"), ({"n": True}, "n"), ({"n": 2.0}, "n"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"), ({"stream": "false"}, "stream"), ({"logit_bias": {"5": True}},
                                                                                 "logit_bias.5"),
    ({"logit_bias": {"5": 100, "05": -100}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]}, "tools.0.function.parameters"),
])
def test_bad_fields_get_a_400_naming_them(client, fields, param):
    status, body = _chat(client, **fields)
    assert status == 400 and body["error"]["param"] == param, body


def test_a_trailing_assistant_message_is_history_or_continued(client):
    """lm_eval sends one (a task's gen_prefix): as in vLLM it is a turn of its own, and the reply the next; with
    vLLM's continue_final_message the reply continues it instead (an assistant prefill)."""
    tokenizer = stdlib_tokenizer(256)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]

    def prompt(**fields) -> str:
        body = p.ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages, **fields})
        ids = chat_prompt(tokenizer, body, app_module._tool_plan(body), 4096)
        return tokenizer.decode(ids, skip_special_tokens=False)

    history = tokenizer.apply_chat_template(messages)
    assert prompt() == history  # the turn closed, the next one opened
    assert prompt(continue_final_message=True) == history[:history.rindex("Sure, ") + len("Sure, ")]
    status, body = _chat(client, messages=messages, max_tokens=1, continue_final_message=True)
    assert status == 200 or body["error"]["code"] == "context_length_exceeded", body
    for fields in ({"messages": messages[:1]}, {"response_format": {"type": "json_object"}}):
        status, body = _chat(client, continue_final_message=True, **fields)
        assert status == 400 and body["error"]["param"] == "continue_final_message", body
    # vLLM's add_generation_prompt, which its clients send false beside continue_final_message (it was refused as
    # a field this server does not take); false alone leaves the reply's turn unopened, as in transformers
    assert prompt(continue_final_message=True, add_generation_prompt=False) == prompt(continue_final_message=True)
    assert prompt(add_generation_prompt=False) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt(add_generation_prompt=False) != history
    status, body = _chat(client, messages=messages, continue_final_message=True, add_generation_prompt=True)
    assert status == 400 and body["error"]["param"] == "add_generation_prompt", body


@pytest.mark.parametrize("fields, param, says", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {
        "url": "x"}}]}]}, "messages.0.content.1.type", "'image_url' parts are not supported: this model reads text"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content", "a string or a list of text parts"),
    ({"functions": [{"name": "f"}]}, "functions", "the legacy form of tools is not supported by this server; send "
                                                  "tools"),
    ({"function_call": "auto"}, "function_call", "send tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "only allowed when tools are given"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "description": [1]}}},
     "response_format.json_schema.description", "must be a string"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}", "description": "w" * 400}} for i in range(60)]},
     "messages", "the prompt rendered from messages and tools: "),
    # NaN and Infinity, which Python's JSON reader takes, are not JSON: a tool's bound reached the prompt, a call's
    # arguments the template, a schema's default the grammar compiler (which quoted its own grammar text)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "number", "maximum": float("inf")}}}}}]}, "tools.0.function.parameters",
     "holds Infinity, which is not JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": NaN}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
     "messages.1.tool_calls.0.function.arguments", "NaN is not JSON"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "default": float("nan")}}}}, "response_format.json_schema", "holds NaN, which is not JSON"),
])
def test_a_refusal_says_what_is_wrong(client, fields, param, says):
    status, body = _chat(client, **fields)
    assert status == 400 and body["error"]["param"] == param and says in body["error"]["message"], body
    assert body["error"]["code"] in ("invalid_value", "context_length_exceeded"), body


def test_a_model_is_retrieved_by_its_id_as_the_openai_sdk_asks(client):
    card = client.get("/v1/models/tiny", headers=AUTH).json()
    assert (card["id"], card["object"], card["max_model_len"]) == ("tiny", "model", CONTEXT)
    r = client.get("/v1/models/other", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/tiny").status_code == 401


def test_an_overflowing_limit_is_named_as_sent_and_vllms_top_k_off_is_taken(client):
    status, body = _chat(client, max_tokens=None, max_completion_tokens=CONTEXT)
    assert status == 400 and body["error"]["param"] == "max_completion_tokens", body
    assert body["error"]["message"].startswith(f"max_completion_tokens={CONTEXT} plus")
    assert _chat(client, top_k=-1)[0] == 200  # vLLM's "off"
    assert _chat(client, top_k=-2)[0] == 400


def test_stop_takes_the_stop_lists_evaluators_send(client):
    """lm_eval's local-completions sends a task's whole `until` list plus EOS (HumanEval: 6); OpenAI's limit of 4
    refused them."""
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>"]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stop": until}
    assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    r = client.post("/v1/completions", json={**body, "stop": [f"s{i}" for i in range(p.MAX_STOP + 1)]}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_the_key_and_the_body_bound_are_checked_before_the_body_is_read(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={})
    assert r.status_code == 401  # not the 400 that parsing the malformed body would give
    limit = ServerConfig.max_body_bytes
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * limit + b'"}]}'
    r = client.post("/v1/chat/completions", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = (big[i:i + 2**20] for i in range(0, len(big), 2**20))  # no Content-Length: cut off while read
    r = client.post("/v1/chat/completions", content=chunked, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(client):
    tokenizer = stdlib_tokenizer(256)
    status, body = _chat(client, messages=[{"role": "user", "content": "a" * (CONTEXT * tokenizer.max_token_chars)}])
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "characters cannot fit" in body["error"]["message"]


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429(client):
    """An idle server with max_running=8 and max_waiting=16 could never admit 25 prompts at once: every retry of a
    429 would fail. 24 it takes: the free running slots count (it refused 17)."""
    body = {"model": "tiny", "prompt": [f"x{i}" for i in range(25)], "max_tokens": 1}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts"
    assert client.post("/v1/completions", json={**body, "prompt": body["prompt"][:24]}, headers=AUTH).status_code == 200


def test_more_copies_than_max_running_is_a_400_naming_n(client):
    """n copies decode together, each a running sequence: above max_running (8 here) they would take the batch
    past the limit the server was started with."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    r = client.post("/v1/completions", json={**body, "n": 9}, headers=AUTH)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "n" and "--max-running" in error["message"]
    assert client.post("/v1/completions", json={**body, "n": 8}, headers=AUTH).status_code == 200
    # 4 prompts x 8 copies are 32 sequences, more than the 8 running + 16 waiting an idle server queues
    r = client.post("/v1/completions", json={**body, "prompt": ["w", "x", "y", "z"], "n": 8}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts", r.text
    assert "4 prompts x n=8 are 32 sequences" in r.json()["error"]["message"]


def test_a_models_generation_config_sets_the_sampling_a_request_leaves_out(tmp_path):
    """vLLM samples with generation_config.json's temperature, top_p, ... where a request gives none; it was
    never read. Here the model's default is greedy: requests without a temperature all decode the same."""
    tokenizer = stdlib_tokenizer(256)
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size))
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=4, cache_tokens=512))).start()
    config = ServerConfig(model_name="tiny", context=CONTEXT, sampling_defaults={"temperature": 0.0})
    try:
        with TestClient(create_app(bridge, tokenizer, config)) as client:
            def text(**fields) -> str:
                body = {"model": "tiny", "prompt": "ab", "max_tokens": 8, "ignore_eos": True, **fields}
                return client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            greedy = text(temperature=0)
            assert text() == text(temperature=None) == greedy  # left out, or null: the model's default
            assert {text(temperature=1.0, seed=s) for s in range(4)} != {greedy}  # given: the request's
    finally:
        bridge.stop()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "max_length": 9}))
    assert app_module.model_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert app_module.model_defaults(tmp_path) == {"temperature": 0.0}  # greedy, as transformers reads it
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match=r"generation_config.json: top_p must be in \(0, 1\]"):
        app_module.model_defaults(tmp_path)


def test_an_eos_that_is_an_ordinary_token_is_not_part_of_the_text():
    """vLLM leaves the token that ended a request out of its text; an EOS id that is no special token (config.json
    naming an ordinary one, as some ChatML tokenizers do) ended every reply with its own text."""
    tokenizer = stdlib_tokenizer(256)
    [eos] = tokenizer.encode("e")
    model = randomized(tiny().replace(vocab_size=tokenizer.vocab_size, eos_token_id=(tokenizer.eos_id, eos)))
    bridge = AsyncEngine(Engine(model, EngineConfig(max_running=2, cache_tokens=256))).start()
    try:
        with TestClient(create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=CONTEXT))) as client:
            body = {"model": "tiny", "prompt": "ab", "max_tokens": 4, "logit_bias": {str(eos): 100}}
            choice = client.post("/v1/completions", json=body).json()["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == ("", "stop")
            ignored = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()["choices"][0]
            assert ignored["text"] == "e" * 4 and ignored["finish_reason"] == "length"
    finally:
        bridge.stop()


@pytest.mark.parametrize("body, reason", [
    (b'{"model": "tiny", "messages": [', "Expecting value"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}'.encode("latin-1"), "not valid UTF-8"),
    (b'{"model": "tiny", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b"}", "a number with more than 4300 digits"),  # int limit
])
def test_a_body_that_is_not_json_is_a_400_saying_why(client, body, reason):
    """Not UTF-8 or nested past the parser's depth too: FastAPI answered those with its bare 'There was an error
    parsing the body'."""
    r = client.post("/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_json", r.text
    assert error["message"].startswith(f"malformed JSON body: {reason}"), error["message"]
    assert "sys." not in error["message"]  # Python's advice to raise its int limit is the operator's, not the client's


def test_an_empty_json_body_is_named_as_empty(client):
    """FastAPI reads no body as a missing one: the 400 said "body: Field required"."""
    r = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_json" and "empty" in error["message"], r.text


def test_a_request_without_a_model_asks_for_the_served_one(client):
    """As vLLM reads it: `model` absent or null is the served model (null said "model: Field required")."""
    for fields in ({}, {"model": None}):
        body = {"prompt": "ab", "max_tokens": 2, **fields}
        r = client.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
    status, body = _chat(client, model="other")
    assert status == 404 and body["error"]["code"] == "model_not_found", body


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty", "min_p"])
def test_a_sampling_value_that_is_no_number_is_named_as_such(client, field):
    """Python's json reads NaN; it was refused as "less than or equal to 2", which it is not either."""
    for value in (float("nan"), float("inf")):
        status, body = _chat(client, **{field: value})
        assert status == 400 and body["error"]["param"] == field, body
        assert "finite number" in body["error"]["message"], body


def test_a_logit_bias_that_is_no_number_is_refused(client):
    """Every number a request part holds is finite: a NaN bias was refused only by the range check's comparison."""
    status, body = _chat(client, logit_bias={"5": float("nan")})
    assert status == 400 and body["error"]["param"].startswith("logit_bias"), body
    assert "finite number" in body["error"]["message"], body


def test_tokenize_gives_the_ids_a_completions_prompt_becomes_and_detokenize_inverts_it(client):
    """vLLM's tokenizer routes, which lm_eval's remote tokenizer and agents' token budgets use (they were 404s)."""
    text = "def f(x):\n    return x</s> é"
    r = client.post("/tokenize", json={"model": "tiny", "prompt": text, "add_special_tokens": False,
                                       "return_token_strs": True}, headers=AUTH)
    body = r.json()
    scored = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 0, "echo": True,
                                                  "logprobs": 0}, headers=AUTH).json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == CONTEXT and scored["usage"]["prompt_tokens"] == body["count"]
    assert 2 in body["tokens"]  # the eos text is the eos token, as in a completions prompt
    back = client.post("/detokenize", json={"tokens": body["tokens"]}, headers=AUTH).json()
    assert back == {"prompt": text}
    info = client.get("/tokenizer_info", headers=AUTH).json()
    assert (info["eos_token"], info["model_max_length"]) == ("</s>", CONTEXT) and "{%" in info["chat_template"]


def test_tokenize_adds_what_the_tokenizers_post_processor_adds_unless_told_not_to():
    """vLLM's add_special_tokens (true by default): a tokenizer whose post-processor puts a bos first (as Llama's
    do) gets it, as from vLLM; sent false, the prompt's ids alone, which lm_eval asks for."""
    from tokenizers import processors

    from longcat_flash.tokenizer import Tokenizer

    base = stdlib_tokenizer(256)
    backend = base.backend
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", base.bos_id)])
    tokenizer = Tokenizer(backend)
    bridge = AsyncEngine(Engine(randomized(tiny().replace(vocab_size=tokenizer.vocab_size)),
                                EngineConfig(cache_tokens=2048))).start()
    try:
        with TestClient(create_app(bridge, tokenizer, ServerConfig(model_name="tiny", context=CONTEXT))) as fresh:
            plain = tokenizer.encode("def f(x):", allow_special=True)
            told = [fresh.post("/tokenize", json={"prompt": "def f(x):", **flag}).json()["tokens"]
                    for flag in ({}, {"add_special_tokens": True}, {"add_special_tokens": False})]
            assert told == [[base.bos_id, *plain], [base.bos_id, *plain], plain]
    finally:
        bridge.stop()


def test_the_open_tokenizer_routes_work_a_few_at_a_time_and_refuse_a_crowd():
    """Without a key, clients looping 1M-character /tokenize calls took the CPU from keyed completions (seconds
    each) and their concurrent work grew the server past 1.8 GB: two compute at once, a bounded few wait, more are a
    503 to retry."""
    import asyncio
    import threading

    from longcat_flash.serve.errors import APIError
    from longcat_flash.serve.tokenizer_routes import WorkGate

    gate, running, most, release = WorkGate(workers=2, queue=3), [0], [0], threading.Event()

    def work():
        running[0] += 1
        most[0] = max(most[0], running[0])
        release.wait(5)
        running[0] -= 1
        return "done"

    async def crowd():
        calls = [asyncio.ensure_future(gate.run(work)) for _ in range(7)]  # 2 run, 3 wait, 2 refused
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(crowd())
    refused = [r for r in results if isinstance(r, APIError)]
    assert results.count("done") == 5 and len(refused) == 2 and most[0] == 2
    assert refused[0].status == 503 and refused[0].headers["Retry-After"] == "1"


def test_the_key_guards_the_api_and_leaves_the_tokenizer_routes_open_as_vllm_does(client):
    """lm_eval's remote tokenizer asks /tokenizer_info without the key it sends to /v1/ (vLLM guards /v1/ alone):
    behind a key it fell back to a hub download."""
    assert client.get("/tokenizer_info").status_code == 200
    assert client.post("/tokenize", json={"prompt": "x"}).json()["count"] >= 1
    assert client.post("/detokenize", json={"tokens": [5]}).status_code == 200
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 401


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}]}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
])
def test_the_tokenizer_routes_refuse_what_they_do_not_serve(path, body, status, param, client):
    r = client.get(path, headers=AUTH) if body is None else client.post(path, json=body, headers=AUTH)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
