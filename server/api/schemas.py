"""Request and response bodies of the HTTP API. Clients import these models too.

Unknown fields are rejected with HTTP 422 rather than ignored, so a misspelt option never falls back silently.
Numbers are strict: a string or a boolean where a number belongs is invalid, and so are NaN and infinity.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

# A JSON number: StrictFloat accepts integers too (as floats) but not strings or booleans. One type instead of a
# float | int union, so an invalid value gets one error naming the field.
Number = StrictFloat


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingFields(StrictModel):
    """Sampling options shared by /generate and the OpenAI-compatible routes."""

    temperature: Annotated[Number, Field(ge=0, le=2)] = 0.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=0)] = 0
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    ignore_eos: StrictBool = Field(False, description="keep generating past the end-of-sequence token until "
                                                      "max tokens or a stop string (for benchmarks)")
    rank: Annotated[StrictInt, Field(ge=0)] | None = Field(None, description="adapter rank; must be offered")
    latency_budget_ms: Annotated[Number, Field(gt=0)] | None = Field(
        None, description="budget per output token in milliseconds; picks the largest rank predicted to fit")

    @field_validator("latency_budget_ms")
    @classmethod
    def rank_or_budget(cls, value, info):
        # A field validator rather than a model validator, so the error names a field. rank is declared first,
        # so info.data contains it when it is valid.
        if value is not None and info.data.get("rank") is not None:
            raise ValueError("send rank or latency_budget_ms, not both")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateRequest(SamplingFields):
    prompt: Annotated[StrictStr, Field(min_length=1)]
    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="output tokens to generate at most (default: the server's default_max_tokens)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    """Latencies of one request in milliseconds; None where the request never reached that point."""

    queue_ms: float | None = None
    time_to_first_token_ms: float | None = None
    time_per_output_token_ms: float | None = None
    e2e_ms: float | None = None


class RankInfo(BaseModel):
    rank: int
    rank_reason: Literal["explicit", "latency_budget", "budget_unmet", "default", "lowered_under_load"]
    requested_rank: int | None = Field(None, description="the rank before lowering under load, if it was lowered")


class GenerateResponse(RankInfo):
    id: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings


class GenerateStreamEvent(BaseModel):
    """One server-sent event of a streamed /generate: text chunks, then a final event with finished set."""

    id: str
    text: str
    rank: int
    finished: bool = False
    finish_reason: Literal["stop", "length"] | None = None
    rank_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["ok", "shutting_down"]
    model: str
    adapter: str
    running: int
    waiting: int


class RankProfileEntry(BaseModel):
    rank: int
    quality: float | None = Field(None, description="the adapter's measured quality figure at this rank")
    quality_metric: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="every measured metric at this rank")
    latency_estimate_ms: float | None = Field(None, description="predicted time per output token for a request "
                                                                "joining the current batch")
    is_default: bool = False


class RanksResponse(BaseModel):
    object: Literal["list"] = "list"
    inference_rule: str
    default_rank: int
    data: list[RankProfileEntry]
