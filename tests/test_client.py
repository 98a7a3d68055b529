"""The client library, sync and async, against a live tiny server, and its retries and stream errors against a stub."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing, contextmanager
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from matlora_client import (AsyncMatloraClient, AuthenticationError, InvalidRequestError, MatloraClient,
                            MatloraConnectionError, NotFoundError, RateLimitError, RetryPolicy, ServerError)
from matlora_client.errors import parse_retry_after
from matlora_client.sse import SSEDecoder
from matlora_server.api.schemas import GenerateResponse, HealthResponse

from .live_server import free_port, live_server, tiny_settings

API_KEY = "test-key"
PROMPT = "Question: Tom has 3 apples"
OFFERED = [0, 1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def server():
    settings = tiny_settings(api_keys=[API_KEY], profile_steps=1, profile_batch_sizes=[1])
    with live_server(settings) as running:
        yield running


@pytest.fixture()
def client(server):
    with MatloraClient(server.url, api_key=API_KEY, timeout=30) as opened:
        yield opened


# --- a stub server with scripted replies -----------------------------------------------------------------------

Reply = tuple[int, dict[str, str], object]


@contextmanager
def stub_server(respond: Callable[[str, str, object], Reply]) -> Iterator[tuple[str, list[dict]]]:
    """Serve HTTP on 127.0.0.1 with ``respond(method, path, json_body)``, yielding the URL and the requests seen."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.reply(None)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            self.reply(json.loads(self.rfile.read(length) or b"null"))

        def reply(self, body: object) -> None:
            seen.append({"at": time.monotonic(), "method": self.command, "path": self.path, "body": body,
                         "headers": dict(self.headers)})
            status, headers, payload = respond(self.command, self.path, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def scripted(*replies: Reply) -> Callable[[str, str, object], Reply]:
    """Return a responder that sends the n-th reply to the n-th request and repeats the last one."""
    count = 0

    def respond(method: str, path: str, body: object) -> Reply:
        nonlocal count
        count += 1
        return replies[min(count, len(replies)) - 1]

    return respond


def rate_limited(retry_after: str) -> Reply:
    return 429, {"Retry-After": retry_after}, {"error": {
        "message": "the waiting queue is full (1 requests); retry later", "type": "rate_limit_error",
        "param": None, "code": 429, "request_id": "req-stub"}}


HEALTH_OK = (200, {}, HealthResponse(status="ok", model="m", adapter="a", running=0, waiting=0).model_dump())
GENERATED = (200, {}, GenerateResponse(id="req-1", text="seven", rank=4, rank_reason="explicit", finish_reason="stop",
                                       usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                                       timings={}).model_dump())


# --- sync client on the live server ----------------------------------------------------------------------------

def test_generate_at_rank(client):
    response = client.generate(PROMPT, rank=4, max_new_tokens=5)
    assert isinstance(response, GenerateResponse)
    assert response.rank == 4
    assert response.rank_reason == "explicit"
    assert 1 <= response.usage.completion_tokens <= 5
    assert response.timings.e2e_ms > 0


def test_generate_stream_matches_plain(client):
    plain = client.generate(PROMPT, rank=8, max_new_tokens=6)
    events = list(client.generate_stream(PROMPT, rank=8, max_new_tokens=6))
    assert events[-1].finished
    assert all(not event.finished for event in events[:-1])
    assert events[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert events[-1].timings.time_to_first_token_ms > 0
    assert "".join(event.text for event in events) == plain.text
    assert {event.rank for event in events} == {8}


def test_ignore_eos_generates_max_tokens(client):
    response = client.generate(PROMPT, rank=4, max_new_tokens=12, ignore_eos=True)
    assert response.usage.completion_tokens == 12
    assert response.finish_reason == "length"


def test_latency_budget_picks_rank(client):
    response = client.generate(PROMPT, latency_budget_ms=10_000, max_new_tokens=2)
    assert response.rank_reason == "latency_budget"
    assert response.rank == max(OFFERED)


def test_completions_plain_and_stream(client):
    plain = client.completions(PROMPT, rank=0, max_tokens=5)
    assert plain.rank == 0
    assert plain.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions_stream(PROMPT, rank=0, max_tokens=5))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == plain.choices[0].text


def test_chat_plain_and_stream(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Two plus two?"}]
    plain = client.chat(messages, rank=2, max_tokens=5)
    assert plain.rank == 2
    assert plain.choices[0].message.role == "assistant"
    chunks = list(client.chat_stream(messages, rank=2, max_tokens=5))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content


def test_chat_accepts_a_string(client):
    response = client.chat("Two plus two?", max_tokens=3)
    assert response.usage.prompt_tokens > 0
    assert response.rank_reason == "default"


def test_models_ranks_health(client):
    models = client.models()
    adapter = models.data[-1]
    assert adapter.offered_ranks == OFFERED
    assert adapter.parent == models.data[0].id
    ranks = client.ranks()
    assert [entry.rank for entry in ranks.data] == OFFERED
    assert {entry.rank: entry.quality for entry in ranks.data}[4] == 2.5
    health = client.health()
    assert health.status == "ok"
    assert health.adapter == adapter.id


def test_error_carries_server_message(client):
    with pytest.raises(InvalidRequestError) as caught:
        client.generate(PROMPT, rank=5, request_id="my-request-1")
    error = caught.value
    assert error.status == 422
    assert error.param == "rank"
    assert "rank 5 is not offered" in error.message
    assert error.request_id == "my-request-1"
    assert "HTTP 422" in str(error)


def test_unknown_model_raises_not_found(client):
    with pytest.raises(NotFoundError) as caught:
        client.completions(PROMPT, model="no-such-model", max_tokens=2)
    assert caught.value.param == "model"


def test_missing_api_key_raises(server):
    with MatloraClient(server.url) as anonymous:
        assert anonymous.health().status == "ok"  # /health needs no key
        with pytest.raises(AuthenticationError) as caught:
            anonymous.ranks()
    assert caught.value.status == 401
    assert "missing API key" in caught.value.message


def test_unknown_option_raises_type_error(client):
    with pytest.raises(TypeError, match="colour"):
        client.generate(PROMPT, colour="red")


def test_extra_body_is_sent(client):
    with pytest.raises(InvalidRequestError) as caught:
        client.generate(PROMPT, extra_body={"colour": "red"})
    assert caught.value.param == "colour"


# --- async client on the live server ---------------------------------------------------------------------------

def test_async_client_covers_every_endpoint(server):
    async def scenario() -> None:
        async with AsyncMatloraClient(server.url, api_key=API_KEY, timeout=30) as client:
            plain = await client.generate(PROMPT, rank=4, max_new_tokens=5)
            events = [event async for event in client.generate_stream(PROMPT, rank=4, max_new_tokens=5)]
            assert "".join(event.text for event in events) == plain.text
            assert events[-1].finished

            completion = await client.completions(PROMPT, rank=16, max_tokens=4)
            chunks = [chunk async for chunk in client.completions_stream(PROMPT, rank=16, max_tokens=4)]
            assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

            chat = await client.chat("Two plus two?", rank=1, max_tokens=4)
            chat_chunks = [chunk async for chunk in client.chat_stream("Two plus two?", rank=1, max_tokens=4)]
            assert chat.rank == 1
            assert chat_chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

            assert (await client.models()).data[-1].offered_ranks == OFFERED
            assert [entry.rank for entry in (await client.ranks()).data] == OFFERED
            assert (await client.health()).status == "ok"

    asyncio.run(scenario())


def test_async_error_and_early_close(server):
    async def scenario() -> None:
        async with AsyncMatloraClient(server.url, api_key=API_KEY, timeout=30) as client:
            with pytest.raises(InvalidRequestError) as caught:
                await client.chat("hi", rank=3)
            assert "rank 3 is not offered" in caught.value.message
            async with aclosing(client.generate_stream(PROMPT, rank=4, max_new_tokens=20)) as stream:
                async for _ in stream:
                    break
            assert (await client.health()).status == "ok"

    asyncio.run(scenario())


# --- retries and stream errors against the stub ----------------------------------------------------------------

def test_retry_honours_retry_after():
    with stub_server(scripted(rate_limited("1"), GENERATED)) as (url, seen):
        with MatloraClient(url, retry=RetryPolicy(max_retries=2, backoff_s=0.01)) as client:
            response = client.generate("hi", rank=4)
    assert response.text == "seven"
    assert len(seen) == 2
    assert seen[1]["at"] - seen[0]["at"] >= 0.95
    assert seen[1]["body"] == {"prompt": "hi", "rank": 4}


def test_async_retry_honours_retry_after():
    async def scenario(url: str) -> HealthResponse:
        async with AsyncMatloraClient(url, retry=RetryPolicy(max_retries=2)) as client:
            return await client.health()

    with stub_server(scripted(rate_limited("1"), HEALTH_OK)) as (url, seen):
        health = asyncio.run(scenario(url))
    assert health.status == "ok"
    assert len(seen) == 2
    assert seen[1]["at"] - seen[0]["at"] >= 0.95


def test_rate_limit_raised_after_retries():
    with stub_server(scripted(rate_limited("0"))) as (url, seen):
        with MatloraClient(url, retry=RetryPolicy(max_retries=2)) as client:
            with pytest.raises(RateLimitError) as caught:
                client.health()
    assert len(seen) == 3
    assert caught.value.retry_after == 0
    assert "waiting queue is full" in caught.value.message
    assert caught.value.request_id == "req-stub"


def test_long_retry_after_raises_at_once():
    with stub_server(scripted(rate_limited("120"))) as (url, seen):
        with MatloraClient(url, retry=RetryPolicy(max_retries=3, max_retry_after_s=60)) as client:
            with pytest.raises(RateLimitError):
                client.health()
    assert len(seen) == 1


def test_stream_error_event_raises():
    events = (b'data: {"id":"req-9","text":"a","rank":4,"finished":false}\n\n'
              b'data: {"error":{"message":"the request timed out before it finished","type":"timeout_error",'
              b'"param":null,"code":504,"request_id":"req-9"}}\n\n')
    with stub_server(scripted((200, {"Content-Type": "text/event-stream"}, events))) as (url, _):
        with MatloraClient(url) as client:
            received = []
            with pytest.raises(ServerError) as caught:
                for event in client.generate_stream("hi"):
                    received.append(event.text)
    assert received == ["a"]
    assert caught.value.status == 504
    assert "timed out" in caught.value.message


def test_connection_error_after_retries(caplog):
    port = free_port()  # nothing listens there
    caplog.set_level(logging.WARNING, logger="matlora_client.retry")
    with MatloraClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_retries=2, backoff_s=0.01)) as client:
        with pytest.raises(MatloraConnectionError, match=f"127.0.0.1:{port}|/health"):
            client.health()
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


# --- small parts -----------------------------------------------------------------------------------------------

def test_retry_after_accepts_http_date():
    later = datetime.now(timezone.utc) + timedelta(seconds=30)
    seconds = parse_retry_after(format_datetime(later, usegmt=True))
    assert 25 <= seconds <= 31
    assert parse_retry_after("7") == 7
    assert parse_retry_after("soon") is None


def test_sse_decoder_joins_data_lines():
    decoder = SSEDecoder()
    assert decoder.feed(": keep-alive") is None
    assert decoder.feed("data: {\"a\":") is None
    assert decoder.feed("data: 1}") is None
    assert decoder.feed("") == "{\"a\":\n1}"
    assert decoder.feed("") is None


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="base_url"):
        MatloraClient("127.0.0.1:8000")
    with pytest.raises(ValueError, match="base_url 'http://' has no host"):
        MatloraClient("http://")


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), True])
def test_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
        MatloraClient("http://127.0.0.1:8000", timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
        AsyncMatloraClient("http://127.0.0.1:8000", timeout=timeout)
