"""The checks a request passes before any of its body is read: the API key, and bounds on its body.

FastAPI reads and parses a body before its route's dependencies run, so an API key checked there would let an
unauthenticated client make the server hold and parse any body it sends. This ASGI middleware answers 401 from the
headers alone, 413 for a declared `Content-Length` over the bound, and stops reading a body (chunked, or longer than
it said) as soon as it passes the bound, or 408 when it has not arrived whole within BODY_TIMEOUT_S or pauses for
BODY_IDLE_S (a stalled upload held its share of the bound below for the whole minute). Parsing a JSON
body costs ~25x its size in memory for a moment, so the bodies being read and parsed, together, stay under
`max_body_bytes * BODIES_IN_FLIGHT` (503 beyond); `JSONOffLoopRoute` parses and validates them off the event
loop and hands a body's share back once it is parsed, so the bound never limits how many requests generate at once.
"""
from __future__ import annotations

import asyncio
import email.message
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from .. import json_text
from .responses import ErrorBody, ErrorResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# The API, as vLLM guards it: the tokenizer routes (which run no model) stay open with /health, /metrics and
# /openapi.json, as there: lm_eval's remote tokenizer asks /tokenizer_info without the key it sends to /v1/
PROTECTED = "/v1/"


RELEASE_BODY = "longcat.release_body"  # in scope["state"]: hands a parsed body's share of the bound back
BODY_TIMEOUT_S = 60.0  # from the request head to the body's last byte
BODY_IDLE_S = 10.0  # the longest a body may pause between two of its pieces: a stalled upload gives its share back
BODIES_IN_FLIGHT = 4  # the bodies being read and parsed at once, together, in units of max_body_bytes
OPEN_BODIES_IN_FLIGHT = 1  # the same for the requests without the key (when the server has one), counted apart
API_KEY = re.compile(r"[!-~]+")  # visible ASCII: what a client can send as a bearer token, and match


def check_api_key(key: str | None) -> None:
    """An empty key let in a client sending `Bearer ` and nothing more; a non-ASCII one (or one with spaces at its
    ends) could never be sent and matched, so no client could get in."""
    if key is not None and not API_KEY.fullmatch(key):
        raise ValueError("--api-key: " + ("empty" if not key else "an API key is visible ASCII characters with no "
                                          "spaces (what a client can send as a bearer token)"))  # not echoed: a secret


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body passes the bound mid-stream: an HTTP error, which FastAPI lets through
    its body reading to the app's error handler (a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes, the most this server takes")


def error(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=ErrorBody(message=message, type=type_, code=code)).model_dump(),
                        status_code=status, headers=headers)


class RequestGuard:
    """Pure ASGI middleware: the API key (when the server has one) on every /v1/ path, and `max_body_bytes`. The
    bodies of requests without the key (to the open tokenizer routes) are bounded apart, so that they can never
    keep the key's holders out."""

    def __init__(self, app: Callable, *, api_key: str | None, max_body_bytes: int,
                 body_timeout_s: float = BODY_TIMEOUT_S, body_idle_s: float = BODY_IDLE_S) -> None:
        check_api_key(api_key)
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.body_timeout_s, self.body_idle_s = body_timeout_s, body_idle_s
        self.in_flight = {True: 0, False: 0}  # bytes of the bodies being read and parsed, by whether keyed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        keyed = self.api_key is None or self._has_key(headers)
        if not keyed and scope["path"].startswith(PROTECTED):
            await error(401, "invalid or missing API key", "authentication_error", "invalid_api_key",
                        {"WWW-Authenticate": "Bearer"})(scope, receive, send)  # RFC 7235: the scheme to use
            return
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):  # a gzip body read as JSON was "not valid UTF-8"; a plain one passed
            await error(415, f"Content-Encoding {coding!r} is not supported: send the body uncompressed",
                        "invalid_request_error", "unsupported_content_encoding")(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            await error(413, f"request body of {declared} bytes; this server takes at most {self.max_body_bytes}",
                        "invalid_request_error", "request_too_large")(scope, receive, send)
            return
        held = [0]  # this request's body bytes, counted in self.in_flight[keyed] until it is parsed (or ends)

        def release() -> None:
            self.in_flight[keyed] -= held[0]
            held[0] = 0

        scope.setdefault("state", {})[RELEASE_BODY] = release
        try:
            await self.app(scope, self._bounded(receive, held, keyed), send)
        finally:
            release()

    def _has_key(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode())

    def _bounded(self, receive: Receive, held: list[int], keyed: bool) -> Receive:
        deadline = time.monotonic() + self.body_timeout_s
        whole = False

        async def bounded() -> Message:
            nonlocal whole
            if whole:  # after the body: waiting for a disconnect, which takes as long as the response does
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(left, self.body_idle_s)))
            except asyncio.TimeoutError:
                why = (f"not received whole within {self.body_timeout_s:g} s" if left <= self.body_idle_s else
                       f"stalled: no byte of it for {self.body_idle_s:g} s")
                raise HTTPException(408, f"request body {why}") from None
            if message["type"] == "http.request":
                size, whole = len(message.get("body", b"")), not message.get("more_body", False)
                if held[0] + size > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                if self.in_flight[keyed] + size > self.max_body_bytes * (BODIES_IN_FLIGHT if keyed else
                                                                         OPEN_BODIES_IN_FLIGHT):
                    raise HTTPException(503, "server busy: too many large request bodies being read; retry",
                                        headers={"Retry-After": "1"})
                held[0] += size
                self.in_flight[keyed] += size
            return message
        return bounded


