"""Seed §6 ETL slots: each stage's freshness policy and per-window slot check."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from rollout_assets.checks.etl_slots import freshness_policy, slot_evaluations
from rollout_assets.definitions import build_definitions
from rollout_assets.partitions import WINDOW, floor_window
from rollout_assets.runner import prepare_instance, run_range

WS = datetime(2025, 1, 18, 9, 0)


def test_a_stage_inside_its_slot_passes_and_a_late_one_warns(policy):
    closed = WS + WINDOW
    (on_time,) = slot_evaluations(policy, "collector", [WS], closed + timedelta(minutes=7))
    (late,) = slot_evaluations(policy, "collector", [WS], closed + timedelta(minutes=7, seconds=1))
    assert on_time.passed is True and late.passed is False
    assert late.severity == dg.AssetCheckSeverity.WARN and late.partition == "2025-01-18-09:00"
    (reporter,) = slot_evaluations(policy, "reporter", [WS], closed + timedelta(minutes=14))
    assert reporter.passed is True and reporter.metadata["slot_minutes"].value == 15
    # a backfill of an old window is not timed, nor is a window that has not closed
    assert list(slot_evaluations(policy, "analyzer", [WS], closed + timedelta(hours=2))) == []
    assert list(slot_evaluations(policy, "analyzer", [WS], WS + timedelta(minutes=5))) == []


def test_freshness_policies_come_from_the_policy_slots(home, policy):
    assert freshness_policy(7).deadline_cron == "7,22,37,52 * * * *"
    assert freshness_policy(15).deadline_cron == "0,15,30,45 * * * *"
    graph = build_definitions(home).resolve_asset_graph()
    got = {k: graph.get(dg.AssetKey(k)).freshness_policy.deadline_cron
           for k in ("canary_events", "window_metrics", "slo_scores", "window_verdicts",
                     "alert_reports")}
    assert got == {"canary_events": "7,22,37,52 * * * *", "window_metrics": "7,22,37,52 * * * *",
                   "slo_scores": "12,27,42,57 * * * *", "window_verdicts": "12,27,42,57 * * * *",
                   "alert_reports": "0,15,30,45 * * * *"}


def test_a_live_window_run_records_each_stage_against_its_slot(home):
    last_closed = floor_window(datetime.now(UTC)) - WINDOW
    run_range(home, last_closed, last_closed + WINDOW, log=lambda m: None)
    instance = prepare_instance(home)
    for asset in ("window_metrics", "window_verdicts", "alert_reports"):
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(asset), "etl_slot"), limit=5)
        assert len(history) == 1, asset
        evaluation = history[0].event.dagster_event.event_specific_data
        assert evaluation.partition == last_closed.strftime("%Y-%m-%d-%H:%M")
        assert 0 <= evaluation.metadata["minutes_after_close"].value <= 30
