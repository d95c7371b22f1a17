"""Multi-window burn-rate alerts: a slow leak under the per-window threshold still alerts."""

from datetime import datetime, timedelta

import pytest

from rollout_assets.policy import PolicyError, parse_policy
from rollout_assets.scoring import burn_rate, decide, score_burn, score_window

WS = datetime(2025, 1, 18, 12, 0)
W = timedelta(minutes=15)


def history(rates: list[float], n: int = 1000) -> dict:
    """Per-window (count, success rate), the last entry being the window at WS."""
    return {WS - i * W: (n, r) for i, r in enumerate(reversed(rates))}


def rule(policy):
    return policy.phase("A-2").burn_rate_alerts[0]


def test_burn_rate_is_error_rate_over_budget():
    assert burn_rate([(1000, 0.999)], 0.9999) == pytest.approx(10.0)
    assert burn_rate([(500, 1.0), (500, 0.998)], 0.9999) == pytest.approx(10.0)
    assert burn_rate([], 0.9999) is None
    assert burn_rate([(0, None)], 0.9999) is None


def test_slow_leak_below_the_window_threshold_fires_and_warns_without_rollback(policy):
    r = rule(policy)  # 0.9999 objective, 6x over 6 h and 1 h
    leak = history([0.999] * 24)  # 0.1 % errors: every window passes restore >= 0.995
    s = score_burn(r, WS, "A-2", leak)
    assert s.value == pytest.approx(10.0) and s.passed is False and s.status == "fail"
    window = {"restore_count": 1000, "restore_success_rate": 0.999, "session_count": 0}
    scores = score_window(policy.phase("A-2"), WS, window) + [s]
    assert [x.slo for x in scores if x.passed is False] == ["restore_slow_burn"]
    v = decide(policy, policy.phase("A-2"), WS, scores)
    assert (v.breach, v.level, v.rollback_required, v.rollback_to) == (True, "warning", False, None)


def test_both_windows_must_burn(policy):
    r = rule(policy)
    # a burst in the last hour only: the 6 h burn stays below 6x
    spike = history([1.0] * 20 + [0.998] * 4)
    assert score_burn(r, WS, "A-2", spike).passed is True
    # an old burn that stopped two hours ago: the 1 h window is clean
    gone = history([0.998] * 16 + [1.0] * 8)
    assert score_burn(r, WS, "A-2", gone).passed is True


def test_exactly_at_the_factor_fires_and_small_samples_are_not_judged(policy):
    r = rule(policy)
    at = history([1 - 0.0006] * 24)  # 0.06 % errors / 0.01 % budget = 6.0
    assert score_burn(r, WS, "A-2", at).value == pytest.approx(6.0)
    assert score_burn(r, WS, "A-2", at).passed is False
    small = history([0.99] * 24, n=5)  # 120 samples < min_sample 200
    s = score_burn(r, WS, "A-2", small)
    assert s.passed is None and s.status == "insufficient_data"


def test_policy_rejects_bad_burn_windows(policy):
    bad = policy.source_text.replace("short_minutes: 60", "short_minutes: 375")
    with pytest.raises(PolicyError, match="short_minutes must not exceed long_minutes"):
        parse_policy(bad)
    bad = policy.source_text.replace("short_minutes: 60", "short_minutes: 50")
    with pytest.raises(PolicyError, match="multiples of 15"):
        parse_policy(bad)
