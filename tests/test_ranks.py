"""Rank scale, the training diagonal P and the two serving rules against hand-computed values."""

import math

import pytest
import torch

from matlora_core.ranks import dylora_diagonal, nested_diagonal, rank_scale, serving_diagonal

S = [1, 2, 4, 8, 16, 32]
SQRT2 = math.sqrt(2)


def expand(blocks):
    """Build a vector from (value, count) blocks."""
    return torch.tensor([value for value, count in blocks for _ in range(count)], dtype=torch.float32)


@pytest.mark.parametrize("rule, expected", [
    ("none", expand([(6, 1), (5, 1), (4, 2), (3, 4), (2, 8), (1, 16)])),
    ("rank", expand([(1.96875, 1), (0.96875, 1), (0.46875, 2), (0.21875, 4), (0.09375, 8), (0.03125, 16)])),
    ("sqrt", expand([
        (1 + 1 / SQRT2 + 0.5 + 1 / (2 * SQRT2) + 0.25 + 1 / (4 * SQRT2), 1),
        (1 / SQRT2 + 0.5 + 1 / (2 * SQRT2) + 0.25 + 1 / (4 * SQRT2), 1),
        (0.5 + 1 / (2 * SQRT2) + 0.25 + 1 / (4 * SQRT2), 2),
        (1 / (2 * SQRT2) + 0.25 + 1 / (4 * SQRT2), 4),
        (0.25 + 1 / (4 * SQRT2), 8),
        (1 / (4 * SQRT2), 16),
    ])),
])
def test_nested_diagonal_hand_values(rule, expected):
    torch.testing.assert_close(nested_diagonal(S, 32, rule), expected)


@pytest.mark.parametrize("rule", ["none", "rank", "sqrt"])
def test_single_rank_set_is_lora(rule):
    diagonal = nested_diagonal([32], 32, rule)
    assert torch.all(diagonal == rank_scale(32, rule))


def test_rank_scale_values():
    assert rank_scale(16, "none") == 1.0
    assert rank_scale(16, "rank") == 1 / 16
    assert rank_scale(16, "sqrt") == 0.25


def test_rank_scale_rejects_bad_input():
    with pytest.raises(ValueError, match="rank=0"):
        rank_scale(0, "sqrt")
    with pytest.raises(ValueError, match="'cube'"):
        rank_scale(4, "cube")


def test_paper_rule_hand_values():
    diagonal = serving_diagonal(8, S, 32, "sqrt", "paper")
    torch.testing.assert_close(diagonal, expand([(1 / (2 * SQRT2), 8), (0, 24)]))


def test_partial_sum_hand_values():
    diagonal = serving_diagonal(8, S, 32, "sqrt", "partial_sum")
    expected = expand([(1 + 1 / SQRT2 + 0.5 + 1 / (2 * SQRT2), 1), (1 / SQRT2 + 0.5 + 1 / (2 * SQRT2), 1),
                       (0.5 + 1 / (2 * SQRT2), 2), (1 / (2 * SQRT2), 4), (0, 24)])
    torch.testing.assert_close(diagonal, expected)


def test_partial_sum_at_r_max_equals_p():
    for rule in ("none", "rank", "sqrt"):
        torch.testing.assert_close(serving_diagonal(32, S, 32, rule, "partial_sum"), nested_diagonal(S, 32, rule))


def test_partial_sum_between_trained_ranks():
    # rank 6 is not in S: the sub-adapters up to rank 4 are summed and columns 4 and 5 stay zero
    diagonal = serving_diagonal(6, S, 32, "none", "partial_sum")
    torch.testing.assert_close(diagonal, expand([(3, 1), (2, 1), (1, 2), (0, 28)]))


def test_rank_zero_is_all_zero():
    for rule in ("paper", "partial_sum"):
        assert torch.count_nonzero(serving_diagonal(0, S, 32, "sqrt", rule)) == 0


def test_serving_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 33 is outside 0..r_max=32"):
        serving_diagonal(33, S, 32, "sqrt", "paper")
    with pytest.raises(ValueError, match="'mean'"):
        serving_diagonal(4, S, 32, "sqrt", "mean")


def test_dylora_mask():
    diagonal = dylora_diagonal(4, 8, "rank")
    torch.testing.assert_close(diagonal, expand([(0.25, 4), (0, 4)]))
    assert torch.all(dylora_diagonal(8, 8, "none") == 1)
