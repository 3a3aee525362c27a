"""serve/guard.py on a bare app, at the ASGI level: the API key's scheme, a body that never arrives whole, the bound
on the bodies held by requests in flight, and JSON parsed off the event loop."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import ClassVar

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel, field_validator  # noqa: E402
from serve_support import on_a_loop  # noqa: E402

from longcat_flash.serve import guard  # noqa: E402
from longcat_flash.serve.guard import (BODIES_IN_FLIGHT, OPEN_BODIES_IN_FLIGHT, JSONOffLoopRoute,  # noqa: E402
                                       RequestGuard)

KEY = "sk-guard"
LIMIT = 1000  # max_body_bytes


def bare_app(release: asyncio.Event | None = None, **guard_options) -> RequestGuard:
    """One JSON route behind the guard; with `release`, it holds each request (and its body) until it is set."""
    app = FastAPI()
    app.router.route_class = JSONOffLoopRoute

    @app.post("/v1/echo")
    @app.post("/tokenize")  # open, as the tokenizer routes are
    async def echo(body: dict) -> dict:
        if release is not None:
            await release.wait()
        return {"keys": sorted(body)}

    return RequestGuard(app, api_key=KEY, max_body_bytes=LIMIT, **guard_options)


def client(app: RequestGuard, key: str | None = f"Bearer {KEY}") -> httpx.AsyncClient:
    headers = {"Content-Type": "application/json", **({} if key is None else {"Authorization": key})}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


def body_of(size: int) -> bytes:
    return json.dumps({"pad": "x" * (size - 11)}).encode()


@pytest.mark.parametrize("header, status", [(f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"BEARER  {KEY} ", 200),
                                            (KEY, 401), (f"Basic {KEY}", 401), ("Bearer sk-other", 401)])
def test_the_api_key_is_a_bearer_token_with_a_case_insensitive_scheme(header, status):
    async def go():
        async with client(bare_app(), header) as c:
            return await c.post("/v1/echo", json={"a": 1})
    response = asyncio.run(go())
    assert response.status_code == status
    if status == 401:  # RFC 7235: a 401 names the scheme the client should use
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("::", None, True), ("myhost", None, True),
                                               ("0.0.0.0", KEY, False), ("127.0.0.1", None, False),
                                               ("::1", None, False), ("localhost", None, False)])
def test_listening_beyond_this_machine_without_a_key_is_said(host, key, warned):
    from longcat_flash.serve.server import exposure_warning

    warning = exposure_warning(host, key)
    assert (warning is not None) == warned and (not warned or warning.startswith(f"listening on {host} without"))


def test_a_compressed_body_is_a_415_naming_the_coding():
    """A gzip body was read as JSON ("not valid UTF-8"), and a plain one labelled gzip was taken as it was."""
    import gzip

    async def go():
        async with client(bare_app()) as c:
            plain = json.dumps({"a": 1}).encode()
            return [await c.post("/v1/echo", content=body, headers={"Content-Encoding": coding})
                    for body, coding in ((gzip.compress(plain), "gzip"), (plain, "gzip"), (plain, "identity"))]
    zipped, labelled, plain = asyncio.run(go())
    assert zipped.status_code == labelled.status_code == 415 and plain.status_code == 200
    assert zipped.json()["error"]["message"] == "Content-Encoding 'gzip' is not supported: send the body uncompressed"


@pytest.mark.parametrize("key, problem", [("", "empty"), ("ключ", "an API key is visible ASCII"),
                                          ("sk-1 ", "an API key is visible ASCII")])
def test_a_key_no_client_could_send_is_refused_at_start(key, problem):
    """An empty key let in a client sending `Bearer ` and nothing more; a non-ASCII one (or one ending in a space)
    could never be sent and matched. `longcat serve` refuses it before it loads anything, and keeps it unsaid."""
    from longcat_flash.cli import main

    with pytest.raises(ValueError, match=f"^--api-key: {problem}"):
        RequestGuard(FastAPI(), api_key=key, max_body_bytes=LIMIT)
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--model", "no-such-model", "--api-key", key])
    assert str(refused.value.code).startswith(f"longcat serve: --api-key: {problem}")
    assert key.strip() == "" or key not in str(refused.value.code)


@pytest.mark.parametrize("flags, problem", [
    (["--max-request-mb", "inf"], "--max-request-mb must be a positive number, got inf"),  # OverflowError traceback
    (["--max-request-mb", "1e-9"], "--max-request-mb 1e-09 is less than one byte"),  # 0 bytes: every request 413
    (["--model-name", " "], "--model-name is empty"),  # the directory's name was served instead, unsaid
    (["--host", ""], "--host is empty"),  # every interface, said as "http://:8000"
])
def test_server_flags_that_cannot_mean_what_they_say_are_refused(flags, problem):
    from longcat_flash.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["serve", "--model", "no-such-model", *flags])
    assert str(refused.value.code).startswith(f"longcat serve: {problem}")


@pytest.mark.parametrize("flag, value", [("--max-running", "0"), ("--max-waiting", "-1"), ("--cache-tokens", "0"),
                                         ("--speculative", "-1")])
def test_engine_sizes_are_checked_as_the_flags_they_are(flag, value, capsys):
    """They were named as the engine's fields (`EngineConfig.max_running must be an integer >= 1`)."""
    from longcat_flash.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "no-such-model", flag, value])
    assert f"argument {flag}: " in capsys.readouterr().err


