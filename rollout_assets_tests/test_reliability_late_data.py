"""Late and duplicate data: events appended after their window was scored get that window
re-scored by the canary late-data sensor (own cursor per file: size, mtime, scanned offset), the
verdict is corrected, a breach already handled is not rolled back or paged twice, and an
`event_id` delivered in two files counts once."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import dagster as dg
import pytest

from rollout_assets.definitions import build_definitions
from rollout_assets.runner import prepare_instance, run_range
from rollout_assets.sensors.canary_sensor import (
    SENSOR_NAME,
    appended_windows,
    load_cursor,
    tick_canary_sensor,
)
from rollout_assets_tests.conftest import event, write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    iso,
    promote_to,
    query,
    window_events,
)

W0, W1, W2 = T0, T0 + timedelta(minutes=15), T0 + timedelta(minutes=30)


def verdict(home, ws):
    return query(home, "select breach, rollback_required, rollback_to, level, failed_slos "
                       "from window_verdicts where window_start = ? and phase = 'A-1'", [ws])


def late_runs(instance):
    return [r for r in instance.get_runs()
            if r.tags.get("dagster/sensor_name") == SENSOR_NAME]


def test_late_events_rescore_the_window_once_and_never_roll_back_twice(home):
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", W0, "w0") + window_events("A-1", W1, "w1"))
    run_range(home, W0, W2, log=lambda m: None)
    assert verdict(home, W0)[0][0] is False and verdict(home, W1)[0][0] is False
    instance = prepare_instance(home)
    defs = build_definitions(home)
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []  # first tick: remember

    # six failed restores for 09:00 arrive after it was judged: 12/18 < 0.995 is a breach
    write_canary(home, "A-1", window_events("A-1", W0, "late", autosaves=0, restores=6,
                                            failed_restores=6))
    assert len(tick_canary_sensor(instance, defs, log=lambda m: None)) == 1
    runs = late_runs(instance)
    assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
    # only the window that got late events was re-scored
    assert runs[0].tags["dagster/asset_partition_range_start"] == "2025-01-18-09:00"
    assert runs[0].tags["dagster/asset_partition_range_end"] == "2025-01-18-09:00"
    assert verdict(home, W0) == [(True, True, "A-0", "P2", ["restore_success"])]
    assert verdict(home, W1)[0][0] is False
    rows = query(home, "select restore_count, restore_success_rate from window_metrics "
                       "where window_start = ? and phase = 'A-1'", [W0])
    assert rows == [(18, 12 / 18)]
    assert query(home, "select rollback_id, status from rollbacks") == [
        ("20250118T0900Z:A-1", "succeeded")]
    pages = query(home, "select count(*) from notifications where channel like 'pagerduty:%'")
    messages = query(home, "select count(*) from notifications")

    # more late failures for the breached window, and a retried delivery of already-stored
    # events in another file: re-scored again, still one rollback, no second page or message
    dup_lines = window_events("A-1", W0, "late", autosaves=0, restores=6, failed_restores=6)
    write_canary(home, "A-1", window_events("A-1", W0, "later", autosaves=0, restores=3,
                                            failed_restores=3))
    write_canary(home, "A-2", dup_lines)
    assert len(tick_canary_sensor(instance, defs, log=lambda m: None)) == 1
    assert [r.status for r in late_runs(instance)] == [dg.DagsterRunStatus.SUCCESS] * 2
    assert query(home, "select restore_count from window_metrics where window_start = ? "
                       "and phase = 'A-1'", [W0]) == [(21,)]
    assert verdict(home, W0)[0][:2] == (True, True)
    assert query(home, "select count(*) from rollbacks") == [(1,)]
    rollback_runs = [r for r in instance.get_runs(dg.RunsFilter(job_name="rollback_job"))]
    assert len(rollback_runs) == 1
    assert query(home, "select count(*) from notifications where channel like 'pagerduty:%'"
                 ) == pages
    assert query(home, "select count(*) from notifications") == messages
    # the six duplicates in phase-A-2.jsonl were counted as duplicates, stored once
    assert query(home, "select lines_read, loaded, duplicates, quarantined from ingest_files "
                       "where source_file = 'reports/canary/phase-A-2.jsonl'") == [(6, 0, 6, 0)]
    assert query(home, "select count(*), count(distinct event_key) from canary_events") == [
        (24 + 24 + 6 + 3,) * 2]

    # nothing new: no run; events for a window never scored wait for the schedule
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []
    write_canary(home, "A-1", window_events("A-1", W2, "w2"))
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []
    assert len(late_runs(instance)) == 2
    instance.dispose()


def test_late_events_in_a_file_rotated_before_the_sensor_looked_still_rescore(home):
    """Late failures for 09:00 are appended, then the file is rotated (renamed to `.1`, a new
    empty file) before the sensor's next tick: the window must still be re-scored (it kept
    its pass for good, the breach never paged; found by an independent audit). The rotated
    file's earlier lines are not scanned again: a rotation alone re-scores nothing."""
    promote_to(home, "A-1")
    base = home.canary_dir / "phase-A-1.jsonl"
    write_canary(home, "A-1", window_events("A-1", W0, "w0") + window_events("A-1", W1, "w1"))
    run_range(home, W0, W2, log=lambda m: None)
    instance = prepare_instance(home)
    defs = build_definitions(home)
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []  # first tick: remember

    base.rename(base.with_name("phase-A-1.jsonl.1"))  # a rotation with nothing late
    write_canary(home, "A-1", [])
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []

    with open(base.with_name("phase-A-1.jsonl.1"), "a") as f:  # the writer's late lines
        for e in window_events("A-1", W0, "late", autosaves=0, restores=6, failed_restores=6):
            f.write(json.dumps(e) + "\n")
    base.with_name("phase-A-1.jsonl.1").rename(base.with_name("phase-A-1.jsonl.2"))
    base.rename(base.with_name("phase-A-1.jsonl.1"))  # rotated again before the tick
    write_canary(home, "A-1", [])
    assert len(tick_canary_sensor(instance, defs, log=lambda m: None)) == 1
    runs = late_runs(instance)
    assert [(r.tags["dagster/asset_partition_range_start"],
             r.tags["dagster/asset_partition_range_end"]) for r in runs] == [
        ("2025-01-18-09:00", "2025-01-18-09:00")]
    assert verdict(home, W0) == [(True, True, "A-0", "P2", ["restore_success"])]
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []
    # a numbered chain with nothing late: `.1` (a name the sensor has a mark for) now holds
    # what was the file; it carries on from that file's mark, not from its first line (it
    # re-scored every window of the rotated file; found by an independent audit)
    write_canary(home, "A-1", window_events("A-1", W2, "w2"))
    run_range(home, W2, W2 + timedelta(minutes=15), log=lambda m: None)
    tick_canary_sensor(instance, defs, log=lambda m: None)  # sees W2's lines (one re-score)
    before = len(late_runs(instance))
    base.with_name("phase-A-1.jsonl.2").rename(base.with_name("phase-A-1.jsonl.3"))
    base.with_name("phase-A-1.jsonl.1").rename(base.with_name("phase-A-1.jsonl.2"))
    base.rename(base.with_name("phase-A-1.jsonl.1"))
    write_canary(home, "A-1", [])
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []
    assert len(late_runs(instance)) == before
    instance.dispose()


