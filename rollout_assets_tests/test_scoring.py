"""Scoring boundaries as plain functions: thresholds hit exactly pass, NULL is not a pass, a small
sample is not judged, shadow rules never breach, rollback goes one phase back, the crash-rate
delta is absolute, and the baseline comes from A-0 windows or the pinned value."""

from __future__ import annotations

import copy
import math
from datetime import datetime, timedelta

import dagster as dg
import duckdb
import pytest
import yaml

from rollout_assets.analyze import baseline_crash_rate, judge_range, load_scores, score_range
from rollout_assets.checks.slo_checks import slo_check_evaluations
from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.home import PROJECT_ROOT
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.policy import Policy, parse_policy
from rollout_assets.scoring import (
    FAIL,
    INSUFFICIENT,
    NO_DATA,
    PASS,
    decide,
    max_level,
    score_rule,
    score_window,
)
from rollout_assets_tests.conftest import DAY, event, write_canary

WS = DAY.replace(hour=9)
RAW = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text(encoding="utf-8"))


def rule(policy: Policy, phase: str, slo: str):
    return next(r for r in policy.phase(phase).slos if r.name == slo)


def metrics(**kw) -> dict:
    """A window_metrics row with healthy, judged defaults."""
    base = dict(events=4000, autosave_count=1000, autosave_p95_ms=900.0, autosave_error_count=0,
                restore_count=1000, restore_success_rate=1.0, merge_count=1000,
                merge_auto_success_rate=0.95, merge_conflict_rate=0.02, session_count=1000,
                crash_count=0, crash_rate=0.0, excluded_events=0)
    base.update(kw)
    return base


def duck(sql: str, params=()):
    """Compute a value the way window_metrics computes it: in DuckDB."""
    with duckdb.connect() as con:
        return con.execute(sql, list(params)).fetchone()[0]


def duck_rate(ok: int, n: int) -> float | None:
    # the expression of collect.WINDOW_METRICS_SQL
    return duck("select ?::BIGINT / nullif(?::BIGINT, 0)::DOUBLE", [ok, n])


def p95(values: list[float]) -> float:
    return duck("select quantile_cont(v, 0.95) from unnest(?::DOUBLE[]) t(v)", [values])


# ---- thresholds hit exactly pass -----------------------------------------------------------------

def test_p95_exactly_at_2500_passes_and_2500_001_fails(policy):
    r = rule(policy, "A-1", "autosave_p95")
    at = score_rule(r, WS, "A-1", metrics(autosave_p95_ms=2500.0))
    above = score_rule(r, WS, "A-1", metrics(autosave_p95_ms=2500.001))
    assert (at.passed, at.status, at.value) == (True, PASS, 2500.0)
    assert (above.passed, above.status) == (False, FAIL)


def test_p95_computed_by_duckdb_at_the_threshold_passes(policy):
    r = rule(policy, "A-1", "autosave_p95")
    # 21 values: quantile_cont(0.95) sits exactly on the 20th smallest
    at = p95([100.0] * 19 + [2500.0, 9000.0])
    above = p95([100.0] * 19 + [2500.001, 9000.0])
    assert at == 2500.0
    assert score_rule(r, WS, "A-1", metrics(autosave_count=21, autosave_p95_ms=at)).passed is True
    assert score_rule(r, WS, "A-1",
                      metrics(autosave_count=21, autosave_p95_ms=above)).passed is False
    # interpolated: 11 values, (11 - 1) * 0.95 = 9.5, halfway between 2000 and 3000
    mid = p95([0.0] * 9 + [2000.0, 3000.0])
    mid_above = p95([0.0] * 9 + [2000.002, 3000.0])
    assert mid == 2500.0 and mid_above == pytest.approx(2500.001)
    assert score_rule(r, WS, "A-1", metrics(autosave_count=11, autosave_p95_ms=mid)).passed
    assert score_rule(r, WS, "A-1",
                      metrics(autosave_count=11, autosave_p95_ms=mid_above)).passed is False


def test_only_float_rounding_counts_as_at_the_threshold(policy):
    r = rule(policy, "A-1", "autosave_p95")
    one_ulp_above = math.nextafter(2500.0, math.inf)
    assert score_rule(r, WS, "A-1", metrics(autosave_p95_ms=one_ulp_above)).passed is True
    # past it by 2 ns (8e-10 relative): a fail, though a 1e-9 tolerance would let it pass
    for past in (2500.000002, 2500.0000001):
        assert score_rule(r, WS, "A-1", metrics(autosave_p95_ms=past)).passed is False, past
    restore = rule(policy, "A-1", "restore_success")
    assert score_rule(restore, WS, "A-1",
                      metrics(restore_success_rate=0.995 - 1e-11)).passed is False


