"""HTTP errors: one JSON shape for all of them, naming the field, the value and what is allowed.

Every error body is ``{"error": {"message", "type", "param", "code", "request_id"}}`` and never carries a stack
trace. Unexpected exceptions answer 500 with the request id, which the log line of the failure repeats.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with ``status``; ``param`` names the request field at fault, if any."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, error_type: str, param: str | None, request_id: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status,
                      "request_id": request_id}}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Location parts that pydantic adds for the member of a union that failed, such as "str" and "list[str]" in
# ("body", "stop", "list[str]", 0). They are types, not field names, so the field path leaves them out.
UNION_MEMBER_TAGS = {"str", "int", "float", "bool"}


def field_path(location: tuple) -> str | None:
    """Return the dotted request field of a pydantic error location, such as "messages.0.content"."""
    parts = list(location[1:] if location[:1] == ("body",) else location)
    names = [str(part) for part in parts
             if not (isinstance(part, str) and (part in UNION_MEMBER_TAGS or "[" in part))]
    return ".".join(names) or None


def describe_validation_error(error: dict) -> tuple[str, str | None]:
    """Return a message like "rank: Input should be ... (got 'x')" and the field path of one pydantic error."""
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    if isinstance(error.get("input"), bytes) and not field_path(tuple(error.get("loc", ()))):
        return "the request body must be a JSON object sent with Content-Type: application/json", None
    param = field_path(tuple(error.get("loc", ())))
    message = error.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if error.get("type") == "extra_forbidden":
        message = "unknown field; remove it (see /docs for the accepted fields)"
    elif error.get("type") == "missing":
        message = "field required"
    if "input" in error and error.get("type") not in ("missing", "json_invalid") and not isinstance(
            error["input"], dict):
        message = f"{message} (got {_shown(error['input'])})"
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        request_id = request_id_of(request)
        if error.status >= 500:
            logger.error("request %s failed with %d: %s", request_id, error.status, error.message)
        return JSONResponse(error_body(error.status, error.message, error.error_type, error.param, request_id),
                            status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [describe_validation_error(e) for e in error.errors()]
        # A union field fails once per member type, often with the same text; each distinct message is kept once.
        message = "; ".join(dict.fromkeys(text for text, _ in problems)) or "invalid request body"
        param = problems[0][1] if problems else None
        return JSONResponse(error_body(422, message, "invalid_request_error", param, request_id_of(request)),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = str(error.detail)
        if isinstance(error.__cause__, UnicodeDecodeError):
            # FastAPI (0.165) rejects a body that fails to decode with a bare "There was an error parsing the body".
            message = f"the request body is not valid UTF-8 ({error.__cause__}); send JSON encoded as UTF-8"
        elif isinstance(error.__cause__, RecursionError):
            # json.loads raises RecursionError on deeply nested arrays or objects, and FastAPI turns it into the
            # same bare 400. This returns the 422 of any other body that is not valid JSON instead.
            message = "the request body could not be parsed as JSON: it is nested too deeply"
            return JSONResponse(error_body(422, message, "invalid_request_error", None, request_id_of(request)),
                                status_code=422)
        return JSONResponse(error_body(error.status_code, message, error_type, None, request_id_of(request)),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.exception("request %s failed: %s", request_id, type(error).__name__)
        return JSONResponse(error_body(500, f"internal server error (request id {request_id})", "server_error", None,
                                       request_id), status_code=500)