def test_duplicate_event_ids_across_files_count_once_in_a_run(home):
    first = window_events("A-1", W0, "w0")
    write_canary(home, "A-1", first)
    write_canary(home, "A-2", first[:5])  # the same five events delivered into another file
    write_canary(home, "A-1", first[5:8])  # and three again into the same file
    run_range(home, W0, W1, log=lambda m: None)
    assert query(home, "select events, autosave_count, restore_count from window_metrics "
                       "where phase = 'A-1'") == [(24, 12, 12)]
    assert query(home, "select count(*) from window_metrics where phase = 'A-2'") == [(0,)]
    files = dict((r[0], r[1:]) for r in query(
        home, "select source_file, lines_read, loaded, duplicates from ingest_files"))
    assert files["reports/canary/phase-A-1.jsonl"] == (27, 24, 3)
    assert files["reports/canary/phase-A-2.jsonl"] == (5, 0, 5)


def test_the_cursor_scans_only_complete_appended_lines(home):
    path = write_canary(home, "A-1", [event(event_id="a", ts=iso(W0))])
    windows, marks, _ = appended_windows(home, None)
    assert set(windows) == set() and marks["reports/canary/phase-A-1.jsonl"].offset == path.stat(
    ).st_size
    # an unterminated line is not consumed until its newline arrives
    line = event(event_id="b", ts="2025-01-18T18:16:00+09:00")  # 09:16 UTC
    raw = json.dumps(line).encode()
    with open(path, "ab") as f:
        f.write(raw[:20])
    windows, marks2, _ = appended_windows(home, marks)
    assert set(windows) == set()
    assert marks2["reports/canary/phase-A-1.jsonl"].offset == marks[
        "reports/canary/phase-A-1.jsonl"].offset
    with open(path, "ab") as f:
        f.write(raw[20:] + b"\n")
    windows, marks3, scanned = appended_windows(home, marks2)
    assert set(windows) == {W1}  # +09:00 converted: the event belongs to the 09:15 UTC window
    assert marks3["reports/canary/phase-A-1.jsonl"].offset == path.stat().st_size
    # a file replaced by a shorter one is scanned again from the start
    write_canary(home, "A-1", [event(event_id="c", ts=iso(W2))], mode="w")
    windows, _, _ = appended_windows(home, marks3)
    assert windows == {W2: {"A-1"}}  # with the phases its lines name
    # a new file appearing later is scanned whole
    write_canary(home, "B-0", [event(event_id="d", phase="B-0", kind="session", ts=iso(W0),
                                     drop=["latency_ms", "ok"])])
    windows, marks4, _ = appended_windows(home, marks3)
    assert W0 in windows and "reports/canary/phase-B-0.jsonl" in marks4
    assert load_cursor(None) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_keeps_its_mark_until_it_can_be_read(home):
    path = write_canary(home, "A-1", [event(event_id="a", ts=iso(W0))])
    _, marks, _ = appended_windows(home, None)
    write_canary(home, "A-1", [event(event_id="b", ts=iso(W1))])
    path.chmod(0)
    try:
        windows, marks2, _ = appended_windows(home, marks)
        assert windows == set() and marks2 == marks
    finally:
        path.chmod(0o644)
    windows, _, _ = appended_windows(home, marks2)
    assert windows == {W1}