@pytest.mark.parametrize("ok,n", [(199, 200), (995, 1000), (398, 400), (1990, 2000),
                                  (19900, 20000)])
def test_restore_0_995_computed_by_duckdb_passes(policy, ok, n):
    r = rule(policy, "A-1", "restore_success")
    value = duck_rate(ok, n)
    s = score_rule(r, WS, "A-1", metrics(restore_count=n, restore_success_rate=value))
    assert (s.passed, s.status) == (True, PASS), value


@pytest.mark.parametrize("ok,n", [(198, 200), (994, 1000), (1989, 2000), (19899, 20000),
                                  (198, 199)])
def test_restore_just_below_0_995_fails(policy, ok, n):
    r = rule(policy, "A-1", "restore_success")
    value = duck_rate(ok, n)
    assert value < 0.995
    s = score_rule(r, WS, "A-1", metrics(restore_count=n, restore_success_rate=value))
    assert (s.passed, s.status) == (False, FAIL), value


def test_a_hair_below_0_995_fails(policy):
    r = rule(policy, "A-1", "restore_success")
    assert score_rule(r, WS, "A-1", metrics(restore_success_rate=0.9949999)).passed is False
    assert score_rule(r, WS, "A-1", metrics(restore_success_rate=0.995)).passed is True


def test_strict_comparators_fail_at_the_threshold():
    raw = copy.deepcopy(RAW)
    slos = next(p for p in raw["phases"] if p["name"] == "A-1")["slos"]
    slos[0]["comparator"], slos[1]["comparator"] = "<", ">"
    policy = parse_policy(yaml.safe_dump(raw, sort_keys=False))
    p95_rule, restore_rule = policy.phase("A-1").slos[:2]
    assert score_rule(p95_rule, WS, "A-1", metrics(autosave_p95_ms=2500.0)).passed is False
    assert score_rule(p95_rule, WS, "A-1", metrics(autosave_p95_ms=2499.99)).passed is True
    assert score_rule(restore_rule, WS, "A-1", metrics(restore_success_rate=0.995)).passed is False
    assert score_rule(restore_rule, WS, "A-1", metrics(restore_success_rate=0.996)).passed is True


# ---- NULL and small samples are not judged -------------------------------------------------------

def test_empty_denominator_is_null_not_a_pass(policy):
    assert duck_rate(0, 0) is None
    r = rule(policy, "A-1", "restore_success")
    s = score_rule(r, WS, "A-1", metrics(restore_count=0, restore_success_rate=duck_rate(0, 0)))
    assert s.value is None and s.passed is None and s.status == INSUFFICIENT
    v = decide(policy, policy.phase("A-1"), WS, [s])
    assert not v.breach and v.status == "insufficient_data" and v.rollback_to is None


@pytest.mark.parametrize("value", [None, float("nan")])
def test_null_value_with_enough_sample_is_no_data(policy, value):
    # NULL, or a NaN: still no data, never a pass and never a breach
    r = rule(policy, "A-1", "autosave_p95")
    s = score_rule(r, WS, "A-1", metrics(autosave_count=40, autosave_p95_ms=value))
    assert (s.value, s.passed, s.status) == (None, None, NO_DATA)


def test_sample_below_min_sample_is_insufficient_data(policy):
    r = rule(policy, "A-1", "autosave_p95")
    n = r.min_sample
    small = score_rule(r, WS, "A-1", metrics(autosave_count=n - 1, autosave_p95_ms=99999.0))
    enough = score_rule(r, WS, "A-1", metrics(autosave_count=n, autosave_p95_ms=99999.0))
    assert (small.passed, small.status, small.sample_size) == (None, INSUFFICIENT, n - 1)
    assert (enough.passed, enough.status) == (False, FAIL)
    assert not decide(policy, policy.phase("A-1"), WS, [small]).breach


def test_crash_rate_delta_sample_is_sessions(policy):
    r = rule(policy, "A-2", "crash_rate_delta")
    n = r.min_sample
    s = score_rule(r, WS, "A-2", metrics(session_count=n - 1, crash_count=n - 1, crash_rate=1.0),
                   0.02)
    assert (s.sample_size, s.status) == (n - 1, INSUFFICIENT)
    s = score_rule(r, WS, "A-2", metrics(session_count=n, crash_count=n, crash_rate=1.0), 0.02)
    assert (s.sample_size, s.status) == (n, FAIL)
    s = score_rule(r, WS, "A-2", metrics(session_count=n, crash_count=1, crash_rate=1 / n), None)
    assert s.status == NO_DATA  # no baseline: no value


