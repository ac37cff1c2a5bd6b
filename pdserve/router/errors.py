"""HTTP errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the
FastAPI handlers that turn every failure (bad JSON, pydantic errors, backend errors) into one.
Statuses and types come from the failure table (`proto/failures.py`)."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pdserve.engine.sampling_params import InvalidRequestError
from pdserve.proto.failures import RETRY_AFTER_S, TABLE, Failure, failure_of_http
from pdserve.router.backend import BackendFailure

logger = logging.getLogger(__name__)

UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class APIError(Exception):
    """A request that ends with an HTTP error; `param` names the offending request field."""

    def __init__(self, status_code: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param

    @classmethod
    def of(cls, failure: Failure, message: str, param: str | None = None) -> APIError:
        return cls(TABLE[failure].http_status, message, param)

    def body(self) -> dict:
        failure = failure_of_http(self.status_code)
        if TABLE[failure].http_status == self.status_code:
            error_type = TABLE[failure].error_type  # vLLM's names; the openai client reads the status and message
        else:
            error_type = HTTPStatus(self.status_code).phrase.replace(" ", "") + "Error"
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.status_code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status_code == 503 else None
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def as_api_error(exc: BaseException) -> APIError:
    """The HTTP error for any exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError.of(Failure.INVALID_REQUEST, str(exc), exc.param)
    if isinstance(exc, BackendFailure):
        if TABLE[exc.failure].http_status >= 500 and not TABLE[exc.failure].is_retry_later:
            logger.error("request failed: %s: %s", exc.failure.value, exc)
        return APIError.of(exc.failure, str(exc) or "no worker can take the request now")
    logger.error("request failed", exc_info=exc)
    return APIError.of(Failure.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:
    """Pydantic's complaint as a 400 naming the top-level field (FastAPI would answer 422).
    `content_type`: the request's; FastAPI reads a body as JSON only when it says JSON."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON: {detail}")
    path = _field_path(first["loc"])
    if not path and "json" not in content_type.lower():  # curl -d sends a form's type; FastAPI reads it as bytes
        return APIError(
            400,
            f"the request body must be JSON, sent with `Content-Type: application/json` (this one's: {content_type or 'none'})",
        )
    if not path:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', '')}")
    # A union field fails once per alternative (prompt: str | list[int] | ...): list them all.
    messages = dict.fromkeys(_message(e) for e in errors if _field_path(e["loc"]) == path)
    return APIError(400, f"{'.'.join(path)}: {' or '.join(messages)}", path[0])


def _field_path(loc: tuple) -> list[str]:
    """The field's path without "body" and without pydantic's union member tags ("str", "list[int]")."""
    return [str(p) for p in loc[1:] if not (isinstance(p, str) and (p in UNION_TAGS or "[" in p))]


def _message(error: dict) -> str:
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc, request.headers.get("content-type", "")).response()

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()  # unknown routes, wrong methods

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    # Starlette types a handler's exception as Exception, though it passes each handler only its own type
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
    for exc_type in (APIError, InvalidRequestError, BackendFailure, Exception):
        app.add_exception_handler(exc_type, on_error)
