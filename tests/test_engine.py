"""The continuous-batching engine on the tiny model: joins, leaves, mixed ranks, stops, sampling and faults."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from matlora_server.engine import (Engine, FinishReason, QueueFullError, RankReason, Request, SamplingParams,
                                   SchedulerConfig)
from matlora_server.engine.scheduler import PREFILL_LENGTH_RATIO, Scheduler, prefill_chunks

from .live_server import tiny_components

PROMPTS = ["Question: Tom has 3 apples", "The quick brown", "Matryoshka adapters serve every nested rank",
           "A train travels 60 miles", "0123456789 + - * /", "How many apples does he have?"]


@pytest.fixture(scope="module")
def components():
    return tiny_components()


class Collector:
    """Collects the outputs of submitted requests and waits for them to finish."""

    def __init__(self) -> None:
        self.outputs: dict[str, list] = {}
        self.done: dict[str, Request] = {}
        self.finished_order: list[str] = []
        self._lock = threading.Lock()

    def sink(self, output) -> None:
        with self._lock:
            self.outputs.setdefault(output.request_id, []).append(output)
            if output.finished:
                self.done[output.request_id] = output.request
                self.finished_order.append(output.request_id)

    def wait(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.done) < count:
            assert time.monotonic() < deadline, f"only {len(self.done)} of {count} requests finished"
            time.sleep(0.005)

    def text(self, request_id: str) -> str:
        return "".join(o.text for o in self.outputs[request_id])


def make_request(components, collector, index, prompt, rank, **sampling) -> Request:
    ids = components.tokenizer(prompt)["input_ids"]
    params = SamplingParams(**{"max_tokens": 12, "ignore_eos": True, **sampling})
    return Request(f"r{index}", ids, params, rank, RankReason.EXPLICIT, sink=collector.sink)


def reference_tokens(components, prompt: str, rank: int, count: int) -> list[int]:
    """Greedy tokens of transformers' own generate at one rank, the reference for the engine."""
    model, tokenizer = components.model, components.tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), model.at_rank(rank):
        output = model.base_model.generate(ids, max_new_tokens=count, do_sample=False, eos_token_id=None,
                                           pad_token_id=tokenizer.pad_token_id)
    return output[0, ids.shape[1]:].tolist()


def started_engine(components, **limits) -> Engine:
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_model_len": 128, "max_cached_tokens": 1024, **limits})
    engine = Engine(components.model, components.tokenizer, config)
    engine.start()
    return engine


def test_mixed_rank_batch_matches_single_runs(components):
    collector = Collector()
    engine = started_engine(components)
    ranks = [0, 16, 4, 8, 2, 1]
    try:
        for index, (prompt, rank) in enumerate(zip(PROMPTS, ranks)):
            engine.submit(make_request(components, collector, index, prompt, rank, max_tokens=10 + index))
        collector.wait(len(ranks))
    finally:
        engine.shutdown()
    for index, (prompt, rank) in enumerate(zip(PROMPTS, ranks)):
        request = collector.done[f"r{index}"]
        assert request.finish_reason == FinishReason.LENGTH
        assert request.output_token_ids == reference_tokens(components, prompt, rank, 10 + index), f"rank {rank}"


def test_requests_join_and_leave_mid_batch(components):
    collector = Collector()
    engine = started_engine(components)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[0], 16, max_tokens=60))
        while not collector.outputs.get("r0"):
            time.sleep(0.002)
        engine.submit(make_request(components, collector, 1, PROMPTS[1], 4, max_tokens=3))
        engine.submit(make_request(components, collector, 2, PROMPTS[2], 0, max_tokens=5))
        collector.wait(3)
    finally:
        engine.shutdown()
    # the short newcomers joined a running batch and left before the long request finished
    assert collector.finished_order[-1] == "r0"
    assert collector.done["r0"].first_token_time < collector.done["r1"].scheduled_time
    for index, (rank, count) in enumerate([(16, 60), (4, 3), (0, 5)]):
        assert collector.done[f"r{index}"].output_token_ids == reference_tokens(components, PROMPTS[index], rank,
                                                                                 count)


