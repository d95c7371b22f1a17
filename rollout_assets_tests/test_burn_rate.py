"""Multi-window burn-rate alerts: a slow leak under the per-window threshold still alerts."""

from datetime import datetime, timedelta

import pytest

from rollout_assets.analyze import judge_range, load_scores, score_range
from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.policy import PolicyError, parse_policy
from rollout_assets.replay import replay
from rollout_assets.scoring import burn_rate, decide, score_burn, score_window
from rollout_assets_tests.conftest import event, write_canary

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


# ---- history from the stored events ---------------------------------------------------------

def _restores(home, failures_per_window: list[int], n: int = 1000) -> None:
    """`n` A-2 restores in each of the windows ending at WS, `failures_per_window[i]` failing."""
    lines = []
    for i, failures in enumerate(reversed(failures_per_window)):
        ws = WS - i * W
        at = (ws + timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines += [event(event_id=f"r-{ws:%H%M}-{k}", phase="A-2", kind="restore", ts=at,
                        ok=k >= failures, drop=("latency_ms",)) for k in range(n)]
    write_canary(home, "A-2", lines)


def _burn(con, policy, first, last):
    compute_window_metrics(con, policy, first, last)
    score_range(con, policy, first, last, WS)
    return next(s for s in load_scores(con, WS, WS) if s.slo == "restore_slow_burn")


def test_burn_history_comes_from_the_events_of_windows_never_run(con, home, policy):
    """A burst in the last hour after five clean hours: the 6 h burn is 8 / 24,000 errors =
    3.3x, under 6x, so no alert. Running the last window alone must see the same five clean
    hours (they were read from `window_metrics`, where only the windows run so far are: the
    window alone then burned 20x over both spans and raised a false alert)."""
    _restores(home, [0] * 20 + [2] * 4)
    ingest_canary(con, home, policy)
    alone = _burn(con, policy, WS, WS)
    assert (alone.sample_size, alone.passed) == (24_000, True)
    assert alone.value == pytest.approx((8 / 24_000) / (1 - 0.9999))
    assert _burn(con, policy, WS - 23 * W, WS) == alone  # the whole span run: the same score


def test_replaying_the_production_policy_changes_nothing_with_burn_rates(con, home, policy):
    _restores(home, [1] * 24)  # 0.1 % errors everywhere: restore_slow_burn fires (10x)
    ingest_canary(con, home, policy)
    first = WS - 23 * W
    assert _burn(con, policy, first, WS).passed is False
    verdicts = judge_range(con, policy, first, WS, WS)
    assert any("restore_slow_burn" in v.failed_slos for v in verdicts)
    assert replay(con, policy, first, WS + W)[1] == []