def test_mixed_pass_and_insufficient_is_a_pass(policy):
    phase = policy.phase("A-1")
    scores = score_window(phase, WS, metrics(autosave_count=3, restore_count=200,
                                             restore_success_rate=1.0))
    assert [s.status for s in scores if not s.shadow] == [INSUFFICIENT, PASS]
    v = decide(policy, phase, WS, scores)
    assert (v.status, v.breach, v.level) == ("pass", False, "ok")


# ---- verdicts ----------------------------------------------------------------------------------

def _failing(r) -> dict:
    value = r.threshold * 2 + 1 if r.comparator in ("<=", "<") else r.threshold / 2
    n = max(100, r.min_sample)
    if r.metric == "crash_rate_delta":
        return metrics(session_count=n, crash_count=n, crash_rate=1.0)
    return metrics(**{r.metric: value, METRICS[r.metric].sample_column: n})


def test_rollback_to_is_the_previous_phase_in_policy_order(policy):
    seen = {}
    for i, phase in enumerate(policy.phases):
        for r in phase.slos:
            if r.shadow:  # shadow rules never breach: tested on their own
                continue
            s = score_rule(r, WS, phase.name, _failing(r), baseline_crash_rate=0.02)
            assert s.passed is False, (phase.name, r.name)
            v = decide(policy, phase, WS, [s])
            assert v.breach and v.rollback_required and v.failed_slos == [r.name]
            assert v.rollback_to == policy.phase_names[i - 1]
            assert v.level == r.severity
            seen[phase.name] = v.rollback_to
    assert seen == {"A-1": "A-0", "A-2": "A-1", "B-0": "A-2", "B-1": "B-0"}


def test_a0_has_no_slos_and_is_not_judged(policy):
    a0 = policy.phase("A-0")
    assert score_window(a0, WS, metrics(restore_success_rate=0.0)) == []
    v = decide(policy, a0, WS, [])
    assert (v.status, v.breach, v.rollback_required, v.rollback_to, v.level) == (
        "not_judged", False, False, None, "ok")


def test_level_is_the_max_severity_of_failed_slos(policy):
    a1 = policy.phase("A-1")  # autosave_p95: warning, restore_success: P2
    only_p95 = score_window(a1, WS, metrics(autosave_p95_ms=4000.0))
    both = score_window(a1, WS, metrics(autosave_p95_ms=4000.0, restore_success_rate=0.5))
    assert decide(policy, a1, WS, only_p95).level == "warning"
    v = decide(policy, a1, WS, both)
    assert v.level == "P2" and v.failed_slos == ["autosave_p95", "restore_success"]
    assert max_level(["warning", "P1", "P2"]) == "P1"
    assert max_level([]) == "ok"
    b1 = policy.phase("B-1")
    assert decide(policy, b1, WS, score_window(b1, WS, metrics(restore_success_rate=0.5))
                  ).level == "P1"


def _policy_with(change) -> Policy:
    raw = copy.deepcopy(RAW)
    change(raw)
    return parse_policy(yaml.safe_dump(raw, sort_keys=False))


def test_shadow_rules_never_breach():
    def add_shadow(raw):
        next(p for p in raw["phases"] if p["name"] == "A-1")["slos"].append(dict(
            name="autosave_errors", metric="autosave_error_count", comparator="<=", threshold=0,
            min_sample=10, severity="P1", rollback=True, shadow=True))
    policy = _policy_with(add_shadow)
    a1 = policy.phase("A-1")
    scores = score_window(a1, WS, metrics(autosave_error_count=7))
    shadow = next(s for s in scores if s.slo == "autosave_errors")
    assert shadow.passed is False and shadow.shadow  # recorded as failed...
    v = decide(policy, a1, WS, scores)
    assert (v.breach, v.rollback_required, v.rollback_to, v.level, v.failed_slos) == (
        False, False, None, "ok", [])  # ...but never a breach, page or rollback
    # a real failure beside it still breaches, at its own severity, not the shadow's P1
    scores = score_window(a1, WS, metrics(autosave_error_count=7, restore_success_rate=0.5))
    v = decide(policy, a1, WS, scores)
    assert v.breach and v.level == "P2" and v.failed_slos == ["restore_success"]


