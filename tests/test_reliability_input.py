"""Bad input on /generate and the OpenAI routes: every case returns 4xx naming the field, never 5xx.

Limits (prompt tokens, max tokens, body size, stop strings, n) must name the field, the value and the limit.
Malformed bodies (wrong types, NaN or infinite numbers, negative values, empty prompts, invalid UTF-8, non-JSON,
unknown fields) must return 400, 413 or 422 with the usual error body and its request id.
"""

from __future__ import annotations

import json

import httpx
import pytest

from .live_server import live_server, tiny_settings

ROUTES = ["/generate", "/v1/completions", "/v1/chat/completions"]
SENTENCE = "The quick brown fox jumps over the lazy dog. "    # 16 tokens of the test tokenizer
LIMITS = dict(max_prompt_tokens=32, max_model_len=48, max_tokens_limit=24, default_max_tokens=4, max_stop_strings=2,
              max_stop_length=8, max_body_bytes=4096)


@pytest.fixture(scope="module")
def server():
    with live_server(tiny_settings(**LIMITS)) as running:
        yield running


def max_tokens_field(route: str) -> str:
    return "max_new_tokens" if route == "/generate" else "max_tokens"


def prompt_field(route: str) -> str:
    return "messages" if route == "/v1/chat/completions" else "prompt"


def body_for(route: str, prompt: str = "Question: Tom has", max_tokens: int | None = 2, **fields) -> dict:
    """A valid request body for ``route`` with the given prompt and max tokens, plus ``fields``."""
    if route == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": prompt}]}
    else:
        body = {"prompt": prompt}
    if max_tokens is not None:
        body[max_tokens_field(route)] = max_tokens
    body.update(fields)
    return body


def reject_constant(name: str):
    raise AssertionError(f"the response body contains the non-JSON constant {name}")


