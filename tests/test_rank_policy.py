"""Rank choice: explicit, from a latency budget with a stubbed profile, default, and lowered under load."""

import pytest

from matlora_server.engine import RankReason, Request, SamplingParams
from matlora_server.rank_policy import LatencyProfile, NoLatencyProfileError, RankError, RankPolicy

OFFERED = [0, 1, 2, 4, 8, 16, 32]
# Stubbed seconds per decode step: grows with rank and with batch size.
STUB = {(rank, batch): 0.010 + 0.001 * rank + 0.002 * batch for rank in OFFERED for batch in (1, 4, 16)}


def make_policy(**kwargs) -> RankPolicy:
    return RankPolicy(OFFERED, default_rank=16, profile=LatencyProfile(STUB), **kwargs)


def test_explicit_rank():
    assert make_policy().choose(8, None, running=0, running_max_rank=0) == (8, RankReason.EXPLICIT)


def test_explicit_rank_not_offered():
    with pytest.raises(RankError, match=r"rank 3 is not offered: choose one of \[0, 1, 2, 4, 8, 16, 32\]"):
        make_policy().choose(3, None, running=0, running_max_rank=0)


def test_default_rank():
    assert make_policy().choose(None, None, running=0, running_max_rank=0) == (16, RankReason.DEFAULT)


@pytest.mark.parametrize("budget_ms, expected", [
    (100.0, 32),   # everything fits: the largest rank
    (20.5, 8),     # batch 1: 10 + rank + 2 ms; rank 8 = 20 ms fits, rank 16 = 28 ms does not
    (13.5, 1),     # rank 1 = 13 ms
])
def test_budget_picks_largest_fitting_rank(budget_ms, expected):
    rank, reason = make_policy().choose(None, budget_ms, running=0, running_max_rank=0)
    assert (rank, reason) == (expected, RankReason.LATENCY_BUDGET)


def test_budget_nothing_fits_uses_smallest_rank():
    assert make_policy().choose(None, 5.0, running=0, running_max_rank=0) == (0, RankReason.BUDGET_UNMET)


def test_budget_skips_ranks_without_prediction():
    measured = {key: seconds for key, seconds in STUB.items() if key[0] in (2, 4)}
    policy = RankPolicy(OFFERED, default_rank=16, profile=LatencyProfile(measured))
    assert policy.choose(None, 100.0, running=0, running_max_rank=0) == (4, RankReason.LATENCY_BUDGET)
    assert policy.choose(None, 14.5, running=0, running_max_rank=0) == (2, RankReason.LATENCY_BUDGET)


def test_budget_unmet_goes_to_base_model_when_offered():
    measured = {key: seconds for key, seconds in STUB.items() if key[0] in (2, 4)}
    policy = RankPolicy(OFFERED, default_rank=16, profile=LatencyProfile(measured))
    assert policy.choose(None, 1.0, running=0, running_max_rank=0) == (0, RankReason.BUDGET_UNMET)
    adapter_only = RankPolicy([2, 4, 8], default_rank=8, profile=LatencyProfile(measured))
    assert adapter_only.choose(None, 1.0, running=0, running_max_rank=0) == (2, RankReason.BUDGET_UNMET)


def test_budget_without_measurements_raises():
    policy = RankPolicy(OFFERED, default_rank=16, profile=LatencyProfile({}))
    with pytest.raises(NoLatencyProfileError, match="no latency measurements yet.*send rank instead"):
        policy.choose(None, 100.0, running=0, running_max_rank=0)
    assert policy.choose(4, None, running=0, running_max_rank=0) == (4, RankReason.EXPLICIT)


def test_budget_accounts_for_batch_and_its_largest_rank():
    policy = make_policy()
    # joining 3 running sequences: batch 4 costs 10 + rank + 8 ms, and a rank-16 row makes every step rank 16
    assert policy.choose(None, 34.5, running=3, running_max_rank=0)[0] == 16
    assert policy.choose(None, 34.5, running=3, running_max_rank=32) == (0, RankReason.BUDGET_UNMET)


def test_profile_interpolates_and_learns():
    profile = LatencyProfile({(4, 1): 0.010, (4, 16): 0.040})
    assert profile.predict(4, 6) == pytest.approx(0.020)
    assert profile.predict(4, 32) == pytest.approx(0.072)   # extrapolated from the last two sizes
    assert profile.predict(8, 1) is None
    profile.observe(4, 1, 0.020)
    assert profile.predict(4, 1) == pytest.approx(0.012)


def lowered(policy, rank, waiting, fixed=False):
    request = Request("r", [1], SamplingParams(), rank, RankReason.DEFAULT, sink=lambda o: None, fixed_rank=fixed)
    policy.lower_if_overloaded(request, waiting)
    return request


def test_lowering_under_load():
    policy = make_policy(lower_under_load=True, overload_threshold=4)
    assert lowered(policy, 16, waiting=4).rank == 16              # at the threshold: unchanged
    request = lowered(policy, 16, waiting=5)
    assert (request.rank, request.rank_reason, request.requested_rank) == (8, RankReason.LOWERED, 16)
    assert lowered(policy, 16, waiting=12).rank == 2              # three thresholds: three ranks down
    assert lowered(policy, 16, waiting=100).rank == 1             # never below the smallest adapted rank
    assert lowered(policy, 16, waiting=100, fixed=True).rank == 16


def test_lowering_off_by_default():
    assert lowered(make_policy(), 16, waiting=100).rank == 16