def test_a_failure_that_does_not_require_rollback_breaches_without_rollback():
    def no_rollback(raw):
        for s in next(p for p in raw["phases"] if p["name"] == "A-1")["slos"]:
            s["rollback"] = s["name"] != "autosave_p95"
    policy = _policy_with(no_rollback)
    a1 = policy.phase("A-1")
    v = decide(policy, a1, WS, score_window(a1, WS, metrics(autosave_p95_ms=4000.0)))
    assert v.breach and not v.rollback_required and v.rollback_to is None
    v = decide(policy, a1, WS, score_window(a1, WS, metrics(autosave_p95_ms=4000.0,
                                                             restore_success_rate=0.1)))
    assert v.rollback_required and v.rollback_to == "A-0"


def test_a_failed_check_is_an_error_only_when_its_rule_pages_or_rolls_back(policy):
    # the audit trail's check severity follows the rule: it read ERROR for every failure
    def warning_without_rollback(raw):
        for s in next(p for p in raw["phases"] if p["name"] == "A-1")["slos"]:
            if s["name"] == "autosave_p95":
                s["rollback"] = False
    changed = _policy_with(warning_without_rollback)
    a1 = changed.phase("A-1")
    scores = {s.slo: s for s in score_window(
        a1, WS, metrics(autosave_p95_ms=4000.0, restore_success_rate=0.5))}
    assert scores["autosave_p95"].severity == "warning"
    severity = {e.check_name: e.severity for e in slo_check_evaluations(scores.values(), "v")}
    assert severity["a1_autosave_p95"] == dg.AssetCheckSeverity.WARN  # no page, no rollback
    assert severity["a1_restore_success"] == dg.AssetCheckSeverity.ERROR  # P2
    # the shipped policy: a warning-level p95 that rolls back is an ERROR
    shipped = score_window(policy.phase("A-1"), WS, metrics(autosave_p95_ms=4000.0))
    shipped_severity = {e.check_name: e.severity for e in slo_check_evaluations(shipped, "v")}
    assert shipped_severity["a1_autosave_p95"] == dg.AssetCheckSeverity.ERROR
    # a sample too small stays a WARN "insufficient data" whatever the rule
    small = score_window(a1, WS, metrics(restore_count=3, restore_success_rate=0.0))
    assert {e.check_name: e.severity for e in slo_check_evaluations(small, "v")}[
        "a1_restore_success"] == dg.AssetCheckSeverity.WARN


# ---- crash-rate delta: absolute points -----------------------------------------------------------

