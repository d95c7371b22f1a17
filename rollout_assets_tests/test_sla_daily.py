"""`sla_daily` through the real CLI, where a day's row depends on more than that day's windows:
an incident closed on a day its phase has no window (rolled back, the phase gets no traffic), and
days run out of order, which regroup incidents other days' rows count (found by an independent
audit)."""

from datetime import datetime, timedelta

import dagster as dg
import duckdb
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from rollout_assets.cli import main
from rollout_assets.definitions import build_definitions
from rollout_assets.partitions import partition_key
from rollout_assets.runner import QUIET, tick_breach_sensor
from rollout_assets.sensors.sla_sensor import sla_refresh_requests
from rollout_assets_tests.conftest import event, write_canary
from rollout_assets_tests.reliability_helpers import instance_of

D1 = datetime(2025, 3, 3)  # a Monday
D2 = D1 + timedelta(days=1)
W = timedelta(minutes=15)


def rollout(home, *args: str) -> None:
    assert main(["--home", str(home.root), *args]) == 0


def run_day(home, day: datetime) -> None:
    rollout(home, "run", "--from", f"{day:%Y-%m-%dT%H:%MZ}",
            "--to", f"{day + timedelta(days=1):%Y-%m-%dT%H:%MZ}")


def merges(ws: datetime, failed: int = 0) -> list[dict]:
    """10 B-0 merges two minutes into window `ws`, the first `failed` not automatic."""
    at = f"{ws + timedelta(minutes=2):%Y-%m-%dT%H:%M:%SZ}"
    return [event(event_id=f"m-{ws:%d%H%M}-{i}", phase="B-0", kind="merge", ok=i >= failed,
                  ts=at, drop=("latency_ms",)) for i in range(10)]


def green_a1(ws: datetime) -> list[dict]:
    at = f"{ws + timedelta(minutes=2):%Y-%m-%dT%H:%M:%SZ}"
    return [event(event_id=f"a1-{ws:%d%H%M}-{kind}-{i}", kind=kind, ts=at, latency_ms=800.0)
            for kind in ("autosave", "restore") for i in range(10)]


def sla(home) -> dict:
    con = duckdb.connect(str(home.db_path), read_only=True)
    try:
        return {(str(day), phase): rest for day, phase, *rest in con.execute(
            "select day, phase, windows_judged, breaches, rollbacks, incidents, "
            "mean_time_to_restore_minutes from sla_daily order by all").fetchall()}
    finally:
        con.close()


def test_a_restore_is_counted_on_a_day_its_phase_has_no_window(home):
    """B-0 breaches at 23:30 and is rolled back, so it gets no more traffic; the incident closes
    on the next day's green A-1 cycles (01:00, 01:15): 23:30 -> 01:30 is 120 minutes, in a
    (B-0, day 2) row although B-0 has no window that day."""
    for phase in ("A-1", "A-2", "B-0"):
        rollout(home, "flags", "promote", "--phase", phase, "--force", "--reason", "set-up")
    write_canary(home, "B-0", merges(D1.replace(hour=23)) + merges(D1.replace(hour=23, minute=30),
                                                                    failed=5))
    write_canary(home, "A-1", green_a1(D2.replace(hour=1)) + green_a1(D2.replace(hour=1) + W))
    run_day(home, D1)
    run_day(home, D2)
    rows = sla(home)
    assert rows[("2025-03-03", "B-0")] == [2, 1, 1, 1, None]
    assert rows[("2025-03-04", "B-0")] == [0, 0, 0, 0, 120.0]
    assert rows[("2025-03-04", "A-1")] == [2, 0, 0, 0, None]


def test_days_run_out_of_order_refresh_the_days_whose_incidents_changed(home):
    """Day 2 (breach at 00:00, green 00:15 and 00:30) is run before day 1 (green 23:30, breach
    23:45). Day 1's run makes one incident of both breaches, opened on day 1: day 2's row must
    no longer count it, and its restore time is 23:45 -> 00:45, 60 minutes."""
    for phase in ("A-1", "A-2", "B-0"):  # the rollbacks move the flags back from B-0
        rollout(home, "flags", "promote", "--phase", phase, "--force", "--reason", "set-up")
    write_canary(home, "B-0", [*merges(D1.replace(hour=23, minute=30)),
                               *merges(D1.replace(hour=23, minute=45), failed=5),
                               *merges(D2, failed=5), *merges(D2 + W), *merges(D2 + 2 * W)])
    run_day(home, D2)
    assert sla(home)[("2025-03-04", "B-0")] == [3, 1, 1, 1, 45.0]
    run_day(home, D1)
    rows = sla(home)
    assert rows[("2025-03-03", "B-0")] == [2, 1, 0, 1, None]
    assert rows[("2025-03-04", "B-0")] == [3, 1, 1, 0, 60.0]
    con = duckdb.connect(str(home.db_path), read_only=True)
    try:  # one incident, one rollback: the late breach's rollback was skipped
        assert con.execute("select count(*) from incidents").fetchone()[0] == 1
        assert con.execute("select window_start, status from rollbacks order by 1").fetchall() \
            == [(D1.replace(hour=23, minute=45), "skipped"), (D2, "succeeded")]
    finally:
        con.close()


