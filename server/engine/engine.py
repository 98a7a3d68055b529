"""The continuous-batching engine: one thread runs steps of admit → prefill → decode → retire.

Requests join the running batch between decode steps and leave as soon as they finish. Each row keeps its own
rank: every forward hands the Matryoshka layers the per-row diagonals, and the LoRA work stops at the largest
rank in the step. The engine imports no web framework; the server submits requests and receives their outputs
through each request's ``sink``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedTokenizerBase

from matlora_core import MatryoshkaModel

from .detokenizer import IncrementalDetokenizer
from .kv_cache import SlotKVCache
from .model_runner import ModelRunner
from .request import FinishReason, Request, RequestOutput
from .sampling import sample_tokens
from .scheduler import AdmissionHook, Scheduler, SchedulerConfig, prefill_chunks
from .stats import EngineObserver, StepStats, tokens_by_rank
from .tensor_thread import TensorThread

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


class Engine:
    def __init__(
        self,
        model: MatryoshkaModel,
        tokenizer: PreTrainedTokenizerBase,
        config: SchedulerConfig,
        observers: Sequence[EngineObserver] = (),
        admission_hook: AdmissionHook | None = None,
        inference_rule: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.observers = list(observers)
        text_config = model.base_model.config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=text_config.num_hidden_layers, num_kv_heads=text_config.num_key_value_heads,
            head_dim=head_dim, max_slots=config.max_num_seqs, max_model_len=config.max_model_len,
            dtype=model.dtype, device=model.device,
        )
        model.pack_for_inference()       # one matrix product for W0·x and A·x in every adapted layer
        self.runner = ModelRunner(model, self.cache, inference_rule)
        self.scheduler = Scheduler(config, admission_hook)
        self.eos_token_ids = self._eos_token_ids()
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

        self._condition = threading.Condition()
        self._inbox: list[Request] = []
        self._cancelled: set[str] = set()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop_done: concurrent.futures.Future | None = None
        self.steps = 0
        # Final outputs held back while a forward's results are processed, or None outside _finals_after_stats.
        self._held_finals: list[tuple[Request, RequestOutput]] | None = None

    def _eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.base_model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        return {i for i in ids if i is not None}

    # --- the API used by the server (any thread) ---------------------------------------------------------

    def start(self, tensor_thread: "TensorThread | None" = None) -> None:
        """Run the step loop on ``tensor_thread`` (the thread that loaded the model), or on a new thread."""
        if tensor_thread is not None:
            self._loop_done = tensor_thread.submit(self._loop)
            return
        self._thread = threading.Thread(target=self._loop, name="matlora-engine", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None or self._loop_done is not None

    def submit(self, request: Request) -> None:
        """Queue a request; raise QueueFullError when the waiting queue is full, EngineStoppedError when stopping."""
        with self._condition:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and accepts no new requests")
            # Count requests not yet moved out of the inbox as waiting, so the bound is kept between steps.
            self.scheduler.ensure_room(pending=len(self._inbox))
            self._inbox.append(request)
            self._condition.notify()

    def cancel(self, request_id: str) -> None:
        """Cancel a waiting or running request; its slot is freed at the next step."""
        with self._condition:
            self._cancelled.add(request_id)
            self._condition.notify()

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def running_max_rank(self) -> int:
        """Return the largest rank in the running batch (0 when idle); read without locking, so approximate."""
        return max((r.rank for r in list(self.scheduler.running)), default=0)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def is_idle(self) -> bool:
        with self._condition:
            return not self._inbox and not self.scheduler.waiting and not self.scheduler.running

    def stop_accepting(self) -> None:
        with self._condition:
            self._accepting = False

    def shutdown(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting, let running requests finish for up to ``grace_seconds``, cancel the rest, then stop."""
        self.stop_accepting()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and not self.is_idle():
            time.sleep(0.02)
        with self._condition:
            remaining = [r.request_id for r in (*self._inbox, *self.scheduler.waiting, *self.scheduler.running)
                         if not r.finished]
            self._cancelled.update(remaining)
            self._stop = True
            self._condition.notify()
        if remaining:
            logger.warning("shutdown: cancelling %d unfinished requests after %.1f s grace", len(remaining),
                           grace_seconds)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._loop_done is not None:
            self._loop_done.result(timeout=30)

    # --- the engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        logger.info("engine started: max_num_seqs=%d max_model_len=%d max_cached_tokens=%d",
                    self.config.max_num_seqs, self.config.max_model_len, self.config.max_cached_tokens)
        while True:
            with self._condition:
                while not (self._inbox or self._cancelled or self.scheduler.waiting or self.scheduler.running
                           or self._stop):
                    self._condition.wait(timeout=1.0)
                if self._stop and not self._cancelled and not self._inbox and not self.scheduler.running \
                        and not self.scheduler.waiting:
                    break
            try:
                self.step()
            except Exception as error:  # an engine bug: fail every request in flight, keep serving
                logger.exception("engine step failed; failing %d running requests", len(self.scheduler.running))
                for request in self.scheduler.running:
                    self._finish(request, FinishReason.ERROR, f"engine step failed: {type(error).__name__}")
                self._retire()
        logger.info("engine stopped after %d steps", self.steps)

    def step(self) -> None:
        """Run one engine step: admit → prefill the newcomers → decode every running row → retire."""
        self._take_inbox()
        self._expire(time.monotonic())

        newcomers = self.scheduler.admit()
        if newcomers:
            self._prefill(newcomers)
            self._retire()

        if self.scheduler.running:
            self._decode()
            self._retire()
        self.steps += 1

    # --- phases ----------------------------------------------------------------------------------------

    def _take_inbox(self) -> None:
        with self._condition:
            inbox, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, set()
        for request in inbox:
            self.scheduler.waiting.append(request)
        if cancelled:
            for request in (*self.scheduler.waiting, *self.scheduler.running):
                if request.request_id in cancelled and not request.finished:
                    request.cancelled = True
                    self._finish(request, FinishReason.CANCELLED)
            self._drop_finished_waiting()

    def _expire(self, now: float) -> None:
        for request in (*self.scheduler.waiting, *self.scheduler.running):
            if request.deadline is not None and now > request.deadline and not request.finished:
                self._finish(request, FinishReason.TIMEOUT, "request timed out")
        self._drop_finished_waiting()
        self._retire()

    def _drop_finished_waiting(self) -> None:
        if any(r.finished for r in self.scheduler.waiting):
            kept = [r for r in self.scheduler.waiting if not r.finished]
            self.scheduler.waiting.clear()
            self.scheduler.waiting.extend(kept)

    def _prefill(self, newcomers: list[Request]) -> None:
        first_slot = len(self.scheduler.running) - len(newcomers)
        now = time.monotonic()
        for request in newcomers:
            request.scheduled_time = now
            self.detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer, request)
        self.cache.ensure_capacity(max(r.num_reserved_tokens for r in self.scheduler.running))

        started = time.perf_counter()
        ranks = [r.rank for r in newcomers]
        logits: list[torch.Tensor | None] = []
        for chunk in prefill_chunks([r.num_prompt_tokens for r in newcomers]):
            logits += self._prefill_forward(first_slot + chunk.start, newcomers[chunk])
        with self._finals_after_stats():
            generated = self._process(newcomers, logits)
            self._notify_step(StepStats(
                phase="prefill", seconds=time.perf_counter() - started, batch_size=len(newcomers), ranks=ranks,
                max_rank=max(ranks), prompt_tokens=tokens_by_rank(newcomers), generated_tokens=generated,
            ))

    def _prefill_forward(self, first_slot: int, requests: list[Request]) -> list[torch.Tensor | None]:
        prompts = [r.prompt_token_ids for r in requests]
        ranks = [r.rank for r in requests]
        return self._forward_isolated(
            requests,
            lambda: self.runner.prefill(first_slot, prompts, ranks),
            lambda i: self.runner.prefill(first_slot + i, [prompts[i]], [ranks[i]]),
        )

    def _decode(self) -> None:
        running = self.scheduler.running
        started = time.perf_counter()
        tokens = [r.output_token_ids[-1] for r in running]
        ranks = [r.rank for r in running]
        logits = self._forward_isolated(
            running,
            lambda: self.runner.decode(tokens, ranks),
            lambda i: self.runner.decode_rows([i], [tokens[i]], [ranks[i]]),
        )
        with self._finals_after_stats():
            generated = self._process(running, logits)
            self._notify_step(StepStats(
                phase="decode", seconds=time.perf_counter() - started, batch_size=len(running), ranks=ranks,
                max_rank=max(ranks), generated_tokens=generated,
            ))

    def _forward_isolated(self, requests, batched, single) -> list[torch.Tensor | None]:
        """Run the batched forward; if it raises, run each row alone so one bad request fails alone."""
        try:
            return list(batched())
        except Exception:
            logger.exception("batched forward of %d rows failed; retrying each row alone", len(requests))
        rows: list[torch.Tensor | None] = []
        for index, request in enumerate(requests):
            try:
                rows.append(single(index)[0])
            except Exception as error:
                logger.exception("request %s failed in the forward", request.request_id)
                self._finish(request, FinishReason.ERROR, f"model forward failed: {type(error).__name__}")
                rows.append(None)
        return rows

    def _process(self, requests: list[Request], logits: list[torch.Tensor | None]) -> dict[int, int]:
        """Sample, detokenize, check stops and stream the new text of each row; return tokens per rank."""
        active = [(r, row) for r, row in zip(requests, logits) if row is not None and not r.finished]
        generated: dict[int, int] = {}
        if not active:
            return generated
        batch = torch.stack([row for _, row in active])
        # NaN or +inf anywhere, or no finite logit at all, means the row is broken; a -inf logit alone only
        # masks a token out.
        finite = ~(torch.isnan(batch).any(-1) | torch.isposinf(batch).any(-1) | torch.isneginf(batch).all(-1))
        finite = finite.tolist()
        tokens = self._sample_isolated(torch.nan_to_num(batch), [r for r, _ in active])
        now = time.monotonic()
        for (request, _), token, is_finite in zip(active, tokens, finite):
            if not is_finite:
                self._finish(request, FinishReason.ERROR, "the model produced NaN or inf logits")
                continue
            if token is None:
                continue
            try:
                self._append_token(request, token, now)
            except Exception as error:
                logger.exception("request %s failed while processing its output", request.request_id)
                self._finish(request, FinishReason.ERROR, f"output processing failed: {type(error).__name__}")
                continue
            generated[request.rank] = generated.get(request.rank, 0) + 1
        return generated

    def _sample_isolated(self, logits: torch.Tensor, requests: list[Request]) -> list[int | None]:
        """Sample every row; if that raises, sample each row alone so one bad request fails alone (None)."""
        try:
            return sample_tokens(logits, requests)
        except Exception:
            logger.exception("sampling %d rows failed; retrying each row alone", len(requests))
        tokens: list[int | None] = []
        for row, request in enumerate(requests):
            try:
                tokens.append(sample_tokens(logits[row:row + 1], [request])[0])
            except Exception as error:
                logger.exception("request %s failed in sampling", request.request_id)
                self._finish(request, FinishReason.ERROR, f"sampling failed: {type(error).__name__}")
                tokens.append(None)
        return tokens

    def _append_token(self, request: Request, token: int, now: float) -> None:
        if request.first_token_time is None:
            request.first_token_time = now
        detokenizer = self.detokenizers[request.request_id]
        is_eos = token in self.eos_token_ids and not request.sampling.ignore_eos
        if is_eos:
            request.output_token_ids.append(token)
            self._finish(request, FinishReason.STOP)
            return
        hit_stop = detokenizer.append(token)
        if hit_stop:
            self._finish(request, FinishReason.STOP)
        elif len(request.output_token_ids) >= request.sampling.max_tokens:
            self._finish(request, FinishReason.LENGTH)
        else:
            text = detokenizer.sendable_text(finished=False)
            if text:
                request.sink(RequestOutput(request.request_id, text, [token], rank=request.rank, request=request))

    def _finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """Mark a request finished and send its last text and final event; the slot is freed by _retire."""
        if request.finished:
            return
        request.finish_reason = reason
        request.error = error
        request.finish_time = time.monotonic()
        detokenizer = self.detokenizers.pop(request.request_id, None)
        text = detokenizer.sendable_text(finished=True) if detokenizer and reason != FinishReason.ERROR else ""
        output = RequestOutput(request.request_id, text, [], rank=request.rank, finished=True,
                               finish_reason=reason, error=error, request=request)
        if self._held_finals is not None:
            self._held_finals.append((request, output))
        else:
            self._send_final(request, output)

    def _send_final(self, request: Request, output: RequestOutput) -> None:
        # Observers first, so a client that has its final output also finds the request in the metrics.
        for observer in self.observers:
            try:
                observer.on_request_finished(request)
            except Exception:
                logger.exception("request %s: finish observer %s failed", request.request_id, type(observer).__name__)
        try:
            request.sink(output)
        except Exception:
            logger.exception("request %s: delivering the final output failed", request.request_id)

    @contextmanager
    def _finals_after_stats(self) -> Iterator[None]:
        """Hold the final outputs of a forward until its StepStats reach the observers, then send them.

        Without this, a client could read /metrics after its response but before its last tokens were counted.
        """
        self._held_finals = []
        try:
            yield
        finally:
            held, self._held_finals = self._held_finals, None
            for request, output in held:
                self._send_final(request, output)

    def _retire(self) -> None:
        before = len(self.scheduler.running)
        self.scheduler.remove_finished(self.cache.move_slot)
        for slot in range(len(self.scheduler.running), before):
            self.cache.lengths[slot] = 0

    def _notify_step(self, stats: StepStats) -> None:
        for observer in self.observers:
            try:
                observer.on_step(stats, self)
            except Exception:
                logger.exception("step observer %s failed", type(observer).__name__)
