"""Tools end to end: a real `longcat serve` subprocess on the scripted checkpoint, driven by the openai client:
a named tool call, its streamed deltas reassembled, the result sent back, a final answer."""
from __future__ import annotations

import pytest

from chat_support import scripted_checkpoint
from serve_support import running_server
from test_serve_tools import ASK, NAMED, SCRIPTS, WEATHER

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow


def test_tool_round_trip_with_the_openai_client(tmp_path):
    model_dir = scripted_checkpoint(tmp_path / "scripted", SCRIPTS)
    with running_server(model_dir, "--device", "cpu", startup_s=60) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)
        kwargs = dict(model="scripted", messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=32)
        reply = client.chat.completions.create(**kwargs)
        [call] = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and not reply.choices[0].message.content
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')

        streamed = {}
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for delta in chunk.choices[0].delta.tool_calls or []:
                entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
        assert streamed == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

        history = [*ASK, reply.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "21 C, sun"}]
        answer = client.chat.completions.create(model="scripted", messages=history, tools=[WEATHER], max_tokens=32)
        assert answer.choices[0].message.content == "Sunny, 21 C." and answer.choices[0].finish_reason == "stop"
