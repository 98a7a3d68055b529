"""The asyncio matlora client: the same methods as ``MatloraClient``, awaited, with async iterators for streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from typing_extensions import Unpack

from matlora_server.api.openai_schemas import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ModelList
from matlora_server.api.schemas import GenerateResponse, GenerateStreamEvent, HealthResponse, RanksResponse

from .base import (CHAT_PATH, COMPLETIONS_PATH, DEFAULT_TIMEOUT_S, DEFAULT_URL, GENERATE_PATH, HEALTH_PATH,
                   MODELS_PATH, RANKS_PATH, GenerationOptions, Model, chat_parts, completion_parts, generate_parts,
                   http_options, parse_event, parse_json, transport_failure)
from .errors import error_from_response
from .retry import RetryPolicy, log_retry
from .sse import aiter_payloads

logger = logging.getLogger(__name__)


class AsyncMatloraClient:
    """A non-blocking client for one matlora server, with the options of ``MatloraClient``.

    Streamed methods are async generators. Close one that is left before its end with ``contextlib.aclosing``
    (or ``await stream.aclose()``), so that its HTTP response is released at once.
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 headers: Mapping[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None) -> None:
        self.retry = retry or RetryPolicy()
        options = http_options(base_url, api_key, timeout, headers)
        if limits is not None:
            options["limits"] = limits  # else httpx's default pool: 100 connections
        self._http = httpx.AsyncClient(**options, transport=transport)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMatloraClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    # --- native API --------------------------------------------------------------------------------------

    async def generate(self, prompt: str, *, max_new_tokens: int | None = None,
                       **options: Unpack[GenerationOptions]) -> GenerateResponse:
        body, headers = generate_parts(prompt, max_new_tokens, False, options)
        return await self._post(GENERATE_PATH, body, headers, GenerateResponse)

    async def generate_stream(self, prompt: str, *, max_new_tokens: int | None = None,
                              **options: Unpack[GenerationOptions]) -> AsyncIterator[GenerateStreamEvent]:
        body, headers = generate_parts(prompt, max_new_tokens, True, options)
        async for event in self._stream(GENERATE_PATH, body, headers, GenerateStreamEvent):
            yield event

    async def ranks(self) -> RanksResponse:
        return await self._get(RANKS_PATH, RanksResponse)

    async def health(self) -> HealthResponse:
        return await self._get(HEALTH_PATH, HealthResponse)

    # --- OpenAI-compatible API ----------------------------------------------------------------------------

    async def completions(self, prompt: str, *, model: str | None = None, max_tokens: int | None = None,
                          **options: Unpack[GenerationOptions]) -> CompletionResponse:
        body, headers = completion_parts(prompt, model, max_tokens, False, False, options)
        return await self._post(COMPLETIONS_PATH, body, headers, CompletionResponse)

    async def completions_stream(self, prompt: str, *, model: str | None = None, max_tokens: int | None = None,
                                 include_usage: bool = True,
                                 **options: Unpack[GenerationOptions]) -> AsyncIterator[CompletionResponse]:
        body, headers = completion_parts(prompt, model, max_tokens, True, include_usage, options)
        async for chunk in self._stream(COMPLETIONS_PATH, body, headers, CompletionResponse):
            yield chunk

    async def chat(self, messages: str | Sequence[Mapping[str, Any]], *, model: str | None = None,
                   max_tokens: int | None = None, **options: Unpack[GenerationOptions]) -> ChatCompletionResponse:
        body, headers = chat_parts(messages, model, max_tokens, False, False, options)
        return await self._post(CHAT_PATH, body, headers, ChatCompletionResponse)

    async def chat_stream(self, messages: str | Sequence[Mapping[str, Any]], *, model: str | None = None,
                          max_tokens: int | None = None, include_usage: bool = True,
                          **options: Unpack[GenerationOptions]) -> AsyncIterator[ChatCompletionChunk]:
        body, headers = chat_parts(messages, model, max_tokens, True, include_usage, options)
        async for chunk in self._stream(CHAT_PATH, body, headers, ChatCompletionChunk):
            yield chunk

    async def models(self) -> ModelList:
        return await self._get(MODELS_PATH, ModelList)

    # --- transport ---------------------------------------------------------------------------------------

    async def _get(self, path: str, model_type: type[Model]) -> Model:
        response = await self._send("GET", path, None, {}, stream=False)
        return parse_json(response, model_type, path)

    async def _post(self, path: str, body: dict, headers: dict, model_type: type[Model]) -> Model:
        response = await self._send("POST", path, body, headers, stream=False)
        return parse_json(response, model_type, path)

    async def _stream(self, path: str, body: dict, headers: dict, model_type: type[Model]) -> AsyncIterator[Model]:
        response = await self._send("POST", path, body, headers, stream=True)
        try:
            async for payload in aiter_payloads(response.aiter_lines(), path):
                yield parse_event(model_type, payload, path)
        except httpx.TransportError as error:
            raise transport_failure(error, "POST", path) from error
        finally:
            await response.aclose()

    async def _send(self, method: str, path: str, body: dict | None, headers: dict,
                    stream: bool) -> httpx.Response:
        """Send one request, retrying as ``self.retry`` allows, and return the first response below status 400."""
        retry = 0
        while True:
            request = self._http.build_request(method, path, json=body, headers=headers)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as error:
                failure: Exception = error
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                failure = error_from_response(response)

            retry += 1
            delay = self.retry.delay(retry, failure)
            if delay is None:
                if isinstance(failure, httpx.TransportError):
                    raise transport_failure(failure, method, path) from failure
                raise failure
            log_retry(method, path, retry, delay, failure)
            await asyncio.sleep(delay)
