"""Every Prometheus metric of the server, in one place.

Names carry the ``matlora_`` prefix and a unit suffix. The ``rank`` label takes only the adapter's offered ranks
(0 included) and every label combination is created at start-up, so dashboards show zeros instead of gaps.
Request ids are never labels.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .engine import FinishReason, RankReason, Request, StepStats

OUTCOMES = ("stopped", "length", "cancelled", "timeout", "rejected", "error")
OUTCOME_BY_REASON = {
    FinishReason.STOP: "stopped",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.TIMEOUT: "timeout",
    FinishReason.ERROR: "error",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
                   60.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5,
                         1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class ServerMetrics:
    """The metrics of one server instance, registered in their own registry; also an engine observer."""

    def __init__(self, offered_ranks: Sequence[int], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.ranks = [str(r) for r in sorted(set(offered_ranks) | {0})]
        r = self.registry

        self.generation_tokens = Counter("matlora_generation_tokens", "Output tokens generated, by rank.",
                                         ["rank"], registry=r)
        self.prompt_tokens = Counter("matlora_prompt_tokens", "Prompt tokens prefilled, by rank.", ["rank"],
                                     registry=r)
        self.requests = Counter("matlora_requests", "Requests by rank and outcome: stopped (end-of-sequence or "
                                "stop string), length, cancelled, timeout, rejected or error.",
                                ["rank", "outcome"], registry=r)
        self.rank_choices = Counter("matlora_rank_choices", "Requests by rank and how the rank was chosen: "
                                    "explicit, latency_budget, budget_unmet, default or lowered_under_load.",
                                    ["rank", "reason"], registry=r)
        self.time_to_first_token = Histogram("matlora_time_to_first_token_seconds",
                                             "Time from arrival to the first output token, by rank.", ["rank"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("matlora_time_per_output_token_seconds",
                                               "Mean time per output token after the first, by rank.", ["rank"],
                                               buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("matlora_e2e_request_latency_seconds",
                                     "Time from arrival to the last output token, by rank.", ["rank"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("matlora_request_queue_time_seconds",
                                    "Time a request waited before its prefill, by rank.", ["rank"],
                                    buckets=LATENCY_BUCKETS, registry=r)

        self.running = Gauge("matlora_num_requests_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("matlora_num_requests_waiting", "Requests waiting for a KV cache slot.", registry=r)
        self.kv_cache_usage = Gauge("matlora_kv_cache_usage_ratio",
                                    "Share of max_cached_tokens reserved by running sequences (0 to 1).", registry=r)
        self.batch_size = Histogram("matlora_batch_size", "Rows per forward, by phase (prefill or decode).",
                                    ["phase"], buckets=BATCH_BUCKETS, registry=r)
        self.distinct_ranks = Histogram("matlora_distinct_ranks_per_step", "Distinct ranks in one decode step.",
                                        buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16), registry=r)
        self.step_duration = Histogram("matlora_step_duration_seconds",
                                       "Duration of one forward, by phase and the largest rank in it.",
                                       ["phase", "max_rank"], buckets=LATENCY_BUCKETS, registry=r)
        self.info = Info("matlora_adapter", "Base model, adapter and offered ranks of this server.", registry=r)
        self.rank_quality = Gauge("matlora_rank_quality", "Measured quality of each rank from the adapter's "
                                  "profile (metric label: answer_loss in nats, accuracy from 0 to 1).",
                                  ["rank", "metric"], registry=r)
        self.rank_latency_estimate = Gauge("matlora_rank_latency_estimate_seconds",
                                           "Predicted seconds per output token at each rank for a request "
                                           "joining the current batch.", ["rank"], registry=r)
        self._initialise_labels()

    def _initialise_labels(self) -> None:
        for rank in self.ranks:
            self.generation_tokens.labels(rank)
            self.prompt_tokens.labels(rank)
            for outcome in OUTCOMES:
                self.requests.labels(rank, outcome)
            for reason in RankReason:
                self.rank_choices.labels(rank, reason.value)
            for histogram in (self.time_to_first_token, self.time_per_output_token, self.e2e_latency,
                              self.queue_time):
                histogram.labels(rank)
            for phase in ("prefill", "decode"):
                self.step_duration.labels(phase, rank)
        for phase in ("prefill", "decode"):
            self.batch_size.labels(phase)

    # --- set-up and scrape-time values ----------------------------------------------------------------

    def describe_server(self, model: str, adapter: str, inference_rule: str, dtype: str,
                        quality: dict[int, dict[str, float]]) -> None:
        self.info.info({"model": model, "adapter": adapter, "offered_ranks": ",".join(self.ranks),
                        "inference_rule": inference_rule, "dtype": dtype})
        for rank, metrics in quality.items():
            if str(rank) in self.ranks:
                for name, value in metrics.items():
                    self.rank_quality.labels(str(rank), name).set(value)

    def bind_engine(self, engine, policy) -> None:
        """Read queue sizes, cache use and latency estimates from the engine at scrape time."""
        self.running.set_function(engine.num_running)
        self.waiting.set_function(engine.num_waiting)
        self.kv_cache_usage.set_function(engine.scheduler.kv_cache_usage)
        for rank in self.ranks:
            def estimate(rank: int = int(rank)) -> float:
                seconds = policy.predict_time_per_token(rank, engine.num_running(), engine.running_max_rank())
                return float("nan") if seconds is None else seconds
            self.rank_latency_estimate.labels(str(rank)).set_function(estimate)

    # --- events ----------------------------------------------------------------------------------------

    def record_rejected(self, rank: int | None) -> None:
        """Count a request refused before it reached the engine (queue full, shutting down)."""
        label = str(rank) if rank is not None and str(rank) in self.ranks else self.ranks[0]
        self.requests.labels(label, "rejected").inc()

    def on_step(self, stats: StepStats, engine) -> None:
        self.batch_size.labels(stats.phase).observe(stats.batch_size)
        self.step_duration.labels(stats.phase, str(stats.max_rank)).observe(stats.seconds)
        if stats.phase == "decode":
            self.distinct_ranks.observe(len(set(stats.ranks)))
        for rank, count in stats.generated_tokens.items():
            self.generation_tokens.labels(str(rank)).inc(count)
        for rank, count in stats.prompt_tokens.items():
            self.prompt_tokens.labels(str(rank)).inc(count)

    def on_request_finished(self, request: Request) -> None:
        rank = str(request.rank)
        self.requests.labels(rank, OUTCOME_BY_REASON[request.finish_reason]).inc()
        self.rank_choices.labels(rank, request.rank_reason.value).inc()
        timings = request.timings()
        for histogram, key in ((self.queue_time, "queue_seconds"),
                               (self.time_to_first_token, "time_to_first_token_seconds"),
                               (self.time_per_output_token, "time_per_output_token_seconds"),
                               (self.e2e_latency, "e2e_seconds")):
            if timings[key] is not None:
                histogram.labels(rank).observe(timings[key])
