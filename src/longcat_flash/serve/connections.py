"""Bounds at the HTTP connection layer: what a client can hold by the way it uses its connection.

uvicorn's default parser (httptools) reads a request head of any size (one 256 MiB header grew the server by
500 MB and stalled it for a minute, before the API key was looked at); a connection that never completes a
request head stays open for ever (idle or slowloris sockets used up the server's file descriptors, and then
/health went unanswered); and so does one that never reads what it is sent (pipelined requests whose answers
are never read held their connections, and 1.6 MB of kernel buffers each, for good). `bounded_protocol` is
uvicorn's h11 protocol with four bounds:
  * a request head of at most MAX_HEAD_BYTES while it arrives (h11 answers 400 beyond it; a head that lands whole
    in one socket read, at most 256 KiB, is parsed before h11 looks at its size);
  * a request head must arrive whole within `client_timeout_s` of the connection's start or of the previous
    response's end, however slowly its bytes trickle in; otherwise the connection is closed;
  * a response the client stops reading (the socket's send buffer full) for `client_timeout_s` is cut: the
    connection is aborted, and the request cancelled as on any disconnect;
  * at most `max_connections` open at once: a connection beyond it is closed as soon as it is accepted.
"""
from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 64 * 1024  # request line + headers
CLIENT_TIMEOUT_S = 15.0


def default_max_connections() -> int:
    """Half the process's file-descriptor limit (the rest: the model's files, pipes, logs), at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft // 2)) if soft != resource.RLIM_INFINITY else 4096


def bounded_protocol(*, client_timeout_s: float = CLIENT_TIMEOUT_S, max_connections: int | None = None) -> type:
    """An h11 protocol class for uvicorn's `http=` with the module docstring's bounds."""
    limit = default_max_connections() if max_connections is None else max_connections

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            self.head_timer: asyncio.TimerHandle | None = None
            self.write_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            if len(self.connections) > limit:
                transport.close()
                return
            self.arm_head_timer()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived whole
                self.disarm_head_timer()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request started
                self.arm_head_timer()

        def pause_writing(self) -> None:  # the client is not reading what it is sent
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(client_timeout_s, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_head_timer()
            if self.write_timer is not None:
                self.write_timer.cancel()
            super().connection_lost(exc)

        def arm_head_timer(self) -> None:
            self.disarm_head_timer()
            self.head_timer = self.loop.call_later(client_timeout_s, self.transport.close)

        def disarm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

    return BoundedH11Protocol


@contextlib.contextmanager
def listening_socket(host: str, port: int) -> Iterator[socket.socket]:
    """A TCP socket bound to host:port (port 0: one the OS picks), for uvicorn's `Server.run(sockets=...)`: bound by
    the caller before anything slow, so that a taken port is a one-line error at once and the start-up banner
    names the port that is really listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        try:
            sock.bind((host, port))
        except (OSError, OverflowError) as err:
            raise ValueError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
        sock.listen(2048)  # uvicorn's default backlog
        sock.set_inheritable(True)
        yield sock
    finally:
        sock.close()


def uvicorn_options(*, client_timeout_s: float = CLIENT_TIMEOUT_S, max_connections: int | None = None
                    ) -> dict[str, Any]:
    """The keyword arguments of `uvicorn.run` that set these bounds."""
    return {"http": bounded_protocol(client_timeout_s=client_timeout_s, max_connections=max_connections),
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES}
