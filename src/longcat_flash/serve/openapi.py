"""/openapi.json that tells the truth about errors: the statuses each route really returns, in the OpenAI shape.

FastAPI alone would declare a 422 validation error on every route with a body, which this server never sends (bad
input is a 400, serve/app.py), and none of the 400 / 401 / 429 / 503 it does send. tests/test_serve_app.py checks
every status it sees against this table.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .responses import ErrorResponse

ERRORS = {
    400: "bad input: malformed JSON, a field out of range, prompt or max_tokens beyond the context",
    401: "wrong or missing API key (only when the server has one)",
    404: "the model asked for is not the one served",
    413: "the request body is larger than the server takes (--max-request-mb)",
    415: "the request body is compressed (Content-Encoding): send it uncompressed",
    429: "the wait queue is full; retry later",
    499: "the client closed the connection before its answer (nginx's status: /metrics counts it; nobody reads it)",
    500: "the engine failed while generating this request",
    503: "the engine is down",
}
_GENERATION = (400, 401, 404, 413, 415, 429, 499, 500, 503)
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {  # path -> statuses besides 200
    "/health": (503,),
    "/metrics": (),
    "/openapi.json": (),
    "/v1/models": (401,),
    "/v1/models/{model_id}": (401, 404),
    "/v1/completions": _GENERATION,
    "/v1/chat/completions": _GENERATION,
    "/tokenize": (400, 404, 413, 415, 503),  # open, as vLLM's (no 401); a busy bound on bodies without the key
    "/detokenize": (400, 404, 413, 415, 503),
    "/tokenizer_info": (),
}
DESCRIPTION = ("OpenAI-compatible text generation (docs/serving.md). Any path not listed here answers 404, and a "
               "listed path asked with another method 405, both with the same error body as every other error.")
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_FASTAPI_422_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    """Replace the app's schema builder; the schema is built once, on the first request for it."""
    app.openapi = _builder(app)


def _builder(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
            _add_error_schema(schema.setdefault("components", {}).setdefault("schemas", {}))
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    _declare_errors(operation["responses"], ROUTE_ERRORS.get(path, ()))
            app.openapi_schema = schema
        return app.openapi_schema
    return build


def _add_error_schema(schemas: dict[str, Any]) -> None:
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error.pop("$defs", {}))
    schemas["ErrorResponse"] = error
    for name in _FASTAPI_422_SCHEMAS:
        schemas.pop(name, None)


def _declare_errors(responses: dict[str, Any], statuses: tuple[int, ...]) -> None:
    responses.pop("422", None)
    for status in statuses:
        responses[str(status)] = {"description": ERRORS[status],
                                  "content": {"application/json": {"schema": _ERROR_REF}}}
