"""Server metrics: each one moves under the right rank label, on a private registry.

The first part drives ServerMetrics by hand with StepStats and Request objects, so each event and its effect sit
side by side. The second part sends real requests to a live tiny server and reads /metrics over HTTP.
"""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from matlora_server.engine import FinishReason, RankReason, Request, SamplingParams, StepStats
from matlora_server.metrics import OUTCOME_BY_REASON, OUTCOMES, ServerMetrics

from .live_server import live_server, tiny_settings

OFFERED = [0, 1, 2, 4, 8, 16]
PER_RANK_HISTOGRAMS = ("matlora_time_to_first_token_seconds", "matlora_time_per_output_token_seconds",
                       "matlora_e2e_request_latency_seconds", "matlora_request_queue_time_seconds")


def value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    """Return one sample of the private registry, or 0 when the sample does not exist."""
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def finished_request(rank: int, reason: FinishReason, rank_reason: RankReason = RankReason.EXPLICIT,
                     output_tokens: int = 5) -> Request:
    """A request as the engine leaves it when it finishes: arrived at t=100, prefilled at 100.5, first token 101."""
    request = Request(request_id=f"req-{rank}-{reason.value}", prompt_token_ids=[1, 2, 3],
                      sampling=SamplingParams(max_tokens=8), rank=rank, rank_reason=rank_reason,
                      sink=lambda output: None)
    request.arrival_time = 100.0
    request.scheduled_time = 100.5
    request.first_token_time = 101.0
    request.output_token_ids = list(range(output_tokens))
    request.finish_time = 101.0 + 0.25 * (output_tokens - 1)
    request.finish_reason = reason
    return request


@pytest.fixture()
def metrics() -> ServerMetrics:
    return ServerMetrics(OFFERED)


# --- names and labels --------------------------------------------------------------------------------------


def test_registry_is_private():
    first = ServerMetrics(OFFERED)
    second = ServerMetrics([0, 4])
    assert first.registry is not second.registry
    assert isinstance(first.registry, CollectorRegistry)
    assert REGISTRY.get_sample_value("matlora_generation_tokens_total", {"rank": "0"}) is None


def test_names_follow_conventions(metrics):
    families = list(metrics.registry.collect())
    assert families
    for family in families:
        assert family.name.startswith("matlora_"), family.name
        assert ":" not in family.name, family.name
        assert family.documentation.strip(), f"{family.name} has no help text"
        for sample in family.samples:
            assert not {"request_id", "id"} & set(sample.labels), f"{sample.name} has a request id label"
    counters = [family for family in families if family.type == "counter"]
    assert counters
    for family in counters:
        assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name


def test_rank_labels_preinitialised(metrics):
    for rank in map(str, OFFERED):
        assert metrics.registry.get_sample_value("matlora_generation_tokens_total", {"rank": rank}) == 0
        assert metrics.registry.get_sample_value("matlora_prompt_tokens_total", {"rank": rank}) == 0
        for outcome in OUTCOMES:
            labels = {"rank": rank, "outcome": outcome}
            assert metrics.registry.get_sample_value("matlora_requests_total", labels) == 0
        for reason in RankReason:
            labels = {"rank": rank, "reason": reason.value}
            assert metrics.registry.get_sample_value("matlora_rank_choices_total", labels) == 0
        for name in PER_RANK_HISTOGRAMS:
            assert metrics.registry.get_sample_value(f"{name}_count", {"rank": rank}) == 0
        for phase in ("prefill", "decode"):
            labels = {"phase": phase, "max_rank": rank}
            assert metrics.registry.get_sample_value("matlora_step_duration_seconds_count", labels) == 0


def test_rank_label_takes_only_offered_ranks(metrics):
    for family in metrics.registry.collect():
        for sample in family.samples:
            for label in ("rank", "max_rank"):
                if label in sample.labels:
                    assert int(sample.labels[label]) in OFFERED, f"{sample.name} {sample.labels}"


def test_rank_zero_always_offered():
    metrics = ServerMetrics([4, 16])
    assert metrics.ranks == ["0", "4", "16"]
    assert value(metrics, "matlora_generation_tokens_total", rank="0") == 0


def test_every_finish_reason_has_outcome():
    assert set(OUTCOME_BY_REASON) == set(FinishReason)
    assert set(OUTCOME_BY_REASON.values()) | {"rejected"} == set(OUTCOMES)


# --- engine steps --------------------------------------------------------------------------------------------


