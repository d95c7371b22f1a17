"""`sla_daily` through the real CLI, where a day's row depends on more than that day's windows:
an incident closed on a day its phase has no window (rolled back, the phase gets no traffic), and
days run out of order, which regroup incidents other days' rows count (found by an independent
audit)."""

from datetime import datetime, timedelta

import duckdb

from rollout_assets.cli import main
from rollout_assets_tests.conftest import event, write_canary

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
