"""The OpenAI-compatible routes through the official openai package, plain and streamed."""

import pytest

openai = pytest.importorskip("openai")

from .live_server import live_server  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with live_server() as running:
        yield openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)


def test_completion_with_rank(client):
    response = client.completions.create(model="tiny-matryoshka", prompt="Question: Tom has", max_tokens=6,
                                         extra_body={"rank": 4})
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 6
    assert response.model_extra["rank"] == 4
    assert response.model_extra["rank_reason"] == "explicit"


def test_completion_stream(client):
    stream = client.completions.create(model="tiny-matryoshka", prompt="The quick brown", max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"rank": 16})
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens <= 8
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = client.completions.create(model="tiny-matryoshka", prompt="The quick brown", max_tokens=8,
                                      extra_body={"rank": 16})
    assert text == plain.choices[0].text


def test_chat_completion(client):
    response = client.chat.completions.create(
        model="tiny-matryoshka", messages=[{"role": "user", "content": "How many apples?"}], max_tokens=5,
        extra_body={"rank": 8})
    assert response.choices[0].message.role == "assistant"
    assert response.usage.prompt_tokens > 0
    assert response.model_extra["rank"] == 8


def test_chat_completion_stream(client):
    stream = client.chat.completions.create(
        model="tiny-matryoshka", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True,
        extra_body={"latency_budget_ms": 10_000})
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[0].model_extra["rank_reason"] == "latency_budget"


def test_models_lists_adapter_and_ranks(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-llama", "tiny-matryoshka"}
    assert models["tiny-matryoshka"].model_extra["offered_ranks"] == [0, 1, 2, 4, 8, 16]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_unsupported_option_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError, match="n: not supported"):
        client.completions.create(model="tiny-matryoshka", prompt="hi", max_tokens=2, n=2)


def test_base_model_id_runs_rank_zero(client):
    base = client.completions.create(model="tiny-llama", prompt="The quick brown", max_tokens=6)
    adapter_at_zero = client.completions.create(model="tiny-matryoshka", prompt="The quick brown", max_tokens=6,
                                                extra_body={"rank": 0})
    assert base.model == "tiny-llama"
    assert base.model_extra["rank"] == 0
    assert base.model_extra["rank_reason"] == "explicit"
    assert base.choices[0].text == adapter_at_zero.choices[0].text
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, extra_body={"rank": 0})
    assert chat.model_extra["rank"] == 0


def test_adapter_id_keeps_default_rank(client):
    response = client.completions.create(model="tiny-matryoshka", prompt="hi", max_tokens=2)
    assert (response.model_extra["rank"], response.model_extra["rank_reason"]) == (16, "default")


@pytest.mark.parametrize("extra, param, fragment", [
    ({"rank": 4}, "rank", "rank 4 needs the adapter, but model 'tiny-llama' is the base model"),
    ({"latency_budget_ms": 50}, "latency_budget_ms", "model 'tiny-llama' is the base model"),
])
def test_base_model_id_with_adapter_rank_is_422(client, extra, param, fragment):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="tiny-llama", prompt="hi", max_tokens=2, extra_body=extra)
    error = raised.value.body
    assert error["param"] == param
    assert fragment in error["message"]
    assert "'tiny-matryoshka'" in error["message"]