def error_of(response: httpx.Response, status: int) -> dict:
    """Check the status and the error body shape; return the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = json.loads(response.text, parse_constant=reject_constant)["error"]
    assert error["code"] == status
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in error["message"]
    return error


def post(server, route: str, body: dict) -> httpx.Response:
    with server.client() as client:
        return client.post(route, json=body)


def post_raw(server, route: str, content: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    with server.client() as client:
        return client.post(route, content=content, headers=headers)


# --- limits: the field, the value and the limit ----------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_valid_body_is_served(server, route):
    assert post(server, route, body_for(route)).status_code == 200


@pytest.mark.parametrize("route", ROUTES)
def test_prompt_over_token_limit(server, route):
    error = error_of(post(server, route, body_for(route, SENTENCE * 3)), 422)
    assert error["param"] == prompt_field(route)
    assert "max_prompt_tokens=32" in error["message"]
    assert "tokens" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_max_tokens_over_limit(server, route):
    error = error_of(post(server, route, body_for(route, max_tokens=25)), 422)
    assert error["param"] == max_tokens_field(route)
    assert "25 exceeds the limit of 24" in error["message"]


def test_max_completion_tokens_over_limit(server):
    body = body_for("/v1/chat/completions", max_tokens=None, max_completion_tokens=1000)
    error = error_of(post(server, "/v1/chat/completions", body), 422)
    assert error["param"] == "max_completion_tokens"
    assert "1000 exceeds the limit of 24" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_output_beyond_max_model_len(server, route):
    tokenizer = server.app.state.service.tokenizer
    prompt = SENTENCE if route == "/v1/chat/completions" else SENTENCE * 2
    if route == "/v1/chat/completions":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    room = LIMITS["max_model_len"] - len(ids)
    assert 0 < room < LIMITS["max_tokens_limit"]
    error = error_of(post(server, route, body_for(route, prompt, max_tokens=room + 1)), 422)
    assert error["param"] == max_tokens_field(route)
    assert f"ask for at most {room}" in error["message"]
    assert post(server, route, body_for(route, prompt, max_tokens=room)).status_code == 200


@pytest.mark.parametrize("route", ROUTES)
def test_too_many_stop_strings(server, route):
    error = error_of(post(server, route, body_for(route, stop=["a", "b", "c"])), 422)
    assert error["param"] == "stop"
    assert "3 stop strings, more than the limit of 2" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stop, length", [("123456789", 9), ("", 0)])
def test_stop_string_length(server, route, stop, length):
    error = error_of(post(server, route, body_for(route, stop=[stop])), 422)
    assert error["param"] == "stop"
    assert f"{stop!r} has {length} characters; allowed: 1 to 8" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_size_limit(server, route):
    body = json.dumps(body_for(route, "x" * 5000)).encode()
    error = error_of(post_raw(server, route, body), 413)
    assert f"request body of {len(body)} bytes exceeds the limit of 4096 bytes" == error["message"]


def test_chunked_body_over_size_limit(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    with server.client() as client:
        response = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    error = error_of(response, 413)
    assert "exceeds the limit of 4096 bytes" in error["message"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value, fragment", [
    (2, "only 1 is accepted (got 2)"),
    (0, "only 1 is accepted (got 0)"),
    ("1", "valid integer"),
    (1.5, "valid integer"),
])
def test_n_other_than_one(server, route, value, fragment):
    error = error_of(post(server, route, body_for(route, n=value)), 422)
    assert error["param"] == "n"
    assert fragment in error["message"]


@pytest.mark.parametrize("route, field, value, message", [
    ("/v1/completions", "logprobs", 5, "logprobs: not supported by this server: only null or 0 is accepted (got 5)"),
    ("/v1/completions", "echo", True, "echo: not supported by this server: only false is accepted (got True)"),
    ("/v1/completions", "suffix", "x", 'suffix: not supported by this server: only null or "" is accepted '
                                       "(got 'x')"),
    ("/v1/chat/completions", "logit_bias", {"7": 1}, "logit_bias: not supported by this server: only null is "
                                                     "accepted"),
])
def test_unsupported_option_names_json_value(server, route, field, value, message):
    error = error_of(post(server, route, body_for(route, **{field: value})), 422)
    assert error["param"] == field
    assert error["message"] == message


def test_list_of_prompts_gets_one_error(server):
    error = error_of(post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 2}), 422)
    assert error["param"] == "prompt"
    assert error["message"] == "prompt: a list of prompts is not supported: send one prompt (got ['a', 'b', 'c'])"
    assert post(server, "/v1/completions", {"prompt": ["Question: Tom has"], "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("route", ROUTES)
def test_rank_and_budget_together(server, route):
    error = error_of(post(server, route, body_for(route, rank=4, latency_budget_ms=50)), 422)
    assert error["param"] == "latency_budget_ms"
    assert "send rank or latency_budget_ms, not both" in error["message"]


def test_max_tokens_and_max_completion_tokens_differ(server):
    body = body_for("/v1/chat/completions", max_tokens=3, max_completion_tokens=2)
    error = error_of(post(server, "/v1/chat/completions", body), 422)
    assert error["param"] == "max_completion_tokens"
    assert "max_tokens (3) and max_completion_tokens (2) differ" in error["message"]
    same = post(server, "/v1/chat/completions", body_for("/v1/chat/completions", max_tokens=2,
                                                         max_completion_tokens=2, ignore_eos=True))
    assert same.status_code == 200
    assert same.json()["usage"]["completion_tokens"] == 2


# --- wrong types, NaN, negative values and empty prompts ---------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field, value, fragment", [
    ("temperature", "0.5", "valid number"),
    ("temperature", True, "valid number"),
    ("temperature", -0.5, "greater than or equal to 0"),
    ("temperature", 3, "less than or equal to 2"),
    ("top_p", 0, "greater than 0"),
    ("top_p", [0.5], "valid number"),
    ("top_k", -1, "greater than or equal to 0"),
    ("top_k", 2.5, "valid integer"),
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**64, "less than or equal to"),
    ("rank", -1, "greater than or equal to 0"),
    ("rank", "4", "valid integer"),
    ("rank", 5, "rank 5 is not offered"),
    ("latency_budget_ms", 0, "greater than 0"),
    ("latency_budget_ms", -10, "greater than 0"),
    ("stream", "yes", "valid boolean"),
    ("stop", 7, "valid string"),
    ("stop", [None], "valid string"),
])
def test_invalid_field_value(server, route, field, value, fragment):
    error = error_of(post(server, route, body_for(route, **{field: value})), 422)
    assert error["param"] == field
    assert fragment in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", [0, -1, "8", None])
def test_invalid_max_tokens(server, route, value):
    body = body_for(route, max_tokens=None)
    body[max_tokens_field(route)] = value
    response = post(server, route, body)
    if value is None:   # null means "use the server default"
        assert response.status_code == 200
        return
    assert error_of(response, 422)["param"] == max_tokens_field(route)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field, literal", [
    ("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"), ("latency_budget_ms", "Infinity"),
    ("latency_budget_ms", "-Infinity"), ("seed", "NaN"), ("rank", "Infinity"), ("MAX", "NaN"), ("MAX", "Infinity"),
])
def test_non_finite_number_literals(server, route, field, literal):
    """Python's json module reads NaN and Infinity literals; the schemas must reject them as values."""
    field = max_tokens_field(route) if field == "MAX" else field
    body = json.dumps(body_for(route, max_tokens=None)).rstrip("}") + f', "{field}": {literal}}}'
    error = error_of(post_raw(server, route, body.encode()), 422)
    assert error["param"] == field
    assert literal.lower().lstrip("-")[:3] in error["message"].lower()


