"""`longcat serve` as a real subprocess on a free loopback port, driven by the official openai client."""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.presets import tiny
from longcat_flash.tokenizer import Tokenizer

from serve_support import free_port, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

KEY = "sk-test-123"
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = init_checkpoint(tiny(), tmp_path_factory.mktemp("ckpt") / "tiny", dtype=torch.float32)
    with running_server(model_dir, "--api-key", KEY, "--max-waiting", "64") as base:
        yield base, Tokenizer.load(model_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def served(base: str, status: str) -> float:
    """/v1/completions responses with `status` so far (0 before the first)."""
    series = f'longcat_http_requests_total{{path="/v1/completions",status="{status}"}}'
    found = re.search(rf"^{re.escape(series)} (\S+)$", httpx.get(f"{base}/metrics", timeout=5).text, re.M)
    return float(found.group(1)) if found else 0.0


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"] == [client.models.retrieve("tiny").id]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    unauthorized = httpx.get(f"{server[0]}/v1/models")
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["message"]


def test_completion_usage_and_streaming_agree(server, client):
    _, tokenizer = server
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and full.usage.completion_tokens == 12
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_chat_and_chat_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


def test_content_parts_and_developer_role_read_as_plain_messages(client, server):
    kwargs = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}], **kwargs)
    parts = client.chat.completions.create(messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello!"}]}], **kwargs)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.content")


