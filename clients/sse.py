"""Server-sent events: lines in, decoded JSON payloads out.

Both matlora and OpenAI-compatible servers send one JSON object per event in ``data:`` lines and end the stream
with ``data: [DONE]``. An event whose object has an ``error`` key is an error that happened after the response
started, and it is raised as the matching ``MatloraAPIError``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from .errors import MatloraResponseError, error_from_body

logger = logging.getLogger(__name__)

DONE = "[DONE]"


class SSEDecoder:
    """Collects the ``data:`` lines of one event until the blank line that ends it."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line without its newline, and return the event's data when the line ends an event."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # a comment, sent as a keep-alive by some servers
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def decode_payload(data: str, path: str) -> dict:
    """Parse one event's data, and raise the server's error if the event carries one."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as error:
        raise MatloraResponseError(f"{path}: invalid JSON in a streamed event: {error.msg} "
                                   f"(data {data[:200]!r})") from None
    if not isinstance(payload, dict):
        raise MatloraResponseError(f"{path}: a streamed event must be a JSON object, got {data[:200]!r}")
    if "error" in payload:
        detail = payload["error"]
        status = detail.get("code") if isinstance(detail, dict) else None
        raise error_from_body(status if isinstance(status, int) else 500, payload, fallback_message=data)
    return payload


def iter_payloads(lines: Iterable[str], path: str) -> Iterator[dict]:
    """Yield each event's JSON object until ``[DONE]`` or the end of the stream."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is None:
            continue
        if data == DONE:
            return
        yield decode_payload(data, path)
    data = decoder.flush()
    if data is not None and data != DONE:
        yield decode_payload(data, path)


async def aiter_payloads(lines: AsyncIterable[str], path: str) -> AsyncIterator[dict]:
    """Yield each event's JSON object until ``[DONE]`` or the end of the stream."""
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is None:
            continue
        if data == DONE:
            return
        yield decode_payload(data, path)
    data = decoder.flush()
    if data is not None and data != DONE:
        yield decode_payload(data, path)
