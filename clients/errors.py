"""Exceptions raised by the matlora clients.

Every HTTP error the server returns becomes a ``MatloraAPIError`` (or a subclass chosen by status) that carries
the server's ``{"error": {...}}`` fields. Failures below HTTP become ``MatloraConnectionError`` or
``MatloraTimeoutError``.
"""

from __future__ import annotations

import json
import logging
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class MatloraError(Exception):
    """Base class of every exception this package raises."""


class MatloraConnectionError(MatloraError):
    """The server could not be reached, or it closed the connection before sending a response."""


class MatloraTimeoutError(MatloraError):
    """A connect, read or write timed out (the client's ``timeout``)."""


class MatloraResponseError(MatloraError):
    """A successful HTTP response whose body does not match the expected schema."""


class MatloraAPIError(MatloraError):
    """An HTTP error from the server.

    ``message``, ``error_type``, ``param`` and ``request_id`` are the fields of the server's error body.
    ``retry_after`` is the Retry-After header in seconds, when the server sent one.
    """

    def __init__(self, status: int, message: str, error_type: str | None = None, param: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"HTTP {self.status}: {self.message}"
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text


class InvalidRequestError(MatloraAPIError):
    """HTTP 400, 413 or 422: an invalid request field, named by ``param``."""


class AuthenticationError(MatloraAPIError):
    """HTTP 401: the API key is missing or invalid."""


class NotFoundError(MatloraAPIError):
    """HTTP 404: an unknown path or model."""


class RateLimitError(MatloraAPIError):
    """HTTP 429: the server's waiting queue is full."""


class ServerError(MatloraAPIError):
    """HTTP 5xx: the request failed, timed out on the server, or the server is shutting down."""


def error_class(status: int) -> type[MatloraAPIError]:
    if status in (400, 413, 422):
        return InvalidRequestError
    if status == 401:
        return AuthenticationError
    if status == 404:
        return NotFoundError
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ServerError
    return MatloraAPIError


def error_from_body(status: int, body: Any, retry_after: float | None = None,
                    fallback_message: str = "") -> MatloraAPIError:
    """Build the exception for an error body of the form ``{"error": {...}}``.

    A body of another form (a proxy's HTML page, say) keeps ``fallback_message`` as the message.
    """
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        message = fallback_message.strip()[:500] or f"HTTP {status} with no error message"
        return error_class(status)(status, message, retry_after=retry_after)
    return error_class(status)(
        status, str(detail.get("message") or f"HTTP {status}"), error_type=detail.get("type"),
        param=detail.get("param"), request_id=detail.get("request_id"), retry_after=retry_after,
    )


def error_from_response(response: httpx.Response) -> MatloraAPIError:
    """Build the exception for an HTTP error response whose body has been read."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    error = error_from_body(response.status_code, body, parse_retry_after(response.headers.get("retry-after")),
                            fallback_message=response.text)
    if error.request_id is None:
        error.request_id = response.headers.get("x-request-id")
    return error


def parse_retry_after(value: str | None) -> float | None:
    """Return the Retry-After header (delay-seconds or an HTTP date) in seconds, or None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        logger.warning("ignoring invalid Retry-After header %r", value)
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())
