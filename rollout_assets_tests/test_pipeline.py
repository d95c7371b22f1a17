"""The whole loop through Dagster on an on-disk instance: a range materialized in one run, the
tables it fills, the per-window asset-check evaluations in the instance, and a second run over the
same range that changes no row count and sends nothing twice."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass

import dagster as dg
import pytest
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from rollout_assets.partitions import partition_key, window_stamp
from rollout_assets.policy import load_policy
from rollout_assets.runner import RunSummary, prepare_instance, run_range
from rollout_assets_tests.pipeline_helpers import (
    BREACH_WINDOW,
    END,
    SMALL_WINDOW,
    START,
    WINDOWS,
    breach_home_with_flags_at_a1,
    files_under,
    judged_rules,
    persistent_home,
    query,
    table_counts,
)

SUCCEEDED = AssetCheckExecutionRecordStatus.SUCCEEDED
DONE = (SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED)
OUTPUT_DIRS = ("reports/monitoring", "reports/alerts", "reports/outbox", "reports/rollbacks")


@dataclass
class Runs:
    home: object
    first: RunSummary
    second: RunSummary
    counts_first: dict
    counts_second: dict
    files_first: dict
    files_second: dict
    notifications_first: list
    notifications_second: list


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with persistent_home(tmp_path_factory, "pipeline") as home:
        breach_home_with_flags_at_a1(home)
        log: list[str] = []
        first = run_range(home, START, END, log=log.append)
        counts_first = table_counts(home)
        files_first = files_under(home, *OUTPUT_DIRS)
        notes_first = query(home, "select * exclude (updated_at) from notifications order by 1")
        second = run_range(home, START, END, log=log.append)
        yield Runs(home, first, second, counts_first, table_counts(home), files_first,
                   files_under(home, *OUTPUT_DIRS), notes_first,
                   query(home, "select * exclude (updated_at) from notifications order by 1"))


def test_a_range_is_one_successful_dagster_run(runs):
    assert runs.first.success and runs.second.success
    # run_range pauses and freezes the garbage collector (startup.py) only while it runs
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert runs.first.windows == WINDOWS
    instance = dg.DagsterInstance.from_config(str(runs.home.dagster_home))
    window_runs = instance.get_runs(dg.RunsFilter(job_name="rollout_window_job"))
    assert len(window_runs) == 2
    for r in window_runs:
        assert r.tags["dagster/asset_partition_range_start"] == partition_key(WINDOWS[0])
        assert r.tags["dagster/asset_partition_range_end"] == partition_key(WINDOWS[-1])


def test_tables_hold_the_hand_computed_results(runs):
    home = runs.home
    metrics = {(ws, ph): (ev, asn, p95, rn, rate, excl) for ws, ph, ev, asn, p95, rn, rate, excl in
               query(home, "select window_start, phase, events, autosave_count, autosave_p95_ms, "
                           "restore_count, restore_success_rate, excluded_events "
                           "from window_metrics")}
    assert len(metrics) == 8
    for ws in WINDOWS:
        restores = 5 if ws == SMALL_WINDOW else 12
        rate = 0.5 if ws == BREACH_WINDOW else 1.0
        # 12 autosaves of 500..1600 ms: quantile_cont(0.95) = 1500 + 0.45 * 100
        assert metrics[(ws, "A-1")] == (12 + restores, 12, pytest.approx(1545.0), restores,
                                        pytest.approx(rate), 1)
        assert metrics[(ws, "A-0")][0] == 20
    verdicts = {(ws, ph): (st, br, rb, to, lvl, failed) for ws, ph, st, br, rb, to, lvl, failed in
                query(home, "select window_start, phase, status, breach, rollback_required, "
                            "rollback_to, level, failed_slos from window_verdicts")}
    assert verdicts[(BREACH_WINDOW, "A-1")] == ("breach", True, True, "A-0", "P2",
                                                ["restore_success"])
    for ws in WINDOWS:
        assert verdicts[(ws, "A-0")] == ("not_judged", False, False, None, "ok", [])
        if ws != BREACH_WINDOW:
            assert verdicts[(ws, "A-1")] == ("pass", False, False, None, "ok", [])
    scores = {(ws, slo): (passed, status, n) for ws, slo, passed, status, n in
              query(home, "select window_start, slo, passed, status, sample_size from slo_scores")}
    # every A-1 rule (shadow ones are scored too) x four windows; A-0 judges nothing
    rules = judged_rules(load_policy(home.policy_path), "A-1")
    assert {"autosave_p95", "restore_success"} <= rules
    assert set(scores) == {(ws, r) for ws in WINDOWS for r in rules}
    assert scores[(SMALL_WINDOW, "restore_success")] == (None, "insufficient_data", 5)
    assert scores[(BREACH_WINDOW, "restore_success")] == (False, "fail", 12)
    assert scores[(BREACH_WINDOW, "autosave_p95")] == (True, "pass", 12)
    # every judged row records the policy it was judged under
    version = load_policy(home.policy_path).version
    for table in ("window_metrics", "slo_scores", "window_verdicts"):
        assert query(home, f"select distinct policy_version from {table}") == [(version,)]


def test_files_are_written(runs):
    files = runs.files_first
    assert {f for f in files if f.startswith("reports/monitoring/")} == {
        f"reports/monitoring/{window_stamp(ws)}.jsonl" for ws in WINDOWS}
    lines = [json.loads(x) for x in
             files[f"reports/monitoring/{window_stamp(BREACH_WINDOW)}.jsonl"].splitlines()]
    assert sorted(x["phase"] for x in lines) == ["A-0", "A-1"]
    a1 = next(x for x in lines if x["phase"] == "A-1")
    assert a1["restore_success_rate"] == 0.5 and a1["excluded_events"] == 1
    # a guaranteed schema: the same keys on every line of every file, down to the exclusions
    every = [json.loads(x) for f, body in files.items() if f.startswith("reports/monitoring/")
             for x in body.splitlines()]
    assert len({tuple(sorted(x)) for x in every}) == 1
    names = {ex.name for ex in load_policy(runs.home.policy_path).exclusions}
    assert all(set(x["excluded_by_reason"]) == names for x in every)
    assert sum(a1["excluded_by_reason"].values()) == 1
    assert a1["window_start"] == "2025-01-18T09:15:00Z"
    # one alert report, for the one breached window, carrying the rollback's exit code
    alerts = [f for f in files if f.startswith("reports/alerts/")]
    assert alerts == [f"reports/alerts/{window_stamp(BREACH_WINDOW)}.md"]
    report = files[alerts[0]].decode()
    assert "restore_success" in report and "ExitCode=0" in report
    assert any(f.startswith("reports/outbox/") for f in files)
    # every file name is portable: a resolve's outbox file was named "...-resolve:INC-...",
    # which Windows, many sync tools and `scp host:path` cannot take (an audit found it)
    assert any("-resolve-INC-" in f for f in files)
    assert [f for f in files if set(f) & set(':*?"<>|\\')] == []


def test_the_breach_rolled_the_flags_back_once(runs):
    home = runs.home
    assert [(r.run_key, r.success, r.skipped) for r in runs.first.rollbacks] == [
        (f"{window_stamp(BREACH_WINDOW)}:A-1", True, False)]
    assert [(r.run_key, r.skipped) for r in runs.second.rollbacks] in (
        [], [(f"{window_stamp(BREACH_WINDOW)}:A-1", True)])
    assert query(home, "select phase, rollback_to, status, exit_code from rollbacks") == [
        ("A-1", "A-0", "succeeded", 0)]
    assert query(home, "select phase from flag_state") == [("A-0",)]
    history = query(home, "select action, from_phase, to_phase from flag_history "
                          "order by changed_at")
    assert [h for h in history if h[0] == "rollback"] == [("rollback", "A-1", "A-0")]
    instance = dg.DagsterInstance.from_config(str(home.dagster_home))
    assert len(instance.get_runs(dg.RunsFilter(job_name="rollback_job"))) == 1


def test_second_run_changes_no_row_count(runs):
    assert runs.counts_first["window_metrics"] == 8
    assert runs.counts_second == runs.counts_first


def test_second_run_sends_no_second_notification(runs):
    assert runs.notifications_first, "the breach was announced"
    assert runs.notifications_second == runs.notifications_first
    keys = [n[0] for n in runs.notifications_first]
    assert len(keys) == len(set(keys))
    outbox = lambda files: {f for f in files if f.startswith("reports/outbox/")}  # noqa: E731
    assert outbox(runs.files_second) == outbox(runs.files_first)


def test_second_run_rewrites_the_same_files(runs):
    assert set(runs.files_second) == set(runs.files_first)
    for f, body in runs.files_first.items():
        if f.startswith("reports/monitoring/"):
            assert runs.files_second[f] == body, f


def test_asset_check_evaluations_are_in_the_instance(runs):
    instance = dg.DagsterInstance.from_config(str(runs.home.dagster_home))
    storage = instance.event_log_storage
    key = dg.AssetCheckKey(dg.AssetKey("slo_scores"), "a1_restore_success")
    history = storage.get_asset_check_execution_history(key, limit=100)
    evaluated = [r for r in history if r.status in DONE]
    # two runs x four windows, one evaluation per window per run
    assert len(evaluated) == 8
    latest = {}
    for r in sorted(evaluated, key=lambda r: r.id):
        latest[r.partition] = r.evaluation
    assert set(latest) == {partition_key(ws) for ws in WINDOWS}
    breach = latest[partition_key(BREACH_WINDOW)]
    assert breach.passed is False and breach.severity == dg.AssetCheckSeverity.ERROR
    md = {k: v.value for k, v in breach.metadata.items()}
    assert md["value"] == 0.5 and md["threshold"] == 0.995 and md["sample_size"] == 12
    assert md["status"] == "fail" and md["window_start"].startswith("2025-01-18 09:15")
    # says what was measured against what was required (it read "...=0.5 >= 0.995")
    assert breach.description == ("fail: restore_success_rate = 0.5, required >= 0.995 "
                                  "(sample 12, min 10)")
    small = latest[partition_key(SMALL_WINDOW)]
    # too small a sample is a WARN "insufficient data", never a pass
    assert small.passed is False and small.severity == dg.AssetCheckSeverity.WARN
    assert small.metadata["status"].value == "insufficient_data"
    for ws in (WINDOWS[0], WINDOWS[2]):
        assert latest[partition_key(ws)].passed is True
    p95 = dg.AssetCheckKey(dg.AssetKey("slo_scores"), "a1_autosave_p95")
    p95_history = storage.get_asset_check_execution_history(p95, 100)
    assert [r.status for r in p95_history] == [SUCCEEDED] * 8
    # checks of phases without traffic in the range were not evaluated
    b1 = dg.AssetCheckKey(dg.AssetKey("slo_scores"), "b1_restore_success")
    assert [r for r in storage.get_asset_check_execution_history(b1, 100)
            if r.status in DONE] == []


def test_window_verdict_materializations_carry_the_rollbacks(runs):
    instance = prepare_instance(runs.home)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("window_verdicts"),
                              asset_partitions=[partition_key(BREACH_WINDOW)]), limit=10).records
    assert len(records) == 2
    for rec in records:
        required = rec.asset_materialization.metadata["rollbacks_required"].value
        assert [(r["phase"], r["rollback_to"], r["level"]) for r in required] == [
            ("A-1", "A-0", "P2")]


def test_the_tables_columns_ride_once_per_run_on_the_last_windows_materialization(runs):
    """Run-wide metadata (the table's column schema, per-file stats, the latest reports) is on
    the last window's event of each run, not copied onto every window's: the UI shows an asset's
    columns from its latest materialization, which is that one."""
    instance = prepare_instance(runs.home)
    tables = {t: [r[0] for r in query(
        runs.home, "select column_name from information_schema.columns where table_name = ? "
        "order by ordinal_position", [t])]
        for t in ("canary_events", "window_metrics", "slo_scores", "window_verdicts",
                  "alert_reports")}
    run_wide = {  # and each asset's `run/` totals: not copied as if they were each window's
        "canary_events": {"files", "collector_fault_details", "run/lines_read", "run/loaded",
                          "run/duplicates", "run/quarantined", "run/stored_events_total",
                          "run/quarantine_total"},
        "window_metrics": {"run/rows", "run/windows", "run/monitoring_files"},
        "slo_scores": {"run/scores", "run/passed", "run/failed", "run/not_judged"},
        "window_verdicts": {"run/verdicts", "run/breaches", "run/rollbacks_required"},
        "alert_reports": {"latest_reports", "run/reports", "run/messages_queued",
                          "run/messages_sent", "run/messages_failed",
                          "run/messages_already_sent", "run/resolves_delivered"}}
    for table, columns in tables.items():
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(table)), limit=100).records
        by_window: dict[str, list] = {}
        for rec in records:
            by_window.setdefault(rec.partition_key, []).append(rec.asset_materialization.metadata)
        assert sorted(by_window) == [partition_key(w) for w in WINDOWS], table
        assert all(len(mds) == 2 for mds in by_window.values()), table  # one per run
        for key, mds in by_window.items():
            for md in mds:
                carried = {"dagster/column_schema", *run_wide.get(table, ())} & md.keys()
                if key == partition_key(WINDOWS[-1]):
                    assert carried == {"dagster/column_schema", *run_wide.get(table, ())}
                    assert [c.name for c in md["dagster/column_schema"].schema.columns] == columns
                else:
                    assert carried == set(), (table, key)
        # the latest materialization, where the UI looks for an asset's columns, carries them
        latest = instance.get_latest_materialization_event(dg.AssetKey(table))
        assert latest.asset_materialization.partition == partition_key(WINDOWS[-1])
        assert "dagster/column_schema" in latest.asset_materialization.metadata


def test_window_metrics_metadata_counts_are_integers_and_unprefixed_keys_the_furthest_phase(
        runs):
    """Found by an independent audit: counts were stored as floats (`events 586.0`), and an
    unprefixed key kept an earlier phase's value when the furthest phase's was NULL."""
    instance = prepare_instance(runs.home)
    (rec,) = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("window_metrics"),
                              asset_partitions=[partition_key(BREACH_WINDOW)]), limit=1).records
    md = {k: v.value for k, v in rec.asset_materialization.metadata.items()}
    rows = query(runs.home, "select phase, events, restore_success_rate, autosave_p95_ms "
                            "from window_metrics where window_start = ?", [BREACH_WINDOW])
    assert len(rows) > 1  # several phases: the unprefixed keys are the furthest one's
    order = ("A-0", "A-1", "A-2", "B-0", "B-1")
    phase, events, rate, p95 = max(rows, key=lambda r: order.index(r[0]))
    for p, n, *_ in rows:
        assert md[f"{p}/events"] == n and isinstance(md[f"{p}/events"], int)
    assert md["events"] == events and isinstance(md["events"], int)
    assert md.get("restore_success_rate") == rate and md.get("autosave_p95_ms") == p95
