"""The real SmolLM2-135M-Instruct with the bundled adapter, served end to end (slow: loads a 135M model)."""

import pytest

from matlora_core import read_config
from matlora_server.app import load_components
from matlora_server.config import DEFAULT_ADAPTER

from .live_server import live_server, tiny_settings

pytestmark = pytest.mark.slow

QUESTION = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
            "May. How many clips did Natalia sell altogether in April and May?\nAnswer: ")


@pytest.fixture(scope="module")
def server():
    settings = tiny_settings(model="smollm2-135m-instruct", adapter=str(DEFAULT_ADAPTER), max_model_len=512,
                             max_prompt_tokens=256, max_cached_tokens=2048, profile_steps=0)
    with live_server(settings, load_components(settings)) as running:
        yield running


def test_bundled_adapter_is_valid():
    config = read_config(DEFAULT_ADAPTER)
    assert config.adapter_kind == "matryoshka"
    assert config.offered_ranks[0] == 0
    assert config.offered_ranks[-1] == config.r_max
    assert set(config.profile) >= set(config.offered_ranks)


def test_rank_zero_and_r_max_answer_differently(server):
    r_max = read_config(DEFAULT_ADAPTER).r_max
    texts = {}
    with server.client(timeout=300) as client:
        for rank in (0, r_max):
            response = client.post("/generate", json={"prompt": QUESTION, "rank": rank, "max_new_tokens": 48})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["rank"] == rank
            assert body["usage"]["completion_tokens"] > 0
            texts[rank] = body["text"]
    assert texts[0].strip()
    assert texts[r_max].strip()
    assert texts[0] != texts[r_max]


def test_mixed_ranks_in_one_batch_match_single_runs(server):
    """Greedy float32 answers at three ranks, sent together, equal the same requests sent one at a time."""
    import concurrent.futures

    ranks = read_config(DEFAULT_ADAPTER).offered_ranks
    chosen = [ranks[0], ranks[len(ranks) // 2], ranks[-1]]
    body = {"prompt": QUESTION, "max_new_tokens": 16}
    with server.client(timeout=300) as client:
        alone = {rank: client.post("/generate", json={**body, "rank": rank}).json()["text"] for rank in chosen}
        with concurrent.futures.ThreadPoolExecutor(len(chosen)) as pool:
            together = dict(zip(chosen, pool.map(
                lambda rank: client.post("/generate", json={**body, "rank": rank}).json()["text"], chosen)))
    assert together == alone
