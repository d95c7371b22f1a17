"""Retention of canary events (`retention.canary_events_days`), through the real window runs:
old events are deleted before a run reads new lines, never what the run judges; the windows
they fed keep their rows (never recomputed from what is left), `rollout run` refuses a range of
only kept windows, each purge is recorded, and every file's counts still add up."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from rollout_assets.cli import main
from rollout_assets.definitions import build_definitions
from rollout_assets.home import PROJECT_ROOT
from rollout_assets.partitions import partition_key
from rollout_assets.policy import PolicyError, parse_policy
from rollout_assets.runner import BadRange, run_range
from rollout_assets.sensors.canary_sensor import tick_canary_sensor
from rollout_assets_tests.conftest import event, write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    instance_of,
    promote_to,
    query,
    window_events,
)

W = timedelta(minutes=15)
D = timedelta(days=1)
FIRST = T0 - 4 * D  # five days of one A-1 window at 09:00 each: T0 - 4 days .. T0
ROWS = {
    "window_metrics": "select * from window_metrics",
    "slo_scores": "select * from slo_scores",
    "window_verdicts": "select * from window_verdicts",
}


def policy_text(days: int | None, lookback_hours: int = 24) -> str:
    text = (PROJECT_ROOT / "governance" / "policy.yaml").read_text()
    text = text.replace("  lookback_hours: 168\n", f"  lookback_hours: {lookback_hours}\n")
    assert "  canary_events_days: null\n" in text
    return text.replace("  canary_events_days: null\n",
                        f"  canary_events_days: {'null' if days is None else days}\n")


def rows(home, table: str, where: str = "") -> list[tuple]:
    return sorted(query(home, ROWS[table] + where), key=repr)


def test_retention_shorter_than_a_verdicts_history_is_refused_at_load():
    with pytest.raises(PolicyError, match="retention.canary_events_days: 1 day"):
        parse_policy(policy_text(1))
    with pytest.raises(PolicyError, match="168 h of events"):
        parse_policy(policy_text(7, lookback_hours=168))
    assert parse_policy(policy_text(8, lookback_hours=168)).retention.canary_events_days == 8
    assert parse_policy(policy_text(None)).event_history_minutes == 24 * 60


def test_old_events_are_deleted_and_their_windows_kept_as_they_were(home, capsys):
    (home.root / "governance").mkdir()
    (home.root / "governance" / "policy.yaml").write_text(policy_text(2))  # 1 day of history
    promote_to(home, "A-1")
    for i in range(5):
        write_canary(home, "A-1", window_events("A-1", FIRST + i * D, f"d{i}"))
    assert run_range(home, FIRST, T0 + W, log=lambda m: None).success
    # the first run stored nothing before: every window computed, nothing deleted
    assert query(home, "select count(*) from canary_events") == [(5 * 24,)]
    assert query(home, "select count(*) from event_retention") == [(0,)]
    before = {t: rows(home, t) for t in ROWS}
    assert len(before["window_metrics"]) == 5
    monitoring = home.root / "reports" / "monitoring" / f"{T0 - 2 * D:%Y%m%dT%H%MZ}.jsonl"
    exported = (monitoring.read_bytes(), monitoring.stat().st_mtime_ns)

    # the next window's events and one late event of the oldest window
    write_canary(home, "A-1", window_events("A-1", T0 + W, "next")
                 + [event(event_id="late-0", phase="A-1", kind="restore", ok=False,
                          ts=f"{FIRST + timedelta(minutes=5):%Y-%m-%dT%H:%M:%S}Z",
                          drop=["latency_ms"])])
    assert run_range(home, T0 + W, T0 + 2 * W, log=lambda m: None).success
    horizon = (T0 - 2 * D).replace(hour=0)  # the newest stored window's day, minus 2 days
    # before the run read its lines: the two oldest days, not the late event read after it
    assert query(home, "select purged_before, deleted_events, newest_window, canary_events_days "
                       "from event_retention") == [(horizon, 48, T0, 2)]
    assert query(home, "select window_start, event_key is not null from canary_events "
                       "where window_start < ?", [horizon]) == [(FIRST, True)]
    assert query(home, "select count(*) from canary_events") == [(3 * 24 + 24 + 1,)]
    assert {t: rows(home, t, f" where window_start < '{T0 + W}'") for t in ROWS} == before

    # windows before the horizon + 1 day of history are kept: a range of only those is refused
    kept = horizon + D
    with pytest.raises(BadRange, match="deleted by retention"):
        run_range(home, FIRST, FIRST + W, log=lambda m: None)
    capsys.readouterr()
    assert main(["--home", str(home.root), "run", "--from", f"{FIRST:%Y-%m-%dT%H:%MZ}",
                 "--to", f"{kept:%Y-%m-%dT%H:%MZ}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "retention.canary_events_days" in err

    # a range across it recomputes only the later windows; the kept ones are left as they were
    said = []
    assert run_range(home, T0 - 2 * D, T0 + 2 * W, log=said.append).success
    assert any("kept as they were" in m for m in said)
    kept_rows = {t: rows(home, t, f" where window_start < '{kept}'") for t in ROWS}
    assert kept_rows == {t: [r for r in before[t] if r[0] < kept] for t in ROWS}
    assert len(kept_rows["window_metrics"]) == 3  # computed_at and all: not rewritten
    assert (monitoring.read_bytes(), monitoring.stat().st_mtime_ns) == exported
    recomputed = query(home, "select window_start, computed_at > ? from window_metrics "
                             "where window_start >= ? order by 1",
                       [max(r[-1] for r in query(home, "select computed_at from window_metrics "
                                                       "where window_start < ?", [kept])), kept])
    assert recomputed == [(T0 - D, True), (T0, True), (T0 + W, True)]
    # the late event went with the next purge, recorded too
    assert query(home, "select deleted_events from event_retention order by purged_at") == [
        (48,), (1,)]
    assert query(home, "select count(*) from canary_events where window_start < ?",
                 [horizon]) == [(0,)]
    # every line read is still loaded, a duplicate or quarantined: the counts are the files'
    assert query(home, "select sum(lines_read), sum(loaded), sum(duplicates + quarantined) "
                       "from ingest_files") == [(6 * 24 + 1, 6 * 24 + 1, 0)]

    # a replay does not re-score kept windows from what is left of their history
    policy = str(home.root / "governance" / "policy.yaml")
    capsys.readouterr()
    assert main(["--home", str(home.root), "replay", "--policy", policy, "--from",
                 f"{FIRST:%Y-%m-%dT%H:%MZ}", "--to", f"{T0 + 2 * W:%Y-%m-%dT%H:%MZ}"]) == 0
    out = capsys.readouterr().out
    assert f"windows before {kept:%Y-%m-%dT%H:%MZ} are not replayed" in out
    assert "over 3 (window, phase) verdicts; 0 would change" in out
    assert main(["--home", str(home.root), "replay", "--policy", policy, "--from",
                 f"{FIRST:%Y-%m-%dT%H:%MZ}", "--to", f"{kept:%Y-%m-%dT%H:%MZ}"]) == 2

    # the UI says why a kept window's materialization changed nothing
    instance = instance_of(home)
    try:
        for key in ROWS:
            (record,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(key),
                                      asset_partitions=[partition_key(T0 - 2 * D)]),
                limit=1).records
            md = record.asset_materialization.metadata
            assert "deleted by retention" in md["kept"].value, key
            assert "rollbacks_required" not in md and "phases" not in md

        # late lines: the late-data sensor re-scores the judged window, not the kept one (a
        # run for it would change nothing)
        # (the sensor reads the horizon the Collector's latest run recorded, not the warehouse)
        (latest,) = instance.fetch_materializations(dg.AssetKey("canary_events"), limit=1).records
        assert latest.asset_materialization.metadata["retention/kept_before"].value == (
            kept.isoformat())
        defs = build_definitions(home)
        assert tick_canary_sensor(instance, defs, log=lambda m: None) == []  # first tick
        write_canary(home, "A-1", [
            event(event_id=f"late-{w:%d%H%M}", phase="A-1", kind="restore", ok=True,
                  ts=f"{w + timedelta(minutes=1):%Y-%m-%dT%H:%M:%S}Z", drop=["latency_ms"])
            for w in (FIRST, T0 + W)])
        (run_id,) = tick_canary_sensor(instance, defs, log=lambda m: None)
        tags = instance.get_run_by_id(run_id).tags
        assert (tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]) == (
            partition_key(T0 + W), partition_key(T0 + W))
    finally:
        instance.dispose()


def test_a_run_judges_its_own_old_windows_before_retention_deletes_them(home):
    """Found by an independent audit: old files ingested by a run of a newer window, then a run
    of the old window, whose purge (horizon from the newest stored window) deleted that window's
    events first: it was "kept", never judged, and its breach lost. The horizon never passes
    the run's own windows and their history."""
    (home.root / "governance").mkdir()
    (home.root / "governance" / "policy.yaml").write_text(policy_text(2))  # 1 day of history
    promote_to(home, "A-1")
    old = T0 - 5 * D
    write_canary(home, "A-1", window_events("A-1", old, "old", failed_restores=6)
                 + window_events("A-1", T0, "new"))
    assert run_range(home, T0, T0 + W, log=lambda m: None).success  # stores both windows
    assert query(home, "select count(*) from canary_events") == [(48,)]
    assert run_range(home, old, old + W, log=lambda m: None).success
    assert query(home, "select breach, rollback_to from window_verdicts "
                       "where window_start = ?", [old]) == [(True, "A-0")]
    assert query(home, "select coalesce(sum(deleted_events), 0) from event_retention") == [(0,)]
    # the next live run deletes them, judged now, and the window keeps its verdict
    write_canary(home, "A-1", window_events("A-1", T0 + W, "next"))
    assert run_range(home, T0 + W, T0 + 2 * W, log=lambda m: None).success
    assert query(home, "select sum(deleted_events) from event_retention") == [(24,)]
    assert query(home, "select breach from window_verdicts where window_start = ?",
                 [old]) == [(True,)]