class JSONOffLoopRequest(Request):
    """A request whose JSON body is parsed in a worker thread: json.loads of a body of megabytes takes seconds,
    which on the event loop would stall /health and every stream."""

    async def body(self) -> bytes:
        try:
            return await super().body()
        except ClientDisconnect:  # FastAPI answers it "There was an error parsing the body", a 400 that blames the
            raise HTTPException(499, "the client closed the connection before its request body was whole"
                                ) from None  # input; it is nginx's 499 (/metrics counts it; nobody reads it)

    async def json(self) -> Any:
        if hasattr(self, "_json_error"):  # a body that is not JSON: parsed once, however often it is asked for
            raise self._json_error
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = await asyncio.to_thread(parse_json, body)
            except json.JSONDecodeError as err:
                self._json_error = err
                raise
            self.scope.get("state", {}).get(RELEASE_BODY, lambda: None)()  # parsed: its share of the bound
        return self._json


def parse_json(body: bytes) -> Any:
    """json.loads, whose every refusal is a JSONDecodeError: FastAPI reports that one as malformed JSON (our 400
    naming the reason) and any other exception as a bare "There was an error parsing the body"."""
    return json_text.loads(body)


class JSONOffLoopRoute(APIRoute):
    """FastAPI's route, with its handler given a `JSONOffLoopRequest`, and a JSON body validated as the route's body
    model in a worker thread too: FastAPI validates on the event loop, where an 8 MB body (250,000 content parts,
    or 128 deeply nested tool schemas) took seconds and stalled /health and every stream. FastAPI then reads the
    validated model through `request.json()` and does not validate its fields again (only the model's own cheap
    after-validators run once more); errors are raised as FastAPI's own, so the same 400 names the same field."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        model = model if isinstance(model, type) and issubclass(model, BaseModel) else None

        async def off_loop(request: Request) -> Response:
            request = JSONOffLoopRequest(request.scope, request.receive)
            if model is not None:
                await _validate_off_loop(request, model)
            return await handler(request)
        return off_loop


async def _validate_off_loop(request: JSONOffLoopRequest, model: type[BaseModel]) -> None:
    """The request's body validated as `model` in a worker thread and kept for FastAPI. A body FastAPI would not
    read as JSON (no JSON content type, none at all, or an empty body) or that is not JSON is left to FastAPI, whose
    refusals of those cost nothing and say why."""
    content_type = email.message.Message()
    content_type["content-type"] = request.headers.get("content-type", "")
    subtype = content_type.get_content_subtype()
    if content_type.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        return
    if not await request.body():
        return
    try:
        data = await request.json()
    except json.JSONDecodeError:
        return
    try:
        request._json = await asyncio.to_thread(model.model_validate, data)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]
                                     ) from None