def scope_for(path: str = "/v1/echo", keyed: bool = True) -> dict:
    key = [(b"authorization", f"Bearer {KEY}".encode())] if keyed else []
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [*key, (b"content-type", b"application/json")],
            "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "root_path": "",
            "server": ("test", 80), "client": ("test", 1)}


def stalled_body(release: asyncio.Event):
    """An ASGI receive that sends most of a JSON body, then the rest only once `release` is set."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b" " * (LIMIT - 10), "more_body": True}
        await release.wait()
        return {"type": "http.request", "body": b"{}", "more_body": False}
    return receive


@pytest.mark.parametrize("options, says", [({"body_timeout_s": 0.3}, b"not received whole within 0.3 s"),
                                           ({"body_idle_s": 0.3}, b"stalled: no byte of it for 0.3 s")])
def test_a_body_that_does_not_arrive_whole_in_time_or_stalls_is_a_408(options, says):
    """A stalled upload held its share of the bodies' bound for the whole 60 s: four of them kept every other
    client's body out (503) for a minute; one that pauses for body_idle_s is cut then."""
    app = bare_app(**options)
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def go():
        await asyncio.wait_for(app(scope_for(), stalled_body(asyncio.Event()), send), 10)  # the rest never comes
    start = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - start < 5
    status = next(m for m in sent if m.get("type") == "http.response.start")
    assert status["status"] == 408 and says in b"".join(m.get("body", b"") for m in sent)


def test_a_client_that_leaves_mid_body_is_a_499_not_a_400():
    """A client that hung up while its body was arriving was answered (and counted in /metrics) as a 400, "There
    was an error parsing the body", as if its input were at fault; it is nginx's 499, as a client that leaves
    before its answer is."""
    app = bare_app()
    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": b'{"mess', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope_for(), receive, send), 10))
    assert next(m for m in sent if m.get("type") == "http.response.start")["status"] == 499


