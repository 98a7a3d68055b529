"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import RequestOutput
from ..generation import final_error, usage_of
from .errors import APIError, error_body
from .openai_schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                             ChatCompletionRequest, ChatCompletionResponse, ChatDelta, CompletionChoice,
                             CompletionRequest, CompletionResponse, ModelCard, ModelList, OpenAIFields)
from .routes import ERRORS, STREAMED, first_output, service_of, sse
from .schemas import ErrorResponse

router = APIRouter(prefix="/v1")
# 404: the request names a model this server does not serve.
OPENAI_RESPONSES = {**ERRORS, 404: {"model": ErrorResponse}, **STREAMED}


def check_model(request: Request, body: OpenAIFields) -> str:
    """Return the model id to report, and set rank 0 on a request that names the base model.

    A request naming a model this server does not serve gets 404. The adapter's id, or no model, leaves the
    rank to ``rank``, ``latency_budget_ms`` or the default.
    """
    state = request.app.state
    served = {state.model_name, state.adapter_name}
    if body.model is not None and body.model not in served:
        raise APIError(404, f"model: {body.model!r} is not served here; choose one of {sorted(served)}",
                       error_type="not_found_error", param="model")
    # When --served-model-name gives the base model the adapter's name, the id means the adapter.
    if body.model == state.model_name and state.model_name != state.adapter_name:
        select_base_model(body, state.adapter_name)
    return body.model or state.adapter_name


def select_base_model(body: OpenAIFields, adapter_name: str) -> None:
    """Run a request for the base model's id at rank 0, the model without the adapter (reason ``explicit``)."""
    if body.rank is not None and body.rank != 0:
        raise APIError(422, f"rank: rank {body.rank} needs the adapter, but model {body.model!r} is the base model, "
                       f"which runs at rank 0 only; send model {adapter_name!r} with rank {body.rank}, or leave out "
                       "rank", param="rank")
    if body.latency_budget_ms is not None:
        raise APIError(422, f"latency_budget_ms: a latency budget chooses an adapter rank, but model {body.model!r} "
                       f"is the base model, which runs at rank 0 only; send model {adapter_name!r} with the budget, "
                       "or leave out latency_budget_ms", param="latency_budget_ms")
    body.rank = 0


def rank_fields(output: RequestOutput) -> dict:
    request = output.request
    return {"rank": request.rank, "rank_reason": request.rank_reason.value, "requested_rank": request.requested_rank}


async def collect(outputs: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    parts = []
    async for output in outputs:
        parts.append(output.text)
        if output.finished:
            error = final_error(output)
            if error is not None:
                raise error
            return "".join(parts), output
    raise APIError(499, "the client disconnected before the request finished")


@router.post("/completions", response_model=CompletionResponse, responses=OPENAI_RESPONSES,
             summary="OpenAI text completion")
async def completions(body: CompletionRequest, request: Request):
    service = service_of(request)
    model = check_model(request, body)
    prompt = service.tokenize_prompt(body.prompt_text())
    sampling = service.sampling_params(body, body.max_tokens, "max_tokens", prompt)
    outputs = service.run(request, body, prompt, sampling)
    request_id = request.state.request_id

    if body.stream:
        first = await first_output(outputs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(output: RequestOutput) -> dict:
            finish = output.request.finish_reason.value if output.finished else None
            payload = CompletionResponse(id=request_id, model=model, rank=output.rank,
                                         rank_reason=output.request.rank_reason.value,
                                         choices=[CompletionChoice(text=output.text, finish_reason=finish)])
            return payload.model_dump(exclude_none=True)

        def usage_chunk(output: RequestOutput) -> dict:
            payload = CompletionResponse(id=request_id, model=model, choices=[], usage=usage_of(output.request),
                                         **rank_fields(output))
            return payload.model_dump(exclude_none=True)

        return StreamingResponse(stream_events(first, outputs, chunk, usage_chunk if include_usage else None),
                                 media_type="text/event-stream")

    text, final = await collect(outputs)
    return CompletionResponse(id=request_id, model=model, usage=usage_of(final.request), **rank_fields(final),
                              choices=[CompletionChoice(text=text, finish_reason=final.request.finish_reason.value)])


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=OPENAI_RESPONSES,
             summary="OpenAI chat completion (chat template from the tokenizer)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = service_of(request)
    model = check_model(request, body)
    prompt = service.tokenize_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    sampling = service.sampling_params(body, body.output_limit(), "max_completion_tokens"
                                       if body.max_completion_tokens is not None else "max_tokens", prompt)
    outputs = service.run(request, body, prompt, sampling)
    request_id = request.state.request_id

    if body.stream:
        first = await first_output(outputs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_role = False

        def chunk(output: RequestOutput) -> dict:
            nonlocal sent_role
            delta = ChatDelta(content=output.text, role=None if sent_role else "assistant")
            sent_role = True
            finish = output.request.finish_reason.value if output.finished else None
            payload = ChatCompletionChunk(id=request_id, model=model, rank=output.rank,
                                          rank_reason=output.request.rank_reason.value,
                                          choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
            return payload.model_dump(exclude_none=True)

        def usage_chunk(output: RequestOutput) -> dict:
            payload = ChatCompletionChunk(id=request_id, model=model, choices=[], usage=usage_of(output.request),
                                          **rank_fields(output))
            return payload.model_dump(exclude_none=True)

        return StreamingResponse(stream_events(first, outputs, chunk, usage_chunk if include_usage else None),
                                 media_type="text/event-stream")

    text, final = await collect(outputs)
    return ChatCompletionResponse(
        id=request_id, model=model, usage=usage_of(final.request), **rank_fields(final),
        choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=final.request.finish_reason.value)],
    )


async def stream_events(first: RequestOutput, outputs: AsyncIterator[RequestOutput], chunk, usage_chunk):
    """Yield one SSE chunk per text output, the final chunk with finish_reason, optional usage, then [DONE]."""
    output = first
    while True:
        if output.finished:
            error = final_error(output)
            if error is not None:
                yield sse(error_body(error.status, error.message, error.error_type, None, output.request_id))
                return
            yield sse(json.dumps(chunk(output), separators=(",", ":")))
            if usage_chunk is not None:
                yield sse(json.dumps(usage_chunk(output), separators=(",", ":")))
            yield sse("[DONE]")
            return
        if output.text:
            yield sse(json.dumps(chunk(output), separators=(",", ":")))
        try:
            output = await anext(outputs)
        except StopAsyncIteration:
            return


@router.get("/models", response_model=ModelList, summary="The base model and the adapter with its ranks",
            description="Two model ids are served. The adapter's id (also used when a request names no model) runs "
                        "at the request's `rank`, at the rank chosen for its `latency_budget_ms`, or at the default "
                        "rank. The base model's id runs at rank 0, the model without the adapter; with it, a "
                        "non-zero `rank` or a `latency_budget_ms` gets HTTP 422.")
async def models(request: Request) -> ModelList:
    state = request.app.state
    config = state.adapter_config
    return ModelList(data=[
        ModelCard(id=state.model_name, root=state.model_source),
        ModelCard(id=state.adapter_name, root=state.adapter_path, parent=state.model_name,
                  offered_ranks=state.policy.offered, default_rank=state.policy.default_rank,
                  inference_rule=config.inference_rule),
    ])
