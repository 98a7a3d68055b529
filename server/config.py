"""Server settings, read from command-line options and MATLORA_* environment variables."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SOURCE_TREE = Path(__file__).resolve().parent.parent
BUNDLED_ADAPTER = Path("adapters") / "smollm2-135m-gsm8k-matryoshka"    # relative to SOURCE_TREE
DEFAULT_ADAPTER = SOURCE_TREE / BUNDLED_ADAPTER
CUDA_DEVICE_PATTERN = re.compile(r"cuda(?::(\d+))?")


class ServerSettings(BaseSettings):
    """Every option of ``matlora-server``; the environment variable is MATLORA_ plus the upper-case name."""

    # Errors leave out the rejected input, because api_keys contains secrets.
    model_config = SettingsConfigDict(env_prefix="MATLORA_", extra="forbid", hide_input_in_errors=True)

    # model and adapter
    model: str = Field("smollm2-135m-instruct", description="base model: built-in name, model folder or hub id")
    adapter: str = Field(str(DEFAULT_ADAPTER), description="Matryoshka adapter folder")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of model and KV cache")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
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

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="logging level "
                                                                                    "(case-insensitive)")

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

    @field_validator("log_level", mode="before")
    @classmethod
    def upper_case_level(cls, value):
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def check_device(cls, value: str) -> str:
        device = value.strip().lower()
        if device in ("auto", "cpu"):
            return device
        match = CUDA_DEVICE_PATTERN.fullmatch(device)
        if match is None:
            raise ValueError(f"unknown device {value!r}; allowed: auto, cpu, cuda or cuda:N (N: the GPU index)")
        check_cuda_device(device, int(match.group(1) or 0))
        return device

    @model_validator(mode="after")
    def check_limits(self) -> "ServerSettings":
        if self.max_prompt_tokens + 1 > self.max_model_len:
            raise ValueError(f"--max-prompt-tokens {self.max_prompt_tokens} must be below --max-model-len "
                             f"{self.max_model_len}, so that at least one output token fits")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"--default-max-tokens {self.default_max_tokens} exceeds --max-tokens-limit "
                             f"{self.max_tokens_limit}")
        if self.max_model_len > self.max_cached_tokens:
            raise ValueError(f"--max-model-len {self.max_model_len} exceeds --max-cached-tokens "
                             f"{self.max_cached_tokens}")
        for size in self.profile_batch_sizes:
            if size < 1:
                raise ValueError(f"--profile-batch-sizes: batch size {size} must be 1 or more")
        if self.dtype == "float16" and not self.resolved_device().startswith("cuda"):
            raise ValueError(f"--dtype float16 needs a CUDA device, got device {self.resolved_device()!r}: use "
                             "float32 or bfloat16 on CPU")
        return self

    def resolved_device(self) -> str:
        """Return the torch device to load on: ``auto`` becomes cuda when CUDA is available, else cpu."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_api_keys(self) -> set[str]:
        """Return the accepted bearer tokens from api_keys and api_keys_file.

        Raises ValueError when api_keys_file is missing, unreadable or contains no key, because a server meant to
        require keys would otherwise run without them.
        """
        keys = {k for k in self.api_keys if k}
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ValueError(f"{path}: file not found")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"{path}: cannot read the file: {error}") from None
            file_keys = {line.strip() for line in lines if line.strip()}
            if not file_keys:
                raise ValueError(f"{path}: the file contains no key; write one key per line")
            keys.update(file_keys)
        return keys


def check_cuda_device(device: str, index: int) -> None:
    """Raise ValueError unless CUDA is available and has a GPU with ``index``."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise ValueError(f"device {device!r} needs CUDA, which is not available here (torch {torch.__version__}, "
                         f"{build}): use cpu or auto")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to "
                         f"cuda:{count - 1}")
