"""Parts shared by the sync and async clients: options, request bodies, response parsing, error mapping."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, TypeVar

import httpx
from pydantic import BaseModel, ValidationError


from .errors import MatloraConnectionError, MatloraError, MatloraResponseError, MatloraTimeoutError

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 120.0  # the server's own request_timeout_s default, so a slow request fails there first
USER_AGENT = "matlora-client/0.1.0"

GENERATE_PATH = "/generate"
COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
RANKS_PATH = "/v1/ranks"
HEALTH_PATH = "/health"

Model = TypeVar("Model", bound=BaseModel)


class GenerationOptions(TypedDict, total=False):
    """Keyword options of every generation method. A None value is left out, so the server's default applies."""

    rank: int | None               # adapter rank offered by the server, 0 for the base model
    latency_budget_ms: float | None  # ms per output token; the server picks the largest rank that fits
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: str | list[str] | None
    ignore_eos: bool               # generate past the end-of-sequence token, up to max tokens or a stop string
    request_id: str                # sent as X-Request-ID, which the server echoes in errors and logs
    extra_body: dict[str, Any]     # more body fields, sent as they are


OPTION_NAMES = frozenset(GenerationOptions.__annotations__)


def request_parts(fields: dict[str, Any], options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge a method's own fields with its options into a JSON body and extra headers, dropping None values."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}: use one of {sorted(OPTION_NAMES)}")
    options = dict(options)
    headers = {}
    request_id = options.pop("request_id", None)
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    extra = options.pop("extra_body", None) or {}
    body = {key: value for key, value in {**fields, **options, **extra}.items() if value is not None}
    return body, headers


def generate_parts(prompt: str, max_new_tokens: int | None, stream: bool, options: Mapping[str, Any]):
    return request_parts({"prompt": prompt, "max_new_tokens": max_new_tokens, "stream": stream or None}, options)


def completion_parts(prompt: str, model: str | None, max_tokens: int | None, stream: bool, include_usage: bool,
                     options: Mapping[str, Any]):
    fields = {"prompt": prompt, "model": model, "max_tokens": max_tokens, "stream": stream or None,
              "stream_options": {"include_usage": True} if stream and include_usage else None}
    return request_parts(fields, options)


def chat_parts(messages: str | Sequence[Mapping[str, Any]], model: str | None, max_tokens: int | None,
               stream: bool, include_usage: bool, options: Mapping[str, Any]):
    fields = {"messages": chat_messages(messages), "model": model, "max_tokens": max_tokens,
              "stream": stream or None,
              "stream_options": {"include_usage": True} if stream and include_usage else None}
    return request_parts(fields, options)


def chat_messages(messages: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the messages as a list of dicts. A plain string becomes one user message."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    listed = [dict(message) for message in messages]
    if not listed:
        raise ValueError("messages: expected at least one message, got an empty list")
    return listed


def check_base_url(base_url: str) -> None:
    """Raise ValueError unless ``base_url`` is an http:// or https:// URL with a host."""
    example = "as in http://127.0.0.1:8000"
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, {example}, got {base_url!r}")
    if any(character.isspace() for character in base_url):
        raise ValueError(f"base_url {base_url!r} contains whitespace; give a URL {example}")
    try:
        host = httpx.URL(base_url).host
    except httpx.InvalidURL as error:
        raise ValueError(f"base_url {base_url!r} is not a valid URL ({error}); give one {example}") from None
    if not host:
        raise ValueError(f"base_url {base_url!r} has no host; give one {example}")


def check_timeout(timeout: float) -> None:
    """Raise ValueError unless ``timeout`` is a finite number of seconds above 0."""
    if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a number of seconds above 0, got {timeout!r}")


def http_options(base_url: str, api_key: str | None, timeout: float | httpx.Timeout,
                 headers: Mapping[str, str] | None) -> dict[str, Any]:
    """Return the keyword arguments for httpx.Client or httpx.AsyncClient."""
    check_base_url(base_url)
    if not isinstance(timeout, httpx.Timeout):
        check_timeout(timeout)
    all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    if api_key:
        all_headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url.rstrip("/"), "headers": all_headers,
            "timeout": timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)}


def parse_model(model_type: type[Model], payload: Any, path: str) -> Model:
    try:
        return model_type.model_validate(payload)
    except ValidationError as error:
        raise MatloraResponseError(f"{path}: the response does not match {model_type.__name__}: {error}") from None


def parse_event(model_type: type[Model], payload: dict, path: str) -> Model:
    """Validate one streamed event as ``model_type``."""
    return parse_model(model_type, payload, path)


def parse_json(response: httpx.Response, model_type: type[Model], path: str) -> Model:
    try:
        payload = response.json()
    except ValueError:
        raise MatloraResponseError(f"{path}: the response is not JSON: {response.text[:200]!r}") from None
    return parse_model(model_type, payload, path)


def transport_failure(error: httpx.TransportError, method: str, url: str) -> MatloraError:
    """Map an httpx transport error to this package's exception, keeping httpx's message."""
    detail = str(error) or type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        return MatloraTimeoutError(f"{method} {url} timed out: {detail}")
    return MatloraConnectionError(f"{method} {url} failed: {detail}")
