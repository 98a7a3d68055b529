"""Turns an API request into an engine request and streams its outputs back to the event loop.

This is where prompts are tokenized and checked against the limits, the rank is chosen, and a client that goes
away has its generation cancelled. It does no tensor work: the engine thread does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request as HTTPRequest
from jinja2 import TemplateError

from .api.errors import APIError
from .api.schemas import SamplingFields, Timings, Usage
from .config import ServerSettings
from .engine import (Engine, EngineStoppedError, FinishReason, QueueFullError, Request, RequestOutput,
                     SamplingParams)
from .metrics import ServerMetrics
from .rank_policy import NoLatencyProfileError, RankError, RankPolicy

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    field: str          # the request field the prompt came from, for error messages


class GenerationService:
    def __init__(self, engine: Engine, tokenizer, policy: RankPolicy, settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.policy = policy
        self.settings = settings
        self.metrics = metrics

    # --- preparing a request -------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str, field: str = "prompt") -> PreparedPrompt:
        check_encodable(prompt, field)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self._checked(ids, field)

    def tokenize_chat(self, messages: list[dict[str, str]]) -> PreparedPrompt:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions or /generate",
                           param="messages")
        for index, message in enumerate(messages):
            check_encodable(message["content"], f"messages.{index}.content")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as error:
            # Some chat templates raise on message orders or roles they do not support.
            raise APIError(422, f"messages: the model's chat template rejected the messages: {error}",
                           param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return self._checked(list(ids), "messages")

    def _checked(self, ids: list[int], field: str) -> PreparedPrompt:
        limit = self.settings.max_prompt_tokens
        if not ids:
            raise APIError(422, f"{field}: the prompt encodes to 0 tokens; send a non-empty prompt", param=field)
        if len(ids) > limit:
            raise APIError(422, f"{field}: the prompt has {len(ids)} tokens, more than max_prompt_tokens={limit}",
                           param=field)
        return PreparedPrompt(token_ids=list(ids), field=field)

    def sampling_params(self, fields: SamplingFields, max_tokens: int | None, max_tokens_field: str,
                        prompt: PreparedPrompt) -> SamplingParams:
        settings = self.settings
        if max_tokens is None:
            max_tokens = settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise APIError(422, f"{max_tokens_field}: {max_tokens} exceeds the limit of {settings.max_tokens_limit}",
                           param=max_tokens_field)
        room = settings.max_model_len - len(prompt.token_ids)
        if max_tokens > room:
            raise APIError(422, f"{max_tokens_field}: {max_tokens} output tokens do not fit after a "
                           f"{len(prompt.token_ids)}-token prompt within max_model_len={settings.max_model_len}; "
                           f"ask for at most {room}", param=max_tokens_field)
        stops = fields.stop_list()
        if len(stops) > settings.max_stop_strings:
            raise APIError(422, f"stop: {len(stops)} stop strings, more than the limit of {settings.max_stop_strings}",
                           param="stop")
        for stop in stops:
            if not stop or len(stop) > settings.max_stop_length:
                raise APIError(422, f"stop: stop string {stop[:80]!r} has {len(stop)} characters; allowed: 1 to "
                               f"{settings.max_stop_length}", param="stop")
        return SamplingParams(max_tokens=max_tokens, temperature=float(fields.temperature), top_p=float(fields.top_p),
                              top_k=fields.top_k, seed=fields.seed, stop=tuple(stops), ignore_eos=fields.ignore_eos)

    def build_request(self, http_request: HTTPRequest, fields: SamplingFields, prompt: PreparedPrompt,
                      sampling: SamplingParams, sink) -> Request:
        try:
            rank, reason = self.policy.choose(fields.rank, fields.latency_budget_ms, self.engine.num_running(),
                                              self.engine.running_max_rank())
        except RankError as error:
            raise APIError(422, f"rank: {error}", param="rank") from None
        except NoLatencyProfileError as error:
            raise APIError(422, f"latency_budget_ms: {error}", param="latency_budget_ms") from None
        return Request(
            request_id=http_request.state.request_id, prompt_token_ids=prompt.token_ids, sampling=sampling,
            rank=rank, rank_reason=reason, sink=sink, fixed_rank=fields.rank is not None,
            deadline=time.monotonic() + self.settings.request_timeout_s,
        )

    # --- running it --------------------------------------------------------------------------------------

    async def run(self, http_request: HTTPRequest, fields: SamplingFields, prompt: PreparedPrompt,
                  sampling: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit the request and yield its outputs; cancel it if the client disconnects or stops reading."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, output)

        request = self.build_request(http_request, fields, prompt, sampling, sink)
        self.submit(request)
        finished = False
        next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
        try:
            while True:
                try:
                    output = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    output = None
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + DISCONNECT_POLL_SECONDS
                    if await http_request.is_disconnected():
                        logger.info("request %s: client disconnected, cancelling", request.request_id)
                        return
                if output is None:
                    continue
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if not finished:
                self.engine.cancel(request.request_id)

    def submit(self, request: Request) -> None:
        try:
            self.engine.submit(request)
        except QueueFullError as error:
            self.metrics.record_rejected(request.rank)
            raise APIError(429, f"{error}; retry later", error_type="rate_limit_error",
                           headers={"Retry-After": str(self.retry_after_seconds())}) from None
        except EngineStoppedError as error:
            self.metrics.record_rejected(request.rank)
            raise APIError(503, str(error), error_type="unavailable_error", headers={"Retry-After": "5"}) from None

    def retry_after_seconds(self) -> int:
        """Estimate when a slot frees up: the waiting queue drained at one batch per mean request time."""
        waiting_batches = self.engine.num_waiting() / max(1, self.settings.max_num_seqs)
        return max(1, min(60, round(waiting_batches * 2)))


def check_encodable(text: str, field: str) -> None:
    """Reject text that UTF-8 cannot encode: JSON escapes can carry lone surrogates such as "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(422, f"{field}: invalid Unicode: lone surrogate {text[error.start]!r} at character "
                       f"{error.start}; send valid UTF-8 text", param=field) from None


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


def final_error(output: RequestOutput) -> APIError | None:
    """Map a failed final output to the HTTP error the client receives, or None for a normal finish."""
    reason = output.finish_reason
    if reason == FinishReason.TIMEOUT:
        return APIError(504, "the request timed out before it finished", error_type="timeout_error")
    if reason == FinishReason.ERROR:
        return APIError(500, f"generation failed: {output.error}", error_type="server_error")
    if reason == FinishReason.CANCELLED:
        return APIError(503, "the request was cancelled because the server is shutting down",
                        error_type="unavailable_error")
    return None


def usage_of(request: Request) -> Usage:
    completion = len(request.output_token_ids)
    return Usage(prompt_tokens=request.num_prompt_tokens, completion_tokens=completion,
                 total_tokens=request.num_prompt_tokens + completion)


def timings_of(request: Request) -> Timings:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    values = request.timings()
    return Timings(queue_ms=ms(values["queue_seconds"]), time_to_first_token_ms=ms(values["time_to_first_token_seconds"]),
                   time_per_output_token_ms=ms(values["time_per_output_token_seconds"]), e2e_ms=ms(values["e2e_seconds"]))
