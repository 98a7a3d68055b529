"""When to retry a request and how long to wait first: exponential backoff that honours Retry-After."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import httpx

from .errors import MatloraAPIError

logger = logging.getLogger(__name__)

# Transport errors raised before the server sent a response. Generation has no side effects on the server, so
# sending the same request again is safe.
RETRYABLE_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of HTTP 429 responses and of connection errors.

    Without a Retry-After header the n-th retry waits ``backoff_s * 2**(n-1)`` seconds, at most
    ``max_backoff_s``, plus up to 10 % random jitter. A 429 with Retry-After waits exactly that long, unless the
    server asks for more than ``max_retry_after_s``, in which case the error is raised at once.
    """

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be 0 or more, got {self.backoff_s} and "
                             f"{self.max_backoff_s}")

    def backoff(self, retry: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return base * (1 + 0.1 * random.random())

    def delay(self, retry: int, failure: Exception) -> float | None:
        """Return the seconds to wait before retry number ``retry`` (1-based), or None to raise ``failure``."""
        if retry > self.max_retries:
            return None
        if isinstance(failure, RETRYABLE_TRANSPORT_ERRORS):
            return self.backoff(retry)
        if not isinstance(failure, MatloraAPIError) or failure.status != 429:
            return None
        if failure.retry_after is None:
            return self.backoff(retry)
        if failure.retry_after > self.max_retry_after_s:
            return None
        return failure.retry_after


def log_retry(method: str, path: str, retry: int, delay: float, failure: Exception) -> None:
    detail = str(failure) or type(failure).__name__
    logger.warning("%s %s failed (%s); retry %d in %.2f s", method, path, detail, retry, delay)