def test_under_the_daemon_the_sensor_refreshes_past_days_later_runs_changed(home):
    """The same out-of-order days as above, run as the daemon runs them: window runs without the
    CLI's follow-up, the breach sensor's rollbacks, the `daily_sla` schedule's run of day 2. Day
    1's later window run regroups day 2's incident; only `sla_refresh_sensor` brings day 2's row
    up to date (it kept the incident and the 45-minute restore)."""
    for phase in ("A-1", "A-2", "B-0"):  # the rollbacks move the flags back from B-0
        rollout(home, "flags", "promote", "--phase", phase, "--force", "--reason", "set-up")
    write_canary(home, "B-0", [*merges(D1.replace(hour=23, minute=30)),
                               *merges(D1.replace(hour=23, minute=45), failed=5),
                               *merges(D2, failed=5), *merges(D2 + W), *merges(D2 + 2 * W)])
    defs = build_definitions(home)
    instance = instance_of(home)
    try:
        def execute(job: str, first: str, last: str) -> None:
            result = defs.resolve_job_def(job).execute_in_process(
                instance=instance, run_config=QUIET,
                tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last})
            assert result.success

        def window_day(day: datetime) -> None:  # the schedule's windows, then the breach sensor
            execute("rollout_window_job", partition_key(day),
                    partition_key(day + timedelta(days=1) - W))
            tick_breach_sensor(instance, defs, log=lambda m: None)

        def tick(today: datetime, cursor: str | None) -> tuple[list[str], str]:
            requests, cursor = sla_refresh_requests(instance, cursor, today.date())
            for rr in requests:
                execute("rollout_daily_job", rr.partition_key, rr.partition_key)
            return [rr.partition_key for rr in requests], cursor

        days, cursor = tick(D2 + timedelta(days=2), None)  # the first tick only records
        assert days == []
        window_day(D2)
        execute("rollout_daily_job", "2025-03-04", "2025-03-04")
        assert sla(home)[("2025-03-04", "B-0")] == [3, 1, 1, 1, 45.0]
        window_day(D1)  # late: day 1's files arrive after day 2 was scored
        execute("rollout_daily_job", "2025-03-03", "2025-03-03")
        assert sla(home)[("2025-03-04", "B-0")] == [3, 1, 1, 1, 45.0]  # stale without the sensor
        # today is day 2: its own rows wait for the schedule
        days, _ = tick(D2, cursor)
        assert days == ["2025-03-03"]
        days, cursor = tick(D2 + timedelta(days=2), cursor)
        assert days == ["2025-03-03", "2025-03-04"]
        rows = sla(home)
        assert rows[("2025-03-03", "B-0")] == [2, 1, 0, 1, None]
        assert rows[("2025-03-04", "B-0")] == [3, 1, 1, 0, 60.0]  # as `rollout run` gives
        assert tick(D2 + timedelta(days=2), cursor)[0] == []  # each change once
        # runs `rollout run` launched: the CLI refreshed those days itself
        run_day(home, D1)
        assert tick(D2 + timedelta(days=2), cursor)[0] == []
    finally:
        instance.dispose()


def fast_b1(day: datetime, latency_ms: float = 500.0) -> list[dict]:
    """One judged B-1 window at 09:00 of `day`: 10 autosaves (p95 passes at 500 ms, a P1
    breach at 5000 ms)."""
    at = f"{day.replace(hour=9, minute=2):%Y-%m-%dT%H:%M:%SZ}"
    return [event(event_id=f"b1-{day:%d}-{latency_ms:g}-{i}", phase="B-1", kind="autosave",
                  ts=at, latency_ms=latency_ms) for i in range(10)]


def latest_gates(home) -> dict[str, bool]:
    instance = instance_of(home)
    try:
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("sla_daily"), "ga_gate"), limit=500)
        latest = {}
        for r in sorted(history, key=lambda r: r.id):
            latest[r.partition] = r.evaluation.passed
        return latest
    finally:
        instance.dispose()


def gate_line(home, day: datetime) -> str:
    text = (home.root / "reports" / "daily" / f"{day:%Y%m%d}.md").read_text()
    return next(line for line in text.splitlines() if line.startswith("GA gate"))


def test_the_gate_of_later_days_follows_a_day_that_changed(home):
    """A day's GA gate reads the 4 days before it. Days run newest first left days 5 and 6
    closed ("no judged windows" on days not yet run), and a late P1 breach on day 2 left days
    3-6 open, in the check history and the daily summaries (found by an independent audit)."""
    days = [D1 + timedelta(days=k) for k in range(6)]
    write_canary(home, "B-1", [e for d in days for e in fast_b1(d)])
    for d in reversed(days):
        run_day(home, d)
    gates = latest_gates(home)
    assert [gates[f"{d:%Y-%m-%d}"] for d in days] == [False] * 4 + [True] * 2
    assert gate_line(home, days[5]) == f"GA gate on {days[5]:%Y-%m-%d}: OPEN"

    write_canary(home, "B-1", fast_b1(days[1], latency_ms=5000.0))  # late: a P1 breach
    rollout(home, "run", "--from", f"{days[1]:%Y-%m-%dT09:00Z}",
            "--to", f"{days[1]:%Y-%m-%dT09:15Z}")
    gates = latest_gates(home)
    assert [gates[f"{d:%Y-%m-%d}"] for d in days] == [False] * 6
    assert gate_line(home, days[5]).startswith(f"GA gate on {days[5]:%Y-%m-%d}: closed")
    assert f"{days[1]:%Y-%m-%d}: 1 window(s) missed an SLO" in gate_line(home, days[5])
