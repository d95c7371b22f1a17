"""Canary vs baseline statistics and shadow SLOs: scored and stored, never a breach."""

import math
from datetime import datetime

import numpy as np
import pytest

from rollout_assets.analyze import judge_range, score_range
from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.compare import compare_window, mann_whitney_z, two_proportion_upper
from rollout_assets_tests.conftest import event, write_canary

W0 = datetime(2025, 1, 18, 9, 0)


def test_two_proportion_upper_bound():
    # canary 90/100, baseline 99/100: diff -0.09, se = sqrt(.09*.1... )
    se = math.sqrt(0.9 * 0.1 / 100 + 0.99 * 0.01 / 100)
    assert two_proportion_upper(90, 100, 99, 100) == pytest.approx(-0.09 + 1.959963984540054 * se)
    assert two_proportion_upper(1, 1, 0, 0) is None


def test_mann_whitney_z_by_hand():
    # U = 0 for a canary entirely below the baseline: z = -4.5 / sqrt(3*3*7/12)
    assert mann_whitney_z(np.array([1.0, 2, 3]), np.array([4.0, 5, 6])) == pytest.approx(
        -4.5 / math.sqrt(63 / 12))
    assert mann_whitney_z(np.array([4.0, 5, 6]), np.array([1.0, 2, 3])) == pytest.approx(
        4.5 / math.sqrt(63 / 12))
    assert mann_whitney_z(np.array([7.0, 7]), np.array([7.0, 7, 7])) == 0.0  # all tied
    assert mann_whitney_z(np.array([]), np.array([1.0])) is None


def test_a_slower_canary_fails_the_shadow_rule_without_a_breach(con, home, policy):
    lines = []
    for i in range(40):  # canary (qa) AutoSave is slower than the standard tenants' baseline
        lines.append(event(event_id=f"c{i}", latency_ms=2000.0 + i, ts="2025-01-18T09:01:00Z"))
        lines.append(event(event_id=f"b{i}", latency_ms=500.0 + i, tenant="standard",
                           ts="2025-01-18T09:02:00Z"))
    for i in range(40):
        lines.append(event(event_id=f"rc{i}", kind="restore", ok=True, drop=("latency_ms",),
                           ts="2025-01-18T09:03:00Z"))
        lines.append(event(event_id=f"rb{i}", kind="restore", ok=True, tenant="standard",
                           drop=("latency_ms",), ts="2025-01-18T09:03:00Z"))
    write_canary(home, "A-1", lines)
    ingest_canary(con, home, policy)
    got = compare_window(con, policy, W0, "A-1")
    assert got["baseline_autosave_count"] == 40 and got["baseline_restore_count"] == 40
    assert got["autosave_latency_vs_baseline"] == pytest.approx(
        (1600 - 800) / math.sqrt(40 * 40 * 81 / 12))  # U = 1600: every canary save is slower
    assert got["restore_success_vs_baseline"] == pytest.approx(0.0)

    compute_window_metrics(con, policy, W0, W0)
    score_range(con, policy, W0, W0, W0)
    (verdict,) = judge_range(con, policy, W0, W0, W0)
    shadow = dict(con.execute(
        "select slo, passed from slo_scores where shadow").fetchall())
    assert shadow == {"latency_vs_baseline": False, "restore_vs_baseline": True}
    assert verdict.breach is False and verdict.failed_slos == []  # shadow never breaches


def test_all_windows_in_one_query_give_each_windows_statistics(con, home, policy):
    """`compare_windows` ranks every window's AutoSaves in SQL: each window's z and restore
    bound equal the array formulas on that window's own cohorts (latencies with many ties;
    windows with one cohort only, restores only, nothing to compare)."""
    from datetime import timedelta

    from rollout_assets.compare import compare_windows

    rng = np.random.default_rng(7)
    lines, expected = [], {}
    shapes = ["both", "canary_only", "baseline_only", "restores_only", "both", "excluded_only"]
    for w, shape in enumerate(shapes):
        ws = W0 + timedelta(minutes=15 * w)
        ts = (ws + timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
        cohorts = {"canary": [], "baseline": []}
        restores = {"canary": [0, 0], "baseline": [0, 0]}
        for i in range(int(rng.integers(20, 60))):
            who = ("canary" if shape == "canary_only" else "baseline"
                   if shape == "baseline_only" else ("canary", "baseline")[i % 2])
            extra = {"tenant": "standard"} if who == "baseline" else {}
            if shape == "excluded_only":
                extra = {"environment": "staging"}
            if shape != "restores_only":
                lat = float(rng.integers(1, 8)) * 100.0  # seven values: ties everywhere
                lines.append(event(event_id=f"a{w}-{i}", ts=ts, latency_ms=lat, **extra))
                if shape != "excluded_only":
                    cohorts[who].append(lat)
            ok = bool(rng.random() < 0.9)
            lines.append(event(event_id=f"r{w}-{i}", ts=ts, kind="restore", ok=ok,
                               drop=("latency_ms",), **extra))
            if shape != "excluded_only":
                restores[who][0] += 1
                restores[who][1] += ok
        expected[ws] = (
            mann_whitney_z(np.array(cohorts["canary"]), np.array(cohorts["baseline"])),
            min(len(cohorts["canary"]), len(cohorts["baseline"])),
            two_proportion_upper(restores["canary"][1], restores["canary"][0],
                                 restores["baseline"][1], restores["baseline"][0]),
            min(restores["canary"][0], restores["baseline"][0]))
    write_canary(home, "A-1", lines)
    ingest_canary(con, home, policy)
    got = compare_windows(con, policy, "A-1", W0, W0 + timedelta(hours=2))
    for ws, (z, n_saves, upper, n_restores) in expected.items():
        if shapes[(ws - W0) // timedelta(minutes=15)] == "excluded_only":
            assert ws not in got
            continue
        g = got[ws]
        assert g["autosave_latency_vs_baseline"] == z  # exact: ranks are halves
        assert g["baseline_autosave_count"] == n_saves
        assert g["restore_success_vs_baseline"] == upper
        assert g["baseline_restore_count"] == n_restores
        assert g == compare_window(con, policy, ws, "A-1")
    assert any(v is not None for v, *_ in expected.values())