@pytest.mark.parametrize("route, field", [("/v1/completions", "presence_penalty"),
                                          ("/v1/chat/completions", "frequency_penalty")])
def test_non_finite_penalty(server, route, field):
    body = json.dumps(body_for(route)).rstrip("}") + f', "{field}": NaN}}'
    error = error_of(post_raw(server, route, body.encode()), 422)
    assert error["param"] == field
    assert "finite number" in error["message"]


@pytest.mark.parametrize("route, body, param", [
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"max_new_tokens": 2}, "prompt"),
    ("/generate", {"prompt": None}, "prompt"),
    ("/generate", {"prompt": ["hi"]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
])
def test_missing_or_empty_prompt(server, route, body, param):
    error = error_of(post(server, route, body), 422)
    assert error["param"] == param


@pytest.mark.parametrize("route", ROUTES)
def test_lone_surrogate_in_prompt(server, route):
    body = json.dumps(body_for(route, "hi \ud800 there"))    # json.dumps writes it as the escape \ud800
    error = error_of(post_raw(server, route, body.encode()), 422)
    assert error["param"].startswith(prompt_field(route))
    assert "ud800" in error["message"]


def test_chat_template_rejection(server):
    """A chat template that raises on a message it does not support gets 422, not 500."""
    tokenizer = server.app.state.service.tokenizer
    original = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                               "{{ raise_exception('tool messages are not supported') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    try:
        body = {"messages": [{"role": "tool", "content": "42"}], "max_tokens": 2}
        error = error_of(post(server, "/v1/chat/completions", body), 422)
    finally:
        tokenizer.chat_template = original
    assert error["param"] == "messages"
    assert "tool messages are not supported" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fields", [{"temperature": 1e-300}, {"temperature": 2.0, "top_p": 1e-300},
                                    {"temperature": 1.0, "top_k": 10**30}])
def test_extreme_sampling_values_are_served(server, route, fields):
    """A temperature or top_p near the smallest float samples greedily instead of failing the engine step."""
    response = post(server, route, body_for(route, **fields))
    assert response.status_code == 200, response.text


# --- bodies that are not a JSON object -----------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_invalid_utf8_body(server, route):
    error = error_of(post_raw(server, route, b'{"prompt": "\xff\xfe"}'), 400)
    assert "not valid UTF-8" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content", [b"not json", b'{"prompt": "hi"', b"{'prompt': 'hi'}", b""])
def test_non_json_body(server, route, content):
    error = error_of(post_raw(server, route, content), 422)
    assert error["param"] is None
    assert "not valid JSON" in error["message"] or "field required" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_without_json_content_type(server, route, content_type):
    error = error_of(post_raw(server, route, json.dumps(body_for(route)).encode(), content_type), 422)
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("content", [b"[1, 2]", b'"hi"', b"42", b"null"])
def test_json_that_is_not_an_object(server, route, content):
    error = error_of(post_raw(server, route, content), 422)
    assert "valid dictionary" in error["message"] or "field required" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field", ["colour", "max_new_token", "Temperature"])
def test_unknown_field_is_rejected(server, route, field):
    error = error_of(post(server, route, body_for(route, **{field: 1})), 422)
    assert error["param"] == field
    assert "unknown field" in error["message"]


def test_unknown_field_in_message_is_rejected(server):
    body = {"messages": [{"role": "user", "content": "hi", "mood": "calm"}], "max_tokens": 2}
    error = error_of(post(server, "/v1/chat/completions", body), 422)
    assert error["param"] == "messages.0.mood"


def test_unknown_route_and_method(server):
    with server.client() as client:
        missing = client.post("/v1/embeddings", json={"input": "hi"})
        wrong_method = client.get("/generate")
    assert error_of(missing, 404)["type"] == "not_found_error"
    assert error_of(wrong_method, 405)["message"] == "Method Not Allowed"


def test_server_still_serves_after_bad_input(server):
    with server.client() as client:
        health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["running"] == 0
    assert health["waiting"] == 0
    assert server.app.state.engine.scheduler.reserved_tokens == 0
