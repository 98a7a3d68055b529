"""ASGI middleware: request ids, the body size limit and bearer-token authentication."""

from __future__ import annotations

import hmac
import json
import logging
import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.errors import error_body

logger = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def send_error(send: Send, status: int, message: str, error_type: str, request_id: str | None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(status, message, error_type, None, request_id)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Give every request an id (the client's X-Request-ID when well-formed) and echo it in the response."""

    def __init__(self, app: ASGIApp, new_id) -> None:
        self.app = app
        self.new_id = new_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if REQUEST_ID_PATTERN.match(supplied) else self.new_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Answer 413 when a request body is larger than ``max_bytes``, by Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, f"request body of {int(length)} bytes exceeds the limit of "
                             f"{self.max_bytes} bytes", "invalid_request_error", request_id)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class BodyTooLarge(HTTPException):
    """Raised while a chunked body streams in; an HTTPException, so the framework answers it as a 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {max_bytes} bytes")


class BearerAuthMiddleware:
    """Require ``Authorization: Bearer <key>`` on every path except the open ones."""

    def __init__(self, app: ASGIApp, keys: set[str], open_paths: set[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), key) for key in self.keys):
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id")
        if not header:
            message = "missing API key: send Authorization: Bearer <key>"
        elif scheme.lower() != b"bearer" or not token.strip():
            message = "malformed Authorization header: it must be Bearer <key>"
        else:
            message = "invalid API key"
        logger.warning("request %s to %s rejected: %s", request_id, scope["path"], message)
        await send_error(send, 401, message, "authentication_error", request_id,
                         headers=[(b"www-authenticate", b"Bearer")])
