"""Structured output end to end: a real `longcat serve` subprocess on a random-weights checkpoint, driven by the
openai client. Whatever the weights write, a forced call validates, the tool result goes back and an answer
comes, a json_schema answer validates, and streamed tool-call deltas reassemble into a valid call."""
from __future__ import annotations

import json

import pytest
import torch
from serve_support import running_server
from test_serve_structured import ASK, SCHEMAS, TOOLS, tools

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.presets import tiny

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

OFFERED = tools("get_weather", "search")
SCHEMA_OF = {tool["name"]: tool["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = init_checkpoint(tiny().replace(max_position_embeddings=2048),
                                tmp_path_factory.mktemp("ckpt") / "tiny", dtype=torch.float32)
    with running_server(model_dir, "--device", "cpu") as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


def test_forced_call_result_and_answer(client):
    kwargs = {"model": "tiny", "temperature": 1.0, "max_tokens": 160, "seed": 3}
    reply = client.chat.completions.create(messages=ASK, tools=OFFERED, tool_choice="required",
                                           parallel_tool_calls=False, **kwargs)
    choice = reply.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])

    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 C, sun"}]
    answer = client.chat.completions.create(messages=history, tools=OFFERED, tool_choice="none", **kwargs).choices[0]
    assert isinstance(answer.message.content, str) and answer.message.content and not answer.message.tool_calls
    assert answer.finish_reason in ("stop", "length")


def test_json_schema_answer_validates(client):
    for seed, schema in enumerate(SCHEMAS):
        reply = client.chat.completions.create(
            model="tiny", messages=ASK, temperature=1.0, max_tokens=200, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                    "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_streamed_tool_call_deltas_reassemble(client):
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, tools=OFFERED, tool_choice="required",
                                                temperature=1.0, max_tokens=200, seed=5, stream=True):
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert calls and reasons[-1] == "tool_calls"
    for entry in calls.values():
        assert entry["id"].startswith("call_")
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMA_OF[entry["name"]])


def test_the_sdk_helpers_replies_go_back_into_the_history(client):
    """Agents on the SDK's `parse()` / `stream()` helpers append the reply object as it came, with the client-side
    `parsed_arguments` the helpers add; and a streamed forced call joins to the non-streamed message (no content:
    null, not "")."""
    strict = [{"type": "function", "function": {**tool["function"], "strict": True}} for tool in OFFERED]
    kwargs = {"model": "tiny", "messages": ASK, "tools": strict, "tool_choice": "required",
              "parallel_tool_calls": False, "temperature": 1.0, "max_tokens": 160, "seed": 3}
    parsed = client.chat.completions.parse(**kwargs).choices[0].message
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0].message
    [call] = parsed.tool_calls
    assert call.function.parsed_arguments == json.loads(call.function.arguments)
    assert parsed.content is None and streamed.content is None
    assert [c.function.arguments for c in streamed.tool_calls] == [call.function.arguments]
    history = [*ASK, parsed, {"role": "tool", "tool_call_id": call.id, "content": "21 C, sun"}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=strict, tool_choice="none",
                                            max_tokens=8, seed=3)
    assert answer.choices[0].message.content