def test_prefill_step_counts_tokens_by_rank(metrics):
    stats = StepStats(phase="prefill", seconds=0.03, batch_size=3, ranks=[4, 4, 16], max_rank=16,
                      prompt_tokens={4: 20, 16: 7}, generated_tokens={4: 2, 16: 1})
    metrics.on_step(stats, engine=None)

    assert value(metrics, "matlora_prompt_tokens_total", rank="4") == 20
    assert value(metrics, "matlora_prompt_tokens_total", rank="16") == 7
    assert value(metrics, "matlora_prompt_tokens_total", rank="8") == 0
    assert value(metrics, "matlora_generation_tokens_total", rank="4") == 2
    assert value(metrics, "matlora_generation_tokens_total", rank="16") == 1
    assert value(metrics, "matlora_batch_size_count", phase="prefill") == 1
    assert value(metrics, "matlora_batch_size_sum", phase="prefill") == 3
    assert value(metrics, "matlora_batch_size_count", phase="decode") == 0
    assert value(metrics, "matlora_step_duration_seconds_count", phase="prefill", max_rank="16") == 1
    assert value(metrics, "matlora_step_duration_seconds_sum", phase="prefill", max_rank="16") == pytest.approx(0.03)
    assert value(metrics, "matlora_step_duration_seconds_count", phase="prefill", max_rank="4") == 0
    # Prefill batches are not counted in the distinct-ranks histogram, which describes decode steps.
    assert value(metrics, "matlora_distinct_ranks_per_step_count") == 0


def test_decode_step_counts_distinct_ranks(metrics):
    stats = StepStats(phase="decode", seconds=0.01, batch_size=4, ranks=[0, 8, 8, 2], max_rank=8,
                      generated_tokens={0: 1, 8: 2, 2: 1})
    metrics.on_step(stats, engine=None)

    assert value(metrics, "matlora_distinct_ranks_per_step_count") == 1
    assert value(metrics, "matlora_distinct_ranks_per_step_sum") == 3
    assert value(metrics, "matlora_batch_size_sum", phase="decode") == 4
    assert value(metrics, "matlora_step_duration_seconds_count", phase="decode", max_rank="8") == 1
    assert value(metrics, "matlora_generation_tokens_total", rank="8") == 2
    assert value(metrics, "matlora_generation_tokens_total", rank="0") == 1
    assert value(metrics, "matlora_generation_tokens_total", rank="2") == 1
    assert value(metrics, "matlora_generation_tokens_total", rank="16") == 0


# --- finished requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(FinishReason))
def test_finished_request_counts_outcome(metrics, reason):
    metrics.on_request_finished(finished_request(8, reason))
    outcome = OUTCOME_BY_REASON[reason]
    assert value(metrics, "matlora_requests_total", rank="8", outcome=outcome) == 1
    assert value(metrics, "matlora_requests_total", rank="4", outcome=outcome) == 0
    for other in set(OUTCOMES) - {outcome}:
        assert value(metrics, "matlora_requests_total", rank="8", outcome=other) == 0


@pytest.mark.parametrize("rank_reason", list(RankReason))
def test_finished_request_counts_rank_choice(metrics, rank_reason):
    metrics.on_request_finished(finished_request(2, FinishReason.STOP, rank_reason))
    assert value(metrics, "matlora_rank_choices_total", rank="2", reason=rank_reason.value) == 1
    assert value(metrics, "matlora_rank_choices_total", rank="16", reason=rank_reason.value) == 0


def test_finished_request_observes_timings(metrics):
    metrics.on_request_finished(finished_request(4, FinishReason.LENGTH, output_tokens=5))

    assert value(metrics, "matlora_request_queue_time_seconds_sum", rank="4") == pytest.approx(0.5)
    assert value(metrics, "matlora_time_to_first_token_seconds_sum", rank="4") == pytest.approx(1.0)
    assert value(metrics, "matlora_time_per_output_token_seconds_sum", rank="4") == pytest.approx(0.25)
    assert value(metrics, "matlora_e2e_request_latency_seconds_sum", rank="4") == pytest.approx(2.0)
    for name in PER_RANK_HISTOGRAMS:
        assert value(metrics, f"{name}_count", rank="4") == 1, name
        assert value(metrics, f"{name}_count", rank="16") == 0, name


def test_cancelled_while_waiting_skips_timings(metrics):
    request = finished_request(16, FinishReason.CANCELLED)
    request.scheduled_time = request.first_token_time = None
    request.output_token_ids = []
    metrics.on_request_finished(request)

    assert value(metrics, "matlora_requests_total", rank="16", outcome="cancelled") == 1
    assert value(metrics, "matlora_e2e_request_latency_seconds_count", rank="16") == 1
    assert value(metrics, "matlora_request_queue_time_seconds_count", rank="16") == 0
    assert value(metrics, "matlora_time_to_first_token_seconds_count", rank="16") == 0
    assert value(metrics, "matlora_time_per_output_token_seconds_count", rank="16") == 0


