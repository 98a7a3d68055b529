"""Nested-rank arithmetic: the rank scale s(r), the training diagonal P and the serving diagonals.

An adapter with factors A [r_max, in] and B [out, r_max] computes B·diag(p)·A·x. Training with the set S of
nested ranks uses p = P, where P_j = sum of s(r) over the r in S with r > j, so that
B·diag(P)·A = sum over r in S of s(r)·B[:, :r]·A[:r, :]. Serving rank r uses one of two inference rules:

- ``paper``: p_j = s(r)·1[j < r], the rule of MatryoshkaLoRA (Modoranu, Safaryan, Alistarh, 2026, arXiv 2605.07850);
- ``partial_sum``: p_j = sum of s(r') over r' in S with j < r' <= r, the training forward truncated to the nested
  sub-adapters up to r. At r = r_max it equals P.

Rank 0 is the base model alone: its diagonal is all zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

ScaleRule = Literal["none", "rank", "sqrt"]
InferenceRule = Literal["paper", "partial_sum"]

SCALE_RULES: tuple[str, ...] = get_args(ScaleRule)
INFERENCE_RULES: tuple[str, ...] = get_args(InferenceRule)


def rank_scale(rank: int, rule: str) -> float:
    """Return s(rank): 1 for ``none``, 1/r for ``rank``, 1/sqrt(r) for ``sqrt``."""
    if rank < 1:
        raise ValueError(f"rank scale is defined for ranks >= 1, got rank={rank}")
    if rule == "none":
        return 1.0
    if rule == "rank":
        return 1.0 / rank
    if rule == "sqrt":
        return 1.0 / math.sqrt(rank)
    raise ValueError(f"invalid scale rule {rule!r}: allowed values are {', '.join(SCALE_RULES)}")


def normalize_ranks(ranks: Iterable[int], r_max: int) -> list[int]:
    """Sort and deduplicate a set of nested ranks, dropping those above r_max."""
    cleaned = sorted({int(r) for r in ranks if int(r) <= r_max})
    if not cleaned:
        raise ValueError(f"no trained rank is <= r_max={r_max}")
    if cleaned[0] < 1:
        raise ValueError(f"trained ranks must be >= 1, got {cleaned[0]}")
    return cleaned


def nested_diagonal(trained_ranks: Sequence[int], r_max: int, scale_rule: str) -> torch.Tensor:
    """Build the training diagonal P [r_max] with P_j = sum of s(r) over r in S with r > j.

    With S = {r_max} every entry is s(r_max), which is plain LoRA with that scale.
    """
    diagonal = torch.zeros(r_max, dtype=torch.float64)
    for rank in trained_ranks:
        if not 1 <= rank <= r_max:
            raise ValueError(f"trained rank {rank} is outside 1..r_max={r_max}")
        diagonal[:rank] += rank_scale(rank, scale_rule)
    return diagonal.float()


def serving_diagonal(
    rank: int,
    trained_ranks: Sequence[int],
    r_max: int,
    scale_rule: str,
    inference_rule: str,
) -> torch.Tensor:
    """Build the diagonal p [r_max] that serves ``rank`` under ``inference_rule``; zero past ``rank``."""
    if not 0 <= rank <= r_max:
        raise ValueError(f"rank {rank} is outside 0..r_max={r_max}")
    diagonal = torch.zeros(r_max, dtype=torch.float64)
    if rank == 0:
        return diagonal.float()
    if inference_rule == "paper":
        diagonal[:rank] = rank_scale(rank, scale_rule)
    elif inference_rule == "partial_sum":
        for trained in trained_ranks:
            if trained <= rank:
                diagonal[:trained] += rank_scale(trained, scale_rule)
    else:
        raise ValueError(f"invalid inference rule {inference_rule!r}: allowed values are {', '.join(INFERENCE_RULES)}")
    return diagonal.float()


def effective_width(diagonal: torch.Tensor) -> int:
    """Return the number of leading columns that carry a non-zero entry (the rank actually computed)."""
    nonzero = torch.nonzero(diagonal.reshape(-1, diagonal.shape[-1]).abs().sum(0))
    return 0 if nonzero.numel() == 0 else int(nonzero.max()) + 1


def dylora_diagonal(rank: int, r_max: int, scale_rule: str) -> torch.Tensor:
    """Build the DyLoRA training diagonal for one sampled rank: s(rank) times a 0/1 mask of the first rank columns."""
    return serving_diagonal(rank, [rank], r_max, scale_rule, "paper")