def test_the_bodies_being_read_are_bounded_and_parsed_ones_no_longer_count():
    """The bound is on bodies being read and parsed (a parse costs ~25x a body for a moment), not on requests
    generating: requests that were parsed and hold their streams open never make the next one a 503."""
    async def ignore(message):
        pass

    async def go():
        release, hold = asyncio.Event(), asyncio.Event()
        reading = bare_app()
        readers = [asyncio.create_task(reading(scope_for(), stalled_body(release), ignore))
                   for _ in range(BODIES_IN_FLIGHT)]
        await asyncio.sleep(0.1)
        async with client(reading) as c:
            refused = await c.post("/v1/echo", content=body_of(LIMIT // 2))
        release.set()
        await asyncio.gather(*readers)
        generating = bare_app(hold)
        async with client(generating) as c:
            waiting = []
            for _ in range(2 * BODIES_IN_FLIGHT):  # one after another, each parsed and then held
                waiting.append(asyncio.create_task(c.post("/v1/echo", content=body_of(LIMIT - 10))))
                await asyncio.sleep(0.05)
            hold.set()
            statuses = [r.status_code for r in await asyncio.gather(*waiting)]
        return refused, statuses, reading.in_flight, generating.in_flight

    refused, statuses, reading, generating = asyncio.run(go())
    assert refused.status_code == 503 and "busy" in refused.text
    assert refused.headers["retry-after"] == "1"
    assert statuses == [200] * (2 * BODIES_IN_FLIGHT) and reading == generating == {True: 0, False: 0}


def test_bodies_without_the_key_are_bounded_apart_and_never_keep_the_keys_holders_out():
    """The tokenizer routes are open, as vLLM's are: clients without the key stalling bodies there took the one
    shared bound, and every keyed /v1/ request got a 503."""
    async def ignore(message):
        pass

    async def go():
        release = asyncio.Event()
        app = bare_app()
        stalled = [asyncio.create_task(app(scope_for("/tokenize", keyed=False), stalled_body(release), ignore))
                   for _ in range(OPEN_BODIES_IN_FLIGHT)]
        await asyncio.sleep(0.1)
        async with client(app, key=None) as open_client, client(app) as keyed_client:
            refused = await open_client.post("/tokenize", content=body_of(LIMIT // 2))
            served = await keyed_client.post("/v1/echo", content=body_of(LIMIT // 2))
        release.set()
        await asyncio.gather(*stalled)
        return refused.status_code, served.status_code, app.in_flight

    assert asyncio.run(go()) == (503, 200, {True: 0, False: 0})


def test_json_bodies_are_parsed_off_the_event_loop(monkeypatch):
    threads: list[str] = []
    loads = json.loads

    def recording(text, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(guard.json_text, "loads", recording)

    async def go():
        async with client(bare_app()) as c:
            response = await c.post("/v1/echo", json={"b": 1, "a": 2})
            return response, list(threads), threading.current_thread().name
    response, parsed_in, loop_thread = asyncio.run(go())
    assert response.status_code == 200 and loads(response.content) == {"keys": ["a", "b"]}
    assert parsed_in and loop_thread not in parsed_in


class Ask(BaseModel):
    """A body model that records where it is validated (on an event loop or not)."""
    text: str
    seen: ClassVar[list[bool]] = []

    @field_validator("text")
    @classmethod
    def _record(cls, value: str) -> str:
        cls.seen.append(on_a_loop())
        if value == "bad":
            raise ValueError("not this one")
        return value


def test_a_body_is_validated_as_its_model_off_the_event_loop_once():
    """FastAPI validated a body on the event loop: an 8 MB one (250,000 content parts, or 128 nested tool schemas)
    kept /health and every stream waiting for seconds. The route validates it in a worker thread, and FastAPI
    takes the model as it is; a refusal is still FastAPI's own, naming the field."""
    app = FastAPI()
    app.router.route_class = JSONOffLoopRoute

    @app.post("/v1/ask")
    async def ask(body: Ask) -> dict:
        return {"text": body.text, "model": type(body).__name__}

    async def go(payload: dict) -> httpx.Response:
        async with client(RequestGuard(app, api_key=KEY, max_body_bytes=LIMIT)) as c:
            return await c.post("/v1/ask", json=payload)

    Ask.seen.clear()
    assert asyncio.run(go({"text": "hi"})).json() == {"text": "hi", "model": "Ask"}
    assert Ask.seen == [False], "validated on the event loop, or twice"
    refused = asyncio.run(go({"text": "bad"}))
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "text"]
    assert Ask.seen == [False, False]
