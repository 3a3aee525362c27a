"""The one error type route handlers raise: it leaves as an OpenAI-shaped JSON body with its HTTP status."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from . import responses as resp


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, resp.ErrorBody(message=message, type=type_, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(resp.ErrorResponse(error=self.body).model_dump(), status_code=self.status,
                            headers=self.headers)


def check_model(asked: str | None, served: str) -> None:
    """A 404 for a model name that is not the served one (none asks for the served one)."""
    if asked is not None and asked != served:
        raise APIError(404, f"model {asked!r} is not served here; use {served!r}", param="model",
                       code="model_not_found")
