"""Native routes: POST /generate (plain or streamed), GET /health, GET /v1/ranks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import RequestOutput
from ..generation import GenerationService, final_error, timings_of, usage_of
from .errors import APIError, error_body
from .schemas import (ErrorResponse, GenerateRequest, GenerateResponse, GenerateStreamEvent, HealthResponse,
                      RankProfileEntry, RanksResponse)

router = APIRouter()
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 500, 503, 504)}
# With "stream": true a generation route responds 200 with server-sent events instead of one JSON body. As
# OpenAPI 3.1 has no item schema for streams, the schema describes one event.
STREAM_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a JSON chunk, or [DONE] after the last one"}}}
STREAMED = {200: {"content": {"text/event-stream": {"schema": STREAM_EVENT}}}}


def service_of(request: Request) -> GenerationService:
    return request.app.state.service


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@router.post("/generate", response_model=GenerateResponse, responses={**ERRORS, **STREAMED},
             summary="Generate text at a rank chosen per request")
async def generate(body: GenerateRequest, request: Request):
    service = service_of(request)
    prompt = service.tokenize_prompt(body.prompt)
    sampling = service.sampling_params(body, body.max_new_tokens, "max_new_tokens", prompt)
    outputs = service.run(request, body, prompt, sampling)

    if body.stream:
        first = await first_output(outputs)
        return StreamingResponse(stream_generate(first, outputs), media_type="text/event-stream",
                                 headers={"X-Request-ID": request.state.request_id})

    text = []
    async for output in outputs:
        text.append(output.text)
        if output.finished:
            error = final_error(output)
            if error is not None:
                raise error
            finished = output.request
            return GenerateResponse(
                id=finished.request_id, text="".join(text), rank=finished.rank,
                rank_reason=finished.rank_reason.value, requested_rank=finished.requested_rank,
                finish_reason=finished.finish_reason.value, usage=usage_of(finished), timings=timings_of(finished),
            )
    raise APIError(499, "the client disconnected before the request finished")


async def first_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Submit the request and wait for its first output, so a full queue (429) or a request that fails before any
    text (500) gets its HTTP status instead of a 200 stream that carries the error."""
    output = await anext(outputs, None)
    if output is None:
        raise APIError(499, "the client disconnected before the request finished")
    error = final_error(output) if output.finished else None
    if error is not None:
        raise error
    return output


async def stream_generate(first, outputs: AsyncIterator) -> AsyncIterator[str]:
    output = first
    while True:
        if output.finished:
            error = final_error(output)
            if error is not None:
                yield sse(error_body(error.status, error.message, error.error_type, None, output.request_id))
                return
            finished = output.request
            yield sse(GenerateStreamEvent(
                id=output.request_id, text=output.text, rank=finished.rank, finished=True,
                finish_reason=finished.finish_reason.value, rank_reason=finished.rank_reason.value,
                usage=usage_of(finished), timings=timings_of(finished)).model_dump(exclude_none=True))
            yield sse("[DONE]")
            return
        if output.text:
            yield sse({"id": output.request_id, "text": output.text, "rank": output.rank, "finished": False})
        try:
            output = await anext(outputs)
        except StopAsyncIteration:
            return


@router.get("/health", response_model=HealthResponse, summary="Liveness and queue sizes")
async def health(request: Request) -> HealthResponse:
    state = request.app.state
    return HealthResponse(status="shutting_down" if state.shutting_down else "ok", model=state.model_name,
                          adapter=state.adapter_name, running=state.engine.num_running(),
                          waiting=state.engine.num_waiting())


@router.get("/v1/ranks", response_model=RanksResponse, summary="Offered ranks: measured quality and latency")
async def ranks(request: Request) -> RanksResponse:
    state = request.app.state
    config = state.adapter_config
    policy = state.policy
    running, running_max = state.engine.num_running(), state.engine.running_max_rank()
    entries = []
    for rank in policy.offered:
        seconds = policy.predict_time_per_token(rank, running, running_max)
        entries.append(RankProfileEntry(
            rank=rank, quality=config.quality(rank), quality_metric=config.quality_metric,
            metrics=config.profile.get(rank, {}),
            latency_estimate_ms=None if seconds is None else round(seconds * 1000, 3),
            is_default=rank == policy.default_rank,
        ))
    return RanksResponse(inference_rule=config.inference_rule, default_rank=policy.default_rank, data=entries)