def _kind_events(phase: str, ws, tag: str, kind: str, n: int, ok: bool | None = None,
                 second: int = 30) -> list[dict]:
    """`n` events of `kind` (sessions, crashes: no latency or ok; restores: `ok`) at one time
    in window `ws`, ids `<phase>-<tag>-<kind><i>`."""
    drop = ["latency_ms"] + (["ok"] if ok is None else [])
    return [event(event_id=f"{phase}-{tag}-{kind}{i}", phase=phase, kind=kind,
                  ts=iso(ws + timedelta(seconds=second)), drop=drop,
                  **({} if ok is None else {"ok": ok})) for i in range(n)]


def _scores(home, slo: str, ws):
    return query(home, "select value, sample_size, passed from slo_scores where slo = ? "
                       "and window_start = ? and phase = 'A-2'", [slo, ws])


def test_late_baseline_events_rescore_the_windows_judged_against_them(home):
    """Late A-0 sessions change the crash baseline of every A-2 window in the next 168 h: the
    sensor re-ran only the A-0 window they fell in, and A-2's missed breach stayed a pass
    (found by an independent audit, against a fresh home with the same files)."""
    promote_to(home, "A-2", force=True)
    wa, wb = T0 + timedelta(hours=3), T0 + timedelta(hours=26)
    write_canary(home, "A-0", _kind_events("A-0", wa, "base", "session", 250)
                 + _kind_events("A-0", wa, "base", "crash", 25))
    write_canary(home, "A-2", _kind_events("A-2", wb, "can", "session", 100)
                 + _kind_events("A-2", wb, "can", "crash", 12))
    run_range(home, wa, wa + timedelta(minutes=15), log=lambda m: None)
    run_range(home, wb, wb + timedelta(minutes=15), log=lambda m: None)
    # baseline 25/250 = 0.10, the canary 12/100 = 0.12: +0.02 holds
    assert _scores(home, "crash_rate_delta", wb) == [(pytest.approx(0.02), 100, True)]
    instance = prepare_instance(home)
    defs = build_definitions(home)
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []  # first tick: remember

    # 250 more A-0 sessions of 12:00 arrive late: the baseline is 25/500 = 0.05, +0.07 breaks
    write_canary(home, "A-0", _kind_events("A-0", wa, "late", "session", 250, second=40))
    assert len(tick_canary_sensor(instance, defs, log=lambda m: None)) == 2  # two ranges
    assert [(r.tags["dagster/asset_partition_range_start"],
             r.tags["dagster/asset_partition_range_end"]) for r in late_runs(instance)] == [
        ("2025-01-19-11:00", "2025-01-19-11:00"), ("2025-01-18-12:00", "2025-01-18-12:00")]
    assert _scores(home, "crash_rate_delta", wb) == [(pytest.approx(0.07), 100, False)]
    assert query(home, "select breach, rollback_to, level from window_verdicts "
                       "where window_start = ? and phase = 'A-2'", [wb]) == [(True, "A-1", "P2")]
    assert query(home, "select rollback_id, status from rollbacks") == [
        ("20250119T1100Z:A-2", "succeeded")]
    instance.dispose()


