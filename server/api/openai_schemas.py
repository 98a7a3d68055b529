"""Bodies of the OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models.

OpenAI fields that this server does not implement are accepted only at their neutral value (n = 1, no logprobs,
zero penalties), so a request that depends on them fails with HTTP 422 instead of being served differently.
``rank`` and ``latency_budget_ms`` are extra body fields (``extra_body`` in the openai package).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, field_validator

from .schemas import Number, SamplingFields, StrictModel, Usage


class StreamOptions(StrictModel):
    include_usage: StrictBool = False


class OpenAIFields(SamplingFields):
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    n: StrictInt = 1
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    stream_options: StreamOptions | None = None

    @field_validator("n", "presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def only_neutral_value(cls, value, info):
        neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}[info.field_name]
        if value != neutral and not (info.field_name == "logit_bias" and not value):
            raise ValueError(f"not supported by this server: only {json.dumps(neutral)} is accepted")
        return value


class CompletionRequest(OpenAIFields):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def one_prompt(cls, value):
        # Checked before the union, which would otherwise report one error per member type.
        if isinstance(value, list) and len(value) > 1:
            raise ValueError("a list of prompts is not supported: send one prompt")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty: send one prompt")
        return value

    @field_validator("logprobs", "echo", "best_of", "suffix")
    @classmethod
    def unsupported_options(cls, value, info):
        neutral = {"logprobs": (None, 0), "echo": (False,), "best_of": (None, 1), "suffix": (None, "")}
        if value not in neutral[info.field_name]:
            allowed = " or ".join(json.dumps(option) for option in neutral[info.field_name])
            raise ValueError(f"not supported by this server: only {allowed} is accepted")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(StrictModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def no_logprobs(cls, value, info):
        if value not in (None, False, 0):
            raise ValueError("not supported by this server: logprobs are not returned")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def one_output_limit(cls, value, info):
        # max_tokens is declared in OpenAIFields, before this field, so info.data contains it when it is valid.
        max_tokens = info.data.get("max_tokens")
        if value is not None and max_tokens is not None and value != max_tokens:
            raise ValueError(f"max_tokens ({max_tokens}) and max_completion_tokens ({value}) differ: send one of "
                             "them, or the same value in both")
        return value

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class MatloraFields(BaseModel):
    """Fields this server adds to OpenAI's responses."""

    rank: int
    rank_reason: str
    requested_rank: int | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionResponse(MatloraFields):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(MatloraFields):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(MatloraFields):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "matlora"
    root: str | None = None
    parent: str | None = None
    offered_ranks: list[int] | None = None
    default_rank: int | None = None
    inference_rule: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