def _crash(policy, crashes: int, sessions: int, baseline: float):
    r = rule(policy, "A-2", "crash_rate_delta")
    # scale up to the rule's minimum sample: same rational, so the same correctly rounded double
    k = -(-r.min_sample // sessions)
    crashes, sessions = crashes * k, sessions * k
    rate = duck_rate(crashes, sessions)
    return score_rule(r, WS, "A-2", metrics(session_count=sessions, crash_count=crashes,
                                            crash_rate=rate), baseline)


def test_crash_rate_delta_is_absolute_both_edges(policy):
    # 0.07 - 0.02 is 0.05000000000000001 in binary floating point: still exactly the threshold
    at = _crash(policy, 7, 100, 0.02)
    assert at.value == pytest.approx(0.05) and at.passed is True and at.baseline == 0.02
    above = _crash(policy, 701, 10000, 0.02)
    assert above.value == pytest.approx(0.0501) and above.passed is False
    # relative reading would call 0.03 vs 0.02 "+50 %": absolute is +1 point, a pass
    assert _crash(policy, 3, 100, 0.02).passed is True
    # and 0.021 vs 0.02 is +5 % relative but nowhere near five points: a pass too
    assert _crash(policy, 21, 1000, 0.02).passed is True
    # a measured baseline moves the edge with it
    assert _crash(policy, 8, 100, 0.03).passed is True
    assert _crash(policy, 81, 1000, 0.03).passed is False


# ---- baseline: measured from A-0 windows, else pinned --------------------------------------------

def _sessions(home, ws: datetime, phase: str, sessions: int, crashes: int, tag: str = "",
              **fields) -> None:
    """`sessions` session and `crashes` crash events of `phase` five minutes into window `ws`."""
    at = (ws + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_canary(home, phase, [
        event(event_id=f"{phase}-{ws:%Y%m%d%H%M}-{tag}{kind}-{i}", ts=at, phase=phase, kind=kind,
              drop=("latency_ms", "ok"), **fields)
        for kind, n in (("session", sessions), ("crash", crashes)) for i in range(n)])


def test_baseline_is_pinned_when_a0_has_too_few_sessions(con, home, policy):
    assert policy.baseline.phase == "A-0" and policy.baseline.min_sessions == 200
    _sessions(home, WS - timedelta(hours=1), "A-0", 199, 50)
    ingest_canary(con, home, policy)
    assert baseline_crash_rate(con, policy, WS) == (policy.baseline.pinned_crash_rate, "pinned")


def test_baseline_is_measured_from_a0_windows_in_the_previous_7_days(con, home, policy):
    lookback = timedelta(hours=policy.baseline.lookback_hours)
    _sessions(home, WS - timedelta(hours=2), "A-0", 120, 3)
    _sessions(home, WS - lookback, "A-0", 80, 3)  # the oldest window still inside
    # not counted: another phase, a window before the lookback, the window itself and later
    # ones, and A-0 events the policy does not judge (staging)
    _sessions(home, WS - timedelta(hours=1), "A-2", 1000, 500)
    _sessions(home, WS - lookback - timedelta(minutes=15), "A-0", 1000, 500)
    _sessions(home, WS, "A-0", 1000, 500)
    _sessions(home, WS + timedelta(minutes=15), "A-0", 1000, 500)
    _sessions(home, WS - timedelta(hours=2), "A-0", 1000, 500, tag="stg", environment="staging")
    ingest_canary(con, home, policy)
    rate, source = baseline_crash_rate(con, policy, WS)
    assert source == "measured"
    assert rate == 6 / 200


def test_baseline_feeds_the_delta(con, home, policy):
    _sessions(home, WS - timedelta(hours=3), "A-0", 400, 20)  # baseline 20 / 400 = 0.05
    ingest_canary(con, home, policy)
    base, source = baseline_crash_rate(con, policy, WS)
    assert (base, source) == (0.05, "measured")
    assert _crash(policy, 10, 100, base).passed is True   # 0.10 - 0.05 = 0.05
    assert _crash(policy, 11, 100, base).passed is False  # 0.11 - 0.05 = 0.06
    assert _crash(policy, 10, 100, policy.baseline.pinned_crash_rate).passed is False


def test_the_baseline_does_not_depend_on_which_windows_were_run(con, home, policy):
    """The A-0 windows of the lookback need not have been materialized: an A-2 window run on
    its own is judged against the A-0 events stored (found by an independent audit: the
    baseline came from `window_metrics`, so it was pinned until the A-0 windows had run)."""
    a0 = datetime(2025, 1, 17, 20, 0)
    _sessions(home, a0, "A-0", 200, 10)  # crash rate 10 / 200 = 0.05
    _sessions(home, WS, "A-2", 100, 10)  # 10 / 100 = 0.10: delta 0.05, at the threshold
    ingest_canary(con, home, policy)
    compute_window_metrics(con, policy, WS, WS)  # the A-2 window only
    score_range(con, policy, WS, WS, WS)
    (delta,) = [s for s in load_scores(con, WS, WS) if s.metric == "crash_rate_delta"]
    assert (delta.baseline, delta.value, delta.passed) == (0.05, 0.1 - 0.05, True)
    assert not [v for v in judge_range(con, policy, WS, WS, WS) if v.breach]
    # materializing the A-0 window afterwards changes nothing
    compute_window_metrics(con, policy, a0, a0)
    score_range(con, policy, WS, WS, WS)
    assert [s.baseline for s in load_scores(con, WS, WS) if s.metric == "crash_rate_delta"] \
        == [0.05]


# ---- what the alert shows at the boundary --------------------------------------------------------

def test_the_alert_never_rounds_a_failing_value_onto_its_threshold(policy):
    from rollout_assets.reporting import value_text

    restore = rule(policy, "A-1", "restore_success")
    v = duck_rate(1989, 1999)  # 0.99499..., a fail
    assert score_rule(restore, WS, "A-1", metrics(restore_success_rate=v)).passed is False
    assert value_text(v, 0.995) != "0.995" and float(value_text(v, 0.995)) == v
    p95 = 2500.0004  # a fail by 0.4 us
    assert score_rule(rule(policy, "A-1", "autosave_p95"), WS, "A-1",
                      metrics(autosave_p95_ms=p95)).passed is False
    assert value_text(p95, 2500.0) == "2500.0004"
    # ordinary values keep the short form
    assert value_text(0.995, 0.995) == "0.995"
    assert value_text(0.5, 0.995) == "0.5"
    assert value_text(1545.0, 2500.0) == "1545.0"
    assert value_text(None, 0.995) == "NULL"
