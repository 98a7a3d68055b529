"""Argument types shared by ``matlora-client`` and ``matlora-bench``: argparse reports their errors with exit 2."""

from __future__ import annotations

import argparse

from .base import check_base_url, check_timeout


def server_url(text: str) -> str:
    """Return an http:// or https:// base URL with a host."""
    try:
        check_base_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("base_url", "the URL", 1)) from None
    return text


def timeout_seconds(text: str) -> float:
    """Return a finite number of seconds above 0."""
    try:
        seconds = float(text)
        check_timeout(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}") from None
    return seconds