def test_slots_are_reused_after_leaving(components):
    collector = Collector()
    engine = started_engine(components, max_num_seqs=2, max_cached_tokens=256)
    try:
        for index in range(6):
            engine.submit(make_request(components, collector, index, PROMPTS[index], [0, 4, 16][index % 3],
                                       max_tokens=4))
        collector.wait(6)
    finally:
        engine.shutdown()
    for index in range(6):
        rank = [0, 4, 16][index % 3]
        assert collector.done[f"r{index}"].output_token_ids == reference_tokens(components, PROMPTS[index], rank, 4)
    assert engine.num_running() == 0
    assert engine.scheduler.reserved_tokens == 0


def test_stop_string_cuts_output(components):
    collector = Collector()
    engine = started_engine(components)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[1], 0, max_tokens=30))
        collector.wait(1)
        full = collector.done["r0"].output_text
        stop = full[len(full) // 2: len(full) // 2 + 2]
        engine.submit(make_request(components, collector, 1, PROMPTS[1], 0, max_tokens=30, stop=(stop,)))
        collector.wait(2)
    finally:
        engine.shutdown()
    stopped = collector.done["r1"]
    assert stopped.finish_reason == FinishReason.STOP
    assert stopped.output_text == full[: full.index(stop)]
    assert collector.text("r1") == stopped.output_text   # streamed chunks never include the stop string


def test_seeded_sampling_is_reproducible_across_batches(components):
    collector = Collector()
    engine = started_engine(components)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[0], 4, temperature=0.9, top_p=0.9, seed=7))
        collector.wait(1)
        for index in range(1, 4):
            engine.submit(make_request(components, collector, index, PROMPTS[index - 1], [4, 16, 0][index - 1],
                                       temperature=0.9, top_p=0.9, seed=7))
        collector.wait(4)
    finally:
        engine.shutdown()
    assert collector.done["r0"].output_token_ids == collector.done["r1"].output_token_ids


def test_top_k_one_is_greedy(components):
    collector = Collector()
    engine = started_engine(components)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[2], 8, temperature=1.0, top_k=1, seed=3))
        collector.wait(1)
    finally:
        engine.shutdown()
    assert collector.done["r0"].output_token_ids == reference_tokens(components, PROMPTS[2], 8, 12)


def test_queue_full_raises(components):
    collector = Collector()
    engine = Engine(components.model, components.tokenizer,
                    SchedulerConfig(max_num_seqs=1, max_model_len=128, max_cached_tokens=256, max_waiting=2))
    # not started: submissions pile up in the inbox
    engine.submit(make_request(components, collector, 0, PROMPTS[0], 0))
    engine.submit(make_request(components, collector, 1, PROMPTS[0], 0))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        engine.submit(make_request(components, collector, 2, PROMPTS[0], 0))


def test_cancel_frees_the_slot(components):
    collector = Collector()
    engine = started_engine(components, max_num_seqs=1, max_cached_tokens=256)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[0], 4, max_tokens=100))
        while not collector.outputs.get("r0"):
            time.sleep(0.002)
        engine.submit(make_request(components, collector, 1, PROMPTS[1], 4, max_tokens=3))
        engine.cancel("r0")
        collector.wait(2)
    finally:
        engine.shutdown()
    assert collector.done["r0"].finish_reason == FinishReason.CANCELLED
    assert len(collector.done["r0"].output_token_ids) < 100
    assert collector.done["r1"].finish_reason == FinishReason.LENGTH


def test_deadline_times_out(components):
    collector = Collector()
    engine = started_engine(components)
    try:
        request = make_request(components, collector, 0, PROMPTS[0], 4, max_tokens=100)
        request.deadline = time.monotonic() - 1
        engine.submit(request)
        collector.wait(1)
    finally:
        engine.shutdown()
    assert collector.done["r0"].finish_reason == FinishReason.TIMEOUT


