"""The synchronous matlora client. ``AsyncMatloraClient``, re-exported here, is its asyncio twin.

Every method maps to one endpoint and returns the server's own pydantic models. Streamed methods return
iterators of events, and the HTTP response stays open until the iterator is exhausted or closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
from typing_extensions import Unpack

from matlora_server.api.openai_schemas import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ModelList
from matlora_server.api.schemas import GenerateResponse, GenerateStreamEvent, HealthResponse, RanksResponse

from .async_client import AsyncMatloraClient
from .base import (CHAT_PATH, COMPLETIONS_PATH, DEFAULT_TIMEOUT_S, DEFAULT_URL, GENERATE_PATH, HEALTH_PATH,
                   MODELS_PATH, RANKS_PATH, GenerationOptions, Model, chat_parts, completion_parts, generate_parts,
                   http_options, parse_event, parse_json, transport_failure)
from .errors import error_from_response
from .retry import RetryPolicy, log_retry
from .sse import iter_payloads

logger = logging.getLogger(__name__)

__all__ = ["MatloraClient", "AsyncMatloraClient"]


class MatloraClient:
    """A blocking client for one matlora server.

    ``timeout`` is in seconds and applies to connecting and to each read, so a streamed response may run longer
    as long as tokens keep arriving. ``retry`` sets how HTTP 429 and connection errors are retried, and
    ``RetryPolicy(max_retries=0)`` turns retries off. Use the client as a context manager, or call ``close()``.
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(**http_options(base_url, api_key, timeout, headers), transport=transport)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MatloraClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- native API --------------------------------------------------------------------------------------

    def generate(self, prompt: str, *, max_new_tokens: int | None = None,
                 **options: Unpack[GenerationOptions]) -> GenerateResponse:
        """Generate text for ``prompt`` with POST /generate."""
        body, headers = generate_parts(prompt, max_new_tokens, False, options)
        return self._post(GENERATE_PATH, body, headers, GenerateResponse)

    def generate_stream(self, prompt: str, *, max_new_tokens: int | None = None,
                        **options: Unpack[GenerationOptions]) -> Iterator[GenerateStreamEvent]:
        """Stream POST /generate: text events, then one event with ``finished`` set, usage and timings."""
        body, headers = generate_parts(prompt, max_new_tokens, True, options)
        return self._stream(GENERATE_PATH, body, headers, GenerateStreamEvent)

    def ranks(self) -> RanksResponse:
        """Return the offered ranks with their measured quality and current latency estimate (GET /v1/ranks)."""
        return self._get(RANKS_PATH, RanksResponse)

    def health(self) -> HealthResponse:
        return self._get(HEALTH_PATH, HealthResponse)

    # --- OpenAI-compatible API ----------------------------------------------------------------------------

    def completions(self, prompt: str, *, model: str | None = None, max_tokens: int | None = None,
                    **options: Unpack[GenerationOptions]) -> CompletionResponse:
        body, headers = completion_parts(prompt, model, max_tokens, False, False, options)
        return self._post(COMPLETIONS_PATH, body, headers, CompletionResponse)

    def completions_stream(self, prompt: str, *, model: str | None = None, max_tokens: int | None = None,
                           include_usage: bool = True,
                           **options: Unpack[GenerationOptions]) -> Iterator[CompletionResponse]:
        """Stream POST /v1/completions. With ``include_usage``, the last chunk has no choices and carries the usage."""
        body, headers = completion_parts(prompt, model, max_tokens, True, include_usage, options)
        return self._stream(COMPLETIONS_PATH, body, headers, CompletionResponse)

    def chat(self, messages: str | Sequence[Mapping[str, Any]], *, model: str | None = None,
             max_tokens: int | None = None, **options: Unpack[GenerationOptions]) -> ChatCompletionResponse:
        """Complete a conversation with POST /v1/chat/completions. A string is sent as one user message."""
        body, headers = chat_parts(messages, model, max_tokens, False, False, options)
        return self._post(CHAT_PATH, body, headers, ChatCompletionResponse)

    def chat_stream(self, messages: str | Sequence[Mapping[str, Any]], *, model: str | None = None,
                    max_tokens: int | None = None, include_usage: bool = True,
                    **options: Unpack[GenerationOptions]) -> Iterator[ChatCompletionChunk]:
        body, headers = chat_parts(messages, model, max_tokens, True, include_usage, options)
        return self._stream(CHAT_PATH, body, headers, ChatCompletionChunk)

    def models(self) -> ModelList:
        return self._get(MODELS_PATH, ModelList)

    # --- transport ---------------------------------------------------------------------------------------

    def _get(self, path: str, model_type: type[Model]) -> Model:
        response = self._send("GET", path, None, {}, stream=False)
        return parse_json(response, model_type, path)

    def _post(self, path: str, body: dict, headers: dict, model_type: type[Model]) -> Model:
        response = self._send("POST", path, body, headers, stream=False)
        return parse_json(response, model_type, path)

    def _stream(self, path: str, body: dict, headers: dict, model_type: type[Model]) -> Iterator[Model]:
        # A generator, so nothing is sent until the caller starts iterating.
        response = self._send("POST", path, body, headers, stream=True)
        try:
            for payload in iter_payloads(response.iter_lines(), path):
                yield parse_event(model_type, payload, path)
        except httpx.TransportError as error:
            raise transport_failure(error, "POST", path) from error
        finally:
            response.close()

    def _send(self, method: str, path: str, body: dict | None, headers: dict, stream: bool) -> httpx.Response:
        """Send one request, retrying as ``self.retry`` allows, and return the first response below status 400."""
        retry = 0
        while True:
            request = self._http.build_request(method, path, json=body, headers=headers)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as error:
                failure: Exception = error
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                failure = error_from_response(response)

            retry += 1
            delay = self.retry.delay(retry, failure)
            if delay is None:
                if isinstance(failure, httpx.TransportError):
                    raise transport_failure(failure, method, path) from failure
                raise failure
            log_retry(method, path, retry, delay, failure)
            time.sleep(delay)

