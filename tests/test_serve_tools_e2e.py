"""Tools end to end: a real `longcat serve` subprocess on the scripted checkpoint, driven by the openai client:
a named tool call, its streamed deltas reassembled, the result sent back, a final answer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from chat_support import scripted_checkpoint
from test_serve import free_port
from test_serve_tools import ASK, NAMED, SCRIPTS, WEATHER

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow


def test_tool_round_trip_with_the_openai_client(tmp_path):
    model_dir = scripted_checkpoint(tmp_path / "scripted", SCRIPTS)
    port = free_port()
    exe = [shutil.which("longcat")] if shutil.which("longcat") else [sys.executable, "-m", "longcat_flash.cli"]
    proc = subprocess.Popen([*exe, "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while not _healthy(base):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
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
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
