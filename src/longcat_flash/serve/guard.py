"""The checks a request passes before any of its body is read: the API key, and a bound on the body's size.

FastAPI reads and parses a body before its route's dependencies run, so an API key checked there would let an
unauthenticated client make the server hold and parse any body it sends. This ASGI middleware answers 401 from the
headers alone, 413 for a declared `Content-Length` over the bound, and stops reading a body (chunked, or longer than
it said) as soon as it passes the bound.
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from .protocol import ErrorBody, ErrorResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PROTECTED = "/v1/"  # the API; /health, /metrics and /openapi.json stay open to probes


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body passes the bound mid-stream: an HTTP error, which FastAPI lets through
    its body reading to the app's error handler (a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes, the most this server takes")


def error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=ErrorBody(message=message, type=type_, code=code)).model_dump(),
                        status_code=status)


class RequestGuard:
    """Pure ASGI middleware: the API key (when the server has one) on every /v1/ path, and `max_body_bytes`."""

    def __init__(self, app: Callable, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith(PROTECTED):
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                await error(401, "invalid or missing API key", "authentication_error", "invalid_api_key")(
                    scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            await error(413, f"request body of {declared} bytes; this server takes at most {self.max_body_bytes}",
                        "invalid_request_error", "request_too_large")(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive: Receive) -> Receive:
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message
        return bounded