def test_failing_row_does_not_harm_the_batch(components, monkeypatch):
    """A forward that fails for one request's rows fails that request alone; the others finish normally."""
    collector = Collector()
    engine = started_engine(components)
    poison = components.tokenizer("0123456789")["input_ids"][0]
    original = engine.runner.decoder.forward

    def failing_forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and bool((input_ids == poison).any()) and input_ids.shape[1] > 1:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.runner.decoder, "forward", failing_forward)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[0], 4, max_tokens=5))
        engine.submit(make_request(components, collector, 1, "0123456789", 4, max_tokens=5))
        engine.submit(make_request(components, collector, 2, PROMPTS[2], 16, max_tokens=5))
        collector.wait(3)
    finally:
        engine.shutdown()
    assert collector.done["r1"].finish_reason == FinishReason.ERROR
    assert "RuntimeError" in collector.done["r1"].error
    for index, rank in ((0, 4), (2, 16)):
        request = collector.done[f"r{index}"]
        assert request.finish_reason == FinishReason.LENGTH
        assert request.output_token_ids == reference_tokens(components, PROMPTS[index], rank, 5)


def test_nan_logits_fail_the_request(components, monkeypatch):
    collector = Collector()
    engine = started_engine(components)
    original = engine.runner.decode

    def nan_decode(tokens, ranks):
        logits = original(tokens, ranks)
        return torch.full_like(logits, float("nan"))

    monkeypatch.setattr(engine.runner, "decode", nan_decode)
    try:
        engine.submit(make_request(components, collector, 0, PROMPTS[0], 4, max_tokens=5))
        collector.wait(1)
    finally:
        engine.shutdown()
    request = collector.done["r0"]
    assert request.finish_reason == FinishReason.ERROR
    assert "NaN" in request.error
    assert len(request.output_token_ids) == 1   # the prefill token was fine; no garbage after it


def test_admission_respects_token_budget(components):
    collector = Collector()
    engine = Engine(components.model, components.tokenizer,
                    SchedulerConfig(max_num_seqs=8, max_model_len=64, max_cached_tokens=64))
    for index in range(3):
        engine.submit(make_request(components, collector, index, PROMPTS[0], 0, max_tokens=20))
    engine._take_inbox()
    admitted = engine.scheduler.admit()
    # each request reserves its prompt plus 20 tokens, so only two fit in 64 cached tokens
    assert len(admitted) == 2
    assert engine.scheduler.reserved_tokens <= 64
    assert len(engine.scheduler.waiting) == 1


def test_shutdown_finishes_running_requests(components):
    collector = Collector()
    engine = started_engine(components)
    engine.submit(make_request(components, collector, 0, PROMPTS[0], 4, max_tokens=20))
    engine.shutdown(grace_seconds=30)
    assert collector.done["r0"].finish_reason == FinishReason.LENGTH
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(make_request(components, collector, 1, PROMPTS[0], 4))


def test_engine_packs_adapter_layers(components):
    Engine(components.model, components.tokenizer, SchedulerConfig(max_num_seqs=2, max_model_len=64))
    assert all(layer.is_packed() for layer in components.model.matryoshka_layers.values())


@pytest.mark.parametrize("lengths", [[5], [10, 10, 10], [32, 41, 50, 60, 64, 77, 100, 116], [1, 2, 3, 4, 200]])
def test_prefill_chunks_bound_padding(lengths):
    chunks = prefill_chunks(lengths)
    assert [i for chunk in chunks for i in range(len(lengths))[chunk]] == list(range(len(lengths)))
    for chunk in chunks:
        part = lengths[chunk]
        assert max(part) <= PREFILL_LENGTH_RATIO * min(part)
    if len(set(lengths)) == 1:
        assert len(chunks) == 1


def test_admission_sorts_newcomers_by_prompt_length(components):
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_model_len=128, max_cached_tokens=1024))
    collector = Collector()
    for index, prompt in enumerate(["a much longer prompt than the others", "short", "medium prompt"]):
        scheduler.waiting.append(make_request(components, collector, index, prompt, 0))
    admitted = scheduler.admit()
    lengths = [r.num_prompt_tokens for r in admitted]
    assert lengths == sorted(lengths)
    assert scheduler.running == admitted
