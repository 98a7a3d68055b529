"""Server settings, read from command-line options and MATLORA_* environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ADAPTER = Path(__file__).resolve().parent.parent / "adapters" / "smollm2-135m-gsm8k-matryoshka"


class ServerSettings(BaseSettings):
    """Every option of ``matlora-server``; the environment variable is MATLORA_ plus the upper-case name."""

    # Errors leave out the rejected input, because api_keys contains secrets.
    model_config = SettingsConfigDict(env_prefix="MATLORA_", extra="forbid", hide_input_in_errors=True)

    # model and adapter
    model: str = Field("smollm2-135m-instruct", description="base model: built-in name, model folder or hub id")
    adapter: str = Field(str(DEFAULT_ADAPTER), description="Matryoshka adapter folder")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of model and KV cache")
    device: str = Field("auto", description="auto, cpu or cuda")
    served_model_name: str | None = Field(None, description="model id reported by /v1/models (default: --model)")

    # network
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")

    # ranks
    default_rank: int | None = Field(None, description="rank of requests that name none (default: the adapter's)")
    lower_rank_under_load: bool = Field(False, description="serve requests without a fixed rank at a lower rank "
                                                            "while too many requests wait")
    overload_waiting_threshold: int = Field(8, ge=1, description="waiting requests above which ranks are lowered")
    profile_batch_sizes: Annotated[list[int], NoDecode] = Field(
        [1, 4, 16], description="batch sizes timed at start-up for the latency profile; sizes above max_num_seqs "
                                "are timed at max_num_seqs")
    profile_steps: int = Field(3, ge=0, description="decode steps timed per rank and batch size at start-up "
                                                    "(0 skips the profile)")

    # engine limits
    max_num_seqs: int = Field(32, ge=1, description="running sequences (KV cache slots)")
    max_model_len: int = Field(1024, ge=2, description="prompt plus output tokens of one sequence")
    max_cached_tokens: int = Field(16384, ge=2, description="KV cache tokens reserved by running sequences together")
    max_prefill_tokens: int = Field(4096, ge=1, description="padded prompt tokens in one prefill batch")
    max_waiting: int = Field(256, ge=1, description="waiting requests; more get HTTP 429")
    rank_batching: Literal["mixed", "split"] = Field(
        "mixed", description="mixed: requests of any rank share a batch; split: a batch holds one rank at a time, "
                             "as servers without mixed-rank support do (for comparison runs)")

    # request limits
    max_prompt_tokens: int = Field(768, ge=1, description="prompt tokens of one request")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request names none")
    max_stop_strings: int = Field(8, ge=0, description="stop strings per request")
    max_stop_length: int = Field(64, ge=1, description="characters per stop string")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size")
    request_timeout_s: float = Field(120.0, gt=0, description="seconds before a request is cut off")
    shutdown_grace_s: float = Field(30.0, ge=0, description="seconds to finish running requests on SIGTERM")

    # security
    api_keys: Annotated[list[str], NoDecode] = Field(
        [], description="bearer tokens accepted on every route but /health (empty: no key needed)")
    api_keys_file: str | None = Field(None, description="file with one bearer token per line")
    metrics_require_key: bool = Field(False, description="require an API key on /metrics too")
    cors_origins: Annotated[list[str], NoDecode] = Field([], description="origins allowed by CORS (empty: CORS off)")

    log_level: str = Field("INFO", description="logging level")

    @field_validator("profile_batch_sizes", "api_keys", "cors_origins", mode="before")
    @classmethod
    def split_list(cls, value):
        """Read a list from the environment as comma-separated text ("a,b") or as a JSON list ('["a", "b"]')."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"invalid JSON list ({error}); give comma-separated values or a JSON list of "
                                 "strings") from None
        return [part.strip() for part in value.split(",") if part.strip()]

    @model_validator(mode="after")
    def check_limits(self) -> "ServerSettings":
        if self.max_prompt_tokens + 1 > self.max_model_len:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for output within "
                             f"max_model_len={self.max_model_len}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds "
                             f"max_tokens_limit={self.max_tokens_limit}")
        if self.max_model_len > self.max_cached_tokens:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds max_cached_tokens={self.max_cached_tokens}")
        for size in self.profile_batch_sizes:
            if size < 1:
                raise ValueError(f"profile batch size {size} must be >= 1")
        return self

    def load_api_keys(self) -> set[str]:
        """Return the accepted bearer tokens from api_keys and api_keys_file."""
        keys = {k for k in self.api_keys if k}
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ValueError(f"api_keys_file {path}: file not found")
            keys.update(line.strip() for line in path.read_text().splitlines() if line.strip())
        return keys
