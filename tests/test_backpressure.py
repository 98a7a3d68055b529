"""Backpressure over HTTP: 429 with Retry-After when the queue is full; a disconnect frees its slot."""

import threading
import time

import httpx

from .live_server import live_server, tiny_settings

LONG = {"prompt": "Question: Tom has 3 apples", "rank": 4, "max_new_tokens": 200, "stream": True, "ignore_eos": True}


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_full_queue_answers_429():
    settings = tiny_settings(max_num_seqs=1, max_waiting=1)
    with live_server(settings) as server:
        engine = server.app.state.engine
        gate = threading.Event()
        step = engine.step
        engine.step = lambda: (gate.wait(30), step())       # hold the engine so submissions stay queued
        results = []
        first = threading.Thread(target=lambda: results.append(httpx.post(
            server.url + "/generate", timeout=60, json={"prompt": "hi", "max_new_tokens": 2})))
        first.start()
        wait_until(lambda: engine.num_waiting() == 1)
        with server.client() as client:
            rejected = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
        gate.set()
        first.join(timeout=60)
        assert rejected.status_code == 429
        assert int(rejected.headers["retry-after"]) >= 1
        assert "waiting queue is full" in rejected.json()["error"]["message"]
        assert results[0].status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert 'matlora_requests_total{outcome="rejected",rank="16"} 1.0' in metrics


def test_disconnect_frees_the_slot():
    settings = tiny_settings(max_num_seqs=1)
    with live_server(settings) as server:
        engine = server.app.state.engine
        with server.client() as client:
            with client.stream("POST", "/generate", json=LONG) as response:
                next(response.iter_lines())
                assert engine.num_running() == 1
            # leaving the block closed the connection mid-stream
            wait_until(lambda: engine.num_running() == 0)
            after = client.post("/generate", json={"prompt": "hi", "rank": 4, "max_new_tokens": 3})
        assert after.status_code == 200
        # the response can arrive just before the engine retires the row, so wait for the release
        wait_until(lambda: engine.scheduler.reserved_tokens == 0)


def test_non_streamed_disconnect_cancels():
    settings = tiny_settings(max_num_seqs=1)
    with live_server(settings) as server:
        engine = server.app.state.engine
        step = engine.step
        engine.step = lambda: (time.sleep(0.01), step())     # 200 tokens now take over 2 s
        body = {**LONG, "stream": False, "max_new_tokens": 200}
        try:
            httpx.post(server.url + "/generate", json=body, timeout=0.3)
        except httpx.TimeoutException:
            pass
        wait_until(lambda: engine.num_running() == 0 and engine.num_waiting() == 0)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'matlora_requests_total{outcome="cancelled",rank="4"} 1.0' in metrics