def test_single_token_skips_time_per_token(metrics):
    metrics.on_request_finished(finished_request(1, FinishReason.STOP, output_tokens=1))
    assert value(metrics, "matlora_time_to_first_token_seconds_count", rank="1") == 1
    assert value(metrics, "matlora_time_per_output_token_seconds_count", rank="1") == 0


def test_rejected_counts_under_rank(metrics):
    metrics.record_rejected(8)
    metrics.record_rejected(None)
    assert value(metrics, "matlora_requests_total", rank="8", outcome="rejected") == 1
    assert value(metrics, "matlora_requests_total", rank="0", outcome="rejected") == 1
    assert value(metrics, "matlora_requests_total", rank="16", outcome="rejected") == 0


# --- description and scrape-time gauges -------------------------------------------------------------------


def test_info_and_quality(metrics):
    quality = {0: {"accuracy": 0.1}, 4: {"accuracy": 0.3, "answer_loss": 1.5}, 3: {"accuracy": 0.9}}
    metrics.describe_server("smollm2", "gsm8k-adapter", "paper", "float32", quality)

    info = {"model": "smollm2", "adapter": "gsm8k-adapter", "offered_ranks": "0,1,2,4,8,16",
            "inference_rule": "paper", "dtype": "float32"}
    assert value(metrics, "matlora_adapter_info", **info) == 1
    assert value(metrics, "matlora_rank_quality", rank="0", metric="accuracy") == pytest.approx(0.1)
    assert value(metrics, "matlora_rank_quality", rank="4", metric="accuracy") == pytest.approx(0.3)
    assert value(metrics, "matlora_rank_quality", rank="4", metric="answer_loss") == pytest.approx(1.5)
    # Rank 3 is not offered, so its profile entry must not create a label value.
    assert metrics.registry.get_sample_value("matlora_rank_quality", {"rank": "3", "metric": "accuracy"}) is None


class FakeScheduler:
    def kv_cache_usage(self) -> float:
        return 0.25


class FakeEngine:
    scheduler = FakeScheduler()

    def num_running(self) -> int:
        return 3

    def num_waiting(self) -> int:
        return 5

    def running_max_rank(self) -> int:
        return 8


class FakePolicy:
    def predict_time_per_token(self, rank: int, running: int, running_max_rank: int) -> float | None:
        assert (running, running_max_rank) == (3, 8)
        return None if rank == 1 else 0.001 * max(rank, running_max_rank)


def test_engine_gauges_read_at_scrape(metrics):
    metrics.bind_engine(FakeEngine(), FakePolicy())

    assert value(metrics, "matlora_num_requests_running") == 3
    assert value(metrics, "matlora_num_requests_waiting") == 5
    assert value(metrics, "matlora_kv_cache_usage_ratio") == 0.25
    assert value(metrics, "matlora_rank_latency_estimate_seconds", rank="16") == pytest.approx(0.016)
    assert value(metrics, "matlora_rank_latency_estimate_seconds", rank="2") == pytest.approx(0.008)
    assert math.isnan(value(metrics, "matlora_rank_latency_estimate_seconds", rank="1"))


# --- end to end on a live server --------------------------------------------------------------------------


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of GET /metrics keyed by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(client, name: str, labels: dict[str, str], expected: float, timeout: float = 5.0):
    """Scrape until a sample reaches ``expected``; the engine counts a request just after it answers."""
    deadline = time.monotonic() + timeout
    samples = scrape(client)
    while sample(samples, name, **labels) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(client)
    return samples


@pytest.fixture(scope="module")
def server():
    with live_server() as running:
        yield running


