"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from nanovllm.async_llm import EngineDeadError, QueueFullError
from nanovllm.serve.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error a handler answers with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param


def error_response(error: APIError) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=error.message, type=error.type, param=error.param,
                                         code=error.status))
    return JSONResponse(body.model_dump(), status_code=error.status)


def bad_request(error: Exception) -> APIError:
    """A ValueError/TypeError from validating a request (sampling values, prompt length) as a 400."""
    return APIError(400, str(error))


def _where(error: dict) -> str:
    """The field an error is about, e.g. `messages.0.content`; '' for the body as a whole."""
    if error["type"] == "json_invalid":  # its loc is a character position
        return ""
    return ".".join(str(part) for part in error.get("loc", ()) if part != "body")


def validation_error(error: RequestValidationError) -> APIError:
    """pydantic's complaints (bad JSON, wrong types, unknown fields) as a 400, not FastAPI's 422."""
    errors = error.errors()
    message = "; ".join(f"{_where(e) or 'body'}: {e['msg']}" for e in errors)
    return APIError(400, message, param=_where(errors[0]) or None)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error))

    async def on_unavailable(_: Request, error: QueueFullError | EngineDeadError) -> JSONResponse:
        return error_response(APIError(503, str(error), "service_unavailable"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(QueueFullError, on_unavailable)
    app.add_exception_handler(EngineDeadError, on_unavailable)