def test_late_restores_rescore_the_windows_whose_burn_rate_reads_them(home):
    """A-2's restore burn rate reads its last 6 h: three late failed restores of 20:00 must
    reach the 20:15 window's score too (it kept 0.0 over 600 restores; a fresh home gives
    49.75 over 603, a warning breach)."""
    w1, w2 = T0 + timedelta(hours=11), T0 + timedelta(hours=11, minutes=15)
    write_canary(home, "A-2", _kind_events("A-2", w1, "a", "restore", 300, ok=True)
                 + _kind_events("A-2", w2, "b", "restore", 300, ok=True))
    run_range(home, w1, w2 + timedelta(minutes=15), log=lambda m: None)
    assert _scores(home, "restore_slow_burn", w2) == [(0.0, 600, True)]
    instance = prepare_instance(home)
    defs = build_definitions(home)
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []

    write_canary(home, "A-2", _kind_events("A-2", w1, "late", "restore", 3, ok=False))
    assert len(tick_canary_sensor(instance, defs, log=lambda m: None)) == 1
    (run,) = late_runs(instance)
    assert (run.tags["dagster/asset_partition_range_start"],
            run.tags["dagster/asset_partition_range_end"]) == (
        "2025-01-18-20:00", "2025-01-18-20:15")
    burn = (3 / 603) / (1 - 0.9999)  # error rate over the budget: 49.75
    assert _scores(home, "restore_slow_burn", w2) == [(pytest.approx(burn), 603, False)]
    assert query(home, "select breach, level from window_verdicts where window_start = ? "
                       "and phase = 'A-2'", [w2]) == [(True, "warning")]
    instance.dispose()


def test_a_line_dated_year_9999_does_not_stop_the_sensor(home):
    """A "max date" sentinel in a late A-0 line made the later-window arithmetic overflow: the
    tick failed before it saved its cursor, so every tick failed on the same line and no late
    data was re-scored again (found by an independent audit). The Collector quarantines such a
    line; the sensor counts it nowhere, and the late failures beside it are re-scored."""
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", W0, "w0"))
    run_range(home, W0, W1, log=lambda m: None)
    instance = prepare_instance(home)
    defs = build_definitions(home)
    assert tick_canary_sensor(instance, defs, log=lambda m: None) == []
    write_canary(home, "A-0", [event(event_id="sentinel", phase="A-0", kind="session",
                                     ts="9999-12-31T23:59:59Z", drop=["latency_ms", "ok"])])
    write_canary(home, "A-1", window_events("A-1", W0, "late", autosaves=0, restores=6,
                                            failed_restores=6))
    assert len(tick_canary_sensor(instance, defs, log=lambda m: None)) == 1
    assert verdict(home, W0)[0][:2] == (True, True)
    assert query(home, "select reason from quarantine") == [("ts more than a day in the future",)]
    instance.dispose()