def test_live_request_moves_its_rank(server):
    with server.client() as client:
        before = scrape(client)
        response = client.post("/generate", json={"prompt": "Question: Tom has 3 apples", "rank": 4,
                                                  "max_new_tokens": 6, "stop": []})
        assert response.status_code == 200, response.text
        body = response.json()
        outcome = {"stop": "stopped", "length": "length"}[body["finish_reason"]]
        after = scrape_until(client, "matlora_requests_total", {"rank": "4", "outcome": outcome},
                             sample(before, "matlora_requests_total", rank="4", outcome=outcome) + 1)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    usage = body["usage"]
    assert moved("matlora_generation_tokens_total", rank="4") == usage["completion_tokens"]
    assert moved("matlora_prompt_tokens_total", rank="4") == usage["prompt_tokens"]
    assert moved("matlora_requests_total", rank="4", outcome=outcome) == 1
    assert moved("matlora_rank_choices_total", rank="4", reason="explicit") == 1
    for name in ("matlora_time_to_first_token_seconds", "matlora_e2e_request_latency_seconds",
                 "matlora_request_queue_time_seconds"):
        assert moved(f"{name}_count", rank="4") == 1, name
    if usage["completion_tokens"] > 1:
        assert moved("matlora_time_per_output_token_seconds_count", rank="4") == 1
    assert moved("matlora_step_duration_seconds_count", phase="prefill", max_rank="4") >= 1
    assert moved("matlora_batch_size_count", phase="prefill") >= 1

    for other in ("0", "1", "2", "8", "16"):
        assert moved("matlora_generation_tokens_total", rank=other) == 0, other
        assert moved("matlora_prompt_tokens_total", rank=other) == 0, other
        assert moved("matlora_e2e_request_latency_seconds_count", rank=other) == 0, other


def test_live_default_and_budget_reasons(server):
    with server.client() as client:
        before = scrape(client)
        default = client.post("/generate", json={"prompt": "The quick brown", "max_new_tokens": 3}).json()
        budget = client.post("/generate", json={"prompt": "The quick brown", "max_new_tokens": 3,
                                                "latency_budget_ms": 60_000}).json()
        unmet = client.post("/generate", json={"prompt": "The quick brown", "max_new_tokens": 3,
                                               "latency_budget_ms": 0.000001}).json()
        assert (default["rank_reason"], budget["rank_reason"], unmet["rank_reason"]) == \
            ("default", "latency_budget", "budget_unmet")
        after = scrape_until(client, "matlora_rank_choices_total",
                             {"rank": str(unmet["rank"]), "reason": "budget_unmet"},
                             sample(before, "matlora_rank_choices_total", rank=str(unmet["rank"]),
                                    reason="budget_unmet") + 1)

    for body in (default, budget, unmet):
        labels = {"rank": str(body["rank"]), "reason": body["rank_reason"]}
        moved = sample(after, "matlora_rank_choices_total", **labels) - \
            sample(before, "matlora_rank_choices_total", **labels)
        assert moved == 1, labels
    assert unmet["rank"] == 0


def test_live_info_quality_and_gauges(server):
    with server.client() as client:
        samples = scrape(client)
    info = [labels for (name, labels) in samples if name == "matlora_adapter_info"]
    assert len(info) == 1
    assert dict(info[0])["model"] == "tiny-llama"
    assert dict(info[0])["adapter"] == "tiny-matryoshka"
    assert dict(info[0])["offered_ranks"] == "0,1,2,4,8,16"
    assert sample(samples, "matlora_rank_quality", rank="16", metric="accuracy") == pytest.approx(0.2)
    assert sample(samples, "matlora_rank_quality", rank="4", metric="answer_loss") == pytest.approx(2.5)
    assert ("matlora_num_requests_running", ()) in samples
    assert ("matlora_num_requests_waiting", ()) in samples
    assert 0 <= sample(samples, "matlora_kv_cache_usage_ratio") <= 1
    for rank in map(str, OFFERED):
        estimate = sample(samples, "matlora_rank_latency_estimate_seconds", rank=rank)
        assert estimate > 0, rank


def test_live_timeout_counted():
    with live_server(tiny_settings(request_timeout_s=0.000001)) as running, running.client() as client:
        response = client.post("/generate", json={"prompt": "Question: A train", "rank": 16,
                                                  "max_new_tokens": 4})
        assert response.status_code == 504, response.text
        samples = scrape_until(client, "matlora_requests_total", {"rank": "16", "outcome": "timeout"}, 1)
    assert sample(samples, "matlora_requests_total", rank="16", outcome="timeout") == 1
    assert sample(samples, "matlora_rank_choices_total", rank="16", reason="explicit") == 1


def test_live_rejected_when_stopping():
    with live_server() as running, running.client() as client:
        running.app.state.engine.stop_accepting()
        response = client.post("/generate", json={"prompt": "Question: A train", "rank": 2, "max_new_tokens": 4})
        assert response.status_code == 503, response.text
        samples = scrape(client)
    assert sample(samples, "matlora_requests_total", rank="2", outcome="rejected") == 1
    assert sample(samples, "matlora_requests_total", rank="16", outcome="rejected") == 0
