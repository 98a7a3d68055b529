"""Clients of the matlora server (installed as ``matlora_client``): a library, the ``matlora-client`` CLI and the
``matlora-bench`` load generator."""

from .async_client import AsyncMatloraClient
from .client import MatloraClient
from .errors import (AuthenticationError, InvalidRequestError, MatloraAPIError, MatloraConnectionError, MatloraError,
                     MatloraResponseError, MatloraTimeoutError, NotFoundError, RateLimitError, ServerError)
from .retry import RetryPolicy

__all__ = [
    "AsyncMatloraClient", "AuthenticationError", "InvalidRequestError", "MatloraAPIError", "MatloraClient",
    "MatloraConnectionError", "MatloraError", "MatloraResponseError", "MatloraTimeoutError", "NotFoundError",
    "RateLimitError", "RetryPolicy", "ServerError",
]
