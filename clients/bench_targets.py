"""The servers ``matlora-bench`` can drive, each sending one streamed request and timing it.

Times are taken on the client: TTFT from sending the request to the first chunk with text, e2e to the end of
the stream, and TPOT as (e2e - TTFT) / (output tokens - 1). Output tokens come from the server's usage figures.
For a server that reports none, the text chunks are counted instead, which undercounts when a chunk has several
tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from matlora_server.api.schemas import RanksResponse

from .async_client import AsyncMatloraClient
from .base import USER_AGENT, parse_json
from .bench_workload import WorkItem
from .errors import MatloraAPIError, MatloraError, NotFoundError, error_from_response
from .retry import RetryPolicy
from .sse import aiter_payloads

logger = logging.getLogger(__name__)

# The load generator must not queue requests inside its own connection pool, so the pool has no limit.
UNLIMITED_POOL = httpx.Limits(max_connections=None, max_keepalive_connections=1000)


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are in seconds, and ``start_s`` counts from the start of the run."""

    index: int
    requested_rank: int | None
    rank: int | None = None        # the rank the server reports having served, when it reports one
    ok: bool = False
    status: int | None = None      # HTTP status of a failed request, None for connection errors
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0

    def finish(self, started: float, first_token_at: float | None, tokens: int) -> None:
        self.ok = True
        self.e2e_s = time.perf_counter() - started
        self.output_tokens = tokens
        if first_token_at is not None:
            self.ttft_s = first_token_at - started
            if tokens > 1:
                self.tpot_s = (self.e2e_s - self.ttft_s) / (tokens - 1)

    def fail(self, error: Exception) -> None:
        self.ok = False
        self.status = error.status if isinstance(error, MatloraAPIError) else None
        self.error = str(error) or type(error).__name__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MatloraTarget:
    """A matlora server driven through streamed POST /generate, with retries off so a 429 counts as an error."""

    is_matlora = True

    def __init__(self, url: str, api_key: str | None, timeout: float, max_tokens: int, ignore_eos: bool) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.client = AsyncMatloraClient(url, api_key=api_key, timeout=timeout, retry=RetryPolicy(max_retries=0),
                                         limits=UNLIMITED_POOL)

    def describe(self) -> str:
        return f"matlora at {self.url} (POST /generate)"

    async def ranks(self) -> RanksResponse:
        try:
            return await self.client.ranks()
        except NotFoundError:
            raise ValueError(f"{self.url}/v1/ranks was not found, so {self.url} is not a matlora server. Drive "
                             "other servers with --openai-base-url") from None

    async def send(self, item: WorkItem, record: RequestRecord) -> None:
        started = time.perf_counter()
        first_token_at, tokens = None, 0
        try:
            async for event in self.client.generate_stream(item.prompt, max_new_tokens=self.max_tokens,
                                                           rank=item.rank, latency_budget_ms=item.latency_budget_ms,
                                                           ignore_eos=self.ignore_eos or None):
                if event.text and first_token_at is None:
                    first_token_at = time.perf_counter()
                record.rank = event.rank
                if event.usage is not None:
                    tokens = event.usage.completion_tokens
        except MatloraError as error:
            record.fail(error)
            return
        record.finish(started, first_token_at, tokens)

    async def aclose(self) -> None:
        await self.client.aclose()


class OpenAITarget:
    """Any OpenAI-compatible server driven through streamed POST {base}/completions.

    ``base_url`` includes the API prefix, as with the openai package (``http://127.0.0.1:8000/v1``). Rank and
    latency budget, and ``ignore_eos`` when asked for, are sent as extra body fields only to a matlora server,
    recognised by the ``offered_ranks`` field in its /models list. Other servers may reject unknown fields
    (``transformers serve`` responds with HTTP 422).
    """

    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_tokens: int,
                 model: str | None, ignore_eos: bool) -> None:
        headers = {"User-Agent": USER_AGENT, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout),
                                      limits=UNLIMITED_POOL)
        self.max_tokens = max_tokens
        self.model = model
        self.ignore_eos = ignore_eos
        self.is_matlora = False

    def describe(self) -> str:
        kind = "matlora" if self.is_matlora else "OpenAI-compatible server"
        return f"{kind} at {self.base_url} (POST /completions, model {self.model})"

    async def connect(self) -> None:
        """Read /models: pick the model when none was given, and find out whether the server is matlora."""
        response = await self.http.get("/models")
        if response.status_code >= 400:
            raise error_from_response(response)
        cards = response.json().get("data") or []
        self.is_matlora = any(card.get("offered_ranks") for card in cards)
        if self.model is None:
            if not cards:
                raise ValueError(f"{self.base_url}/models lists no model, so pass --model")
            self.model = cards[-1]["id"] if self.is_matlora else cards[0]["id"]

    async def ranks(self) -> RanksResponse | None:
        if not self.is_matlora:
            return None
        response = await self.http.get("/ranks")
        if response.status_code >= 400:
            raise error_from_response(response)
        return parse_json(response, RanksResponse, "/ranks")

    def body(self, item: WorkItem) -> dict[str, Any]:
        body = {"model": self.model, "prompt": item.prompt, "max_tokens": self.max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.is_matlora:
            extra = {"rank": item.rank, "latency_budget_ms": item.latency_budget_ms,
                     "ignore_eos": self.ignore_eos or None}
            body.update({key: value for key, value in extra.items() if value is not None})
        return body

    async def send(self, item: WorkItem, record: RequestRecord) -> None:
        started = time.perf_counter()
        first_token_at, chunks, usage_tokens = None, 0, None
        try:
            async with self.http.stream("POST", "/completions", json=self.body(item)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_from_response(response)
                async for payload in aiter_payloads(response.aiter_lines(), "/completions"):
                    text = "".join(choice.get("text") or "" for choice in payload.get("choices") or [])
                    if text:
                        chunks += 1
                        first_token_at = first_token_at or time.perf_counter()
                    record.rank = payload.get("rank", record.rank)
                    usage = payload.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = usage["completion_tokens"]
        except (MatloraError, httpx.HTTPError) as error:
            record.fail(error)
            return
        record.finish(started, first_token_at, usage_tokens if usage_tokens is not None else chunks)

    async def aclose(self) -> None:
        await self.http.aclose()