def test_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_stop_sequences(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    start = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=[stop], stream=True))
        else:
            choice = client.completions.create(**kwargs, stop=[stop]).choices[0]
            assert choice.finish_reason == "stop"
            got = choice.text
        assert got == text[: text.find(stop)]


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 10**9}, "max_tokens"), ({"model": "gpt-4"}, "model"),
    ({"temperature": 7}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 40}, "n"),
    ({"prompt": "x " * 2000}, "prompt"), ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
])
def test_bad_requests_get_openai_shaped_4xx(server, change, param):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **change}
    r = httpx.post(f"{server[0]}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    error = r.json()["error"]
    assert r.status_code == (404 if param == "model" else 400)  # an unknown model is a 404, as OpenAI and vLLM say
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_and_bad_messages(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server[0]}/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_burst_of_concurrent_clients_never_gets_5xx(server):
    def one(i: int) -> int:
        body = {"model": "tiny", "prompt": f"{PROMPT} # {i}", "max_tokens": 16, "temperature": 0.8, "seed": i,
                "stream": i % 2 == 0}
        r = httpx.post(f"{server[0]}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=120)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(one, range(48)))
    assert all(s < 500 for s in statuses) and statuses.count(200) >= 24, statuses
    assert set(statuses) <= {200, 429}


def test_a_non_streamed_request_whose_client_left_is_cancelled_while_it_generates(server):
    """The engine sends output every step, so the disconnect must be checked on a clock, not in output gaps."""
    base = server[0]
    cancelled = metric(base, "longcat_requests_cancelled_total")
    closed, answered = served(base, "499"), served(base, "200")
    body = {"model": "tiny", "prompt": [PROMPT] * 8, "max_tokens": 480, "ignore_eos": True, "n": 4}  # 15k tokens
    try:
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        pytest.fail(f"the request ended before its client left: {r.status_code} {r.text[:200]}")
    except httpx.ReadTimeout:
        pass
    deadline = time.time() + 30
    while time.time() < deadline and metric(base, "longcat_requests_cancelled_total") < cancelled + 32:
        time.sleep(0.1)
    assert metric(base, "longcat_requests_cancelled_total") >= cancelled + 32
    assert served(base, "499") == closed + 1 and served(base, "200") == answered  # it was counted as answered


@pytest.mark.parametrize("copies", [{}, {"prompt": [PROMPT, "x"], "n": 3}])
def test_disconnected_client_is_cancelled_and_frees_its_pages(server, copies):
    base = server[0]
    cancelled = metric(base, "longcat_requests_cancelled_total")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "stream": True, "ignore_eos": True, **copies}
    n_requests = len(body["prompt"]) * body.get("n", 1) if isinstance(body["prompt"], list) else 1
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    deadline = time.time() + 20
    while time.time() < deadline:
        if metric(base, "longcat_requests_cancelled_total") >= cancelled + n_requests and \
                metric(base, "longcat_cache_pages_used") == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned request was not cancelled, or its pages were not freed")
    assert metric(base, "longcat_running_requests") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_server_stops_when_its_parent_is_killed(tmp_path):
    """An experiment killed by a time-out (SIGKILL: no `finally`) left its `longcat serve` running."""
    model = init_checkpoint(tiny(), tmp_path / "tiny", dtype=torch.float32, seed=0)
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from serve_support import running_server
with running_server({str(model)!r}):
    children = open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children").read().split()
    print(children[0], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""], stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    parent.wait(timeout=120)
    deadline = time.time() + 30
    while Path(f"/proc/{server}").exists() and time.time() < deadline:
        time.sleep(0.2)
    alive = Path(f"/proc/{server}").exists()
    if alive:
        os.kill(server, signal.SIGKILL)
    assert not alive, "the server outlived its parent"


@contextlib.contextmanager
def started_server(model: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """`longcat serve` in a session of its own, once /health answers; and its port. Killed, with its engine, if
    still running when the block ends (a failed test left it serving)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "longcat_flash.cli", "serve", "--model", str(model), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 90
        while server.poll() is None and time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield server, port
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_server_started_for_a_test_is_its_own_though_another_answers_on_a_port_picked_before(tmp_path,
                                                                                                  monkeypatch):
    """Two pytest workers start servers at once: a port picked free before the server bound it could be the other
    worker's server by then, whose /health answered for this one. The server picks its own port (`--port 0`) and
    says which; a port picked here is not used."""
    import http.server
    import threading

    from longcat_flash.serve import launch

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (the handler's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        monkeypatch.setattr(launch, "free_port", lambda: other.server_address[1])
        with running_server(init_checkpoint(tiny(), tmp_path / "tiny", dtype=torch.float32)) as base:
            assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "tiny"
        other.shutdown()


def test_a_server_whose_engine_process_dies_stops_with_status_1(tmp_path):
    """It stayed up for ever: /health 503, but /v1/models 200, so a supervisor restarting on failure (systemd's
    Restart=on-failure, Docker's, Kubernetes' readiness on /v1/models) never did. vLLM's server stops."""
    with started_server(init_checkpoint(tiny(), tmp_path / "tiny", dtype=torch.float32)) as (server, _):
        [engine] = [pid for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
                    if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(int(engine), signal.SIGKILL)  # the OOM killer, a crash in a kernel
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1] == ("longcat serve: the engine process exited while serving (killed by "
                                               "signal 9 (SIGKILL: most often the system out of memory)): stopped, "
                                               "so that a supervisor can restart the server")


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_a_stop_ends_what_is_still_open_as_openai_errors_and_exits(tmp_path, signals):
    """A SIGTERM to the process group (as systemd sends it; Ctrl-C takes the same path) with requests running past
    the grace: uvicorn cancelled them, a client got a plain-text 500 or a stream cut short, the log a traceback per
    request; and the engine process died at once, so nothing got its grace. Ctrl-C twice ends them at once, the
    same way (uvicorn's force quit dropped them with a traceback each)."""
    model = init_checkpoint(tiny().replace(max_position_embeddings=32768), tmp_path / "tiny", dtype=torch.float32)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000,
            "ignore_eos": True}  # a minute or more: far past the grace

    def stream() -> tuple[list[str], float]:
        with httpx.stream("POST", f"{base}/chat/completions", json={**chat, "stream": True}, timeout=60) as r:
            return [line for line in r.iter_lines() if line], time.time()

    with started_server(model) as (server, port), concurrent.futures.ThreadPoolExecutor(2) as pool:
        base = f"http://127.0.0.1:{port}/v1"
        answered = pool.submit(lambda: (httpx.post(f"{base}/chat/completions", json=chat, timeout=60), time.time()))
        streamed = pool.submit(stream)
        time.sleep(1.5)
        engine = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        stopped = time.time()
        for k, sig in enumerate(signals):
            time.sleep(0.5 * (k > 0))
            os.killpg(server.pid, sig)
        output, _ = server.communicate(timeout=60)
        took = time.time() - stopped
        (answered, replied), (events, ended) = answered.result(), streamed.result()
    from longcat_flash.serve.server import SHUTDOWN_CUT_S, SHUTDOWN_GRACE_S  # after the importorskips above

    assert took < SHUTDOWN_GRACE_S + SHUTDOWN_CUT_S + 5, took
    if len(signals) > 1:  # the second ends the stream at once, not after the grace
        assert max(ended, replied) - stopped < SHUTDOWN_GRACE_S - 2, (ended - stopped, replied - stopped)
    assert answered.status_code == 503 and answered.json()["error"]["code"] == "engine_down", answered.text[:300]
    assert events[-1] == "data: [DONE]" and '"code":"engine_down"' in events[-2], events[-3:]
    assert "Traceback" not in output and "ERROR" not in output, output[-3000:]
    gone = time.time() + 10  # the engine process and multiprocessing's resource tracker, reaped once orphaned
    while any(Path(f"/proc/{pid}").exists() for pid in engine) and time.time() < gone:
        time.sleep(0.1)
    assert engine and not any(Path(f"/proc/{pid}").exists() for pid in engine)


def test_a_sigterm_to_the_server_alone_stops_its_engine_before_it_exits(tmp_path):
    """`kill PID` (the server alone, not its group): uvicorn raises the signal again once it stops serving, which
    killed the server before its `finally` stopped the engine process; that one noticed a second later, so a
    supervisor restarting at once had two engines in memory."""
    model = init_checkpoint(tiny(), tmp_path / "tiny", dtype=torch.float32)
    with started_server(model) as (server, _):
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        [engine] = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(server.pid, signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
        exited = time.time()
        while Path(f"/proc/{engine}").exists() and time.time() < exited + 0.3:  # the kernel reaps as it exits
            time.sleep(0.02)
        assert not Path(f"/proc/{engine}").exists(), "the engine process outlived the server"
    assert server.returncode == -signal.SIGTERM and "Traceback" not in output, output[-3000:]
