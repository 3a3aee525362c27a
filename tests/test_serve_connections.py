"""The connection-layer bounds of `longcat serve` (serve/connections.py), against a real server over loopback:
idle and slow request heads are closed, a client that does not read its responses is cut, an oversized head is
refused before it is held, and connections past the bound are closed at once, so /health answers again as soon as
the idle ones time out."""
from __future__ import annotations

import socket
import time

import pytest
import torch

from longcat_flash.checkpoint.fresh import init_checkpoint
from longcat_flash.presets import tiny

from serve_support import running_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model_dir = init_checkpoint(tiny(), tmp_path_factory.mktemp("ckpt") / "tiny", dtype=torch.float32)
    with running_server(model_dir, "--client-timeout", str(CLIENT_TIMEOUT_S),
                        "--max-connections", str(MAX_CONNECTIONS)) as url:
        yield url


def connect(base: str, receive_buffer: int | None = None) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connecting, to take effect
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def seconds_until_closed(sock: socket.socket) -> float:
    """Seconds until the server closes `sock` (recv reads end of stream), sending nothing more."""
    start = time.monotonic()
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def test_a_connection_that_sends_no_request_is_closed(base):
    with connect(base) as sock:
        assert seconds_until_closed(sock) < CLIENT_TIMEOUT_S + 3


def test_a_request_head_trickling_in_is_closed_at_the_deadline(base):
    """Slowloris: a byte now and then must not keep the head's deadline moving."""
    with connect(base) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with pytest.raises(OSError):
            while time.monotonic() - start < CLIENT_TIMEOUT_S + 5:
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
        assert time.monotonic() - start < CLIENT_TIMEOUT_S + 3


def test_a_client_that_does_not_read_its_responses_is_cut(base):
    """Pipelined requests whose answers are never read: once the server cannot write for the timeout, it aborts
    the connection instead of holding it, and its buffers, for good."""
    requests = 2000
    with connect(base, receive_buffer=1024) as sock:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
        time.sleep(CLIENT_TIMEOUT_S + 2)  # the server's writes block, then its deadline passes
        received = b""
        try:
            while chunk := sock.recv(1 << 20):
                received += chunk
        except OSError:  # reset by the abort
            pass
    assert received.count(b"HTTP/1.1 200") < requests
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200


def test_an_oversized_request_head_is_refused_before_it_is_read_whole(base):
    with connect(base) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):  # 4 MiB offered; the server stops at its 64 KiB bound
                sock.sendall(b"a" * 65536)
        except OSError:
            pass
        assert sock.recv(64).startswith(b"HTTP/1.1 400")


def test_connections_past_the_bound_are_closed_and_service_returns(base):
    idle = [connect(base) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=5)
        time.sleep(CLIENT_TIMEOUT_S + 1)  # the idle ones reach their deadline
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_keep_alive_requests_and_streams_still_work(base):
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/health").status_code == 200
        time.sleep(CLIENT_TIMEOUT_S / 2)
        assert client.get("/health").status_code == 200
        body = {"model": "tiny", "prompt": "def f(", "max_tokens": 8, "stream": True, "temperature": 0}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200 and lines[-1] == "data: [DONE]"
