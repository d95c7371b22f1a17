"""A simulated week through the real CLI (issue 4's "done means"): a merge breach on day 2 opens one
incident with its full checklist and RCA draft, the rollback runs once, the canary earns its way
back, and the GA gate opens only after 5 clean UTC days."""

from datetime import UTC, date, datetime

import duckdb

from rollout_assets.cli import main
from rollout_assets.incidents import add_business_days

MONDAY = "2025-03-03"


def rollout(home, *args) -> int:
    return main(["--home", str(home.root), *args])


def simulate(home, start, hours, phase, *extra):
    assert rollout(home, "simulate", "--start", start, "--hours", str(hours), "--rate", "30",
                   "--phase", phase, "--seed", "11", *extra) == 0


def run(home, start, end):
    assert rollout(home, "run", "--from", start, "--to", end) == 0


def q(home, sql):
    con = duckdb.connect(str(home.db_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_week_with_a_breach_on_day_two(home, capsys):
    # the flags walk to B-0 before the week starts (forced: no traffic has been judged yet)
    for phase in ("A-1", "A-2", "B-0"):
        assert rollout(home, "flags", "promote", "--phase", phase, "--force",
                       "--reason", "week scenario set-up") == 0

    # Traffic runs two hours a day (enough judged windows for a clean day, and fast; only
    # those windows are run); day 2 has
    # a B-0 morning with a merge breach, then the rolled-back A-2 afternoon.
    simulate(home, f"{MONDAY}T10:00Z", 2, "B-0")
    simulate(home, "2025-03-04T04:00Z", 4, "B-0", "--simulate-breach", "merge_auto_success_rate")
    run(home, f"{MONDAY}T10:00Z", f"{MONDAY}T12:00Z")
    run(home, "2025-03-04T04:00Z", "2025-03-04T08:00Z")
    incidents = q(home, "select incident_id, phase, level, status, rollback_exit_code, "
                        "alert_received_at is not null, escalation_decided_at is not null, "
                        "escalation_late, rca_due, closed_window is not null from incidents")
    assert len(incidents) == 1, incidents
    iid, phase, level, status, exit_code, alerted, decided, late, due, closed = incidents[0]
    assert iid.startswith("INC-20250304T") and iid.endswith("-B-0")  # day 2
    assert (phase, level, exit_code, alerted, decided, late) == ("B-0", "P2", 0, True, True, False)
    # one business day after it was found: the week is replayed today, so from today's date
    # (live, Tuesday's breach would be due Wednesday 2025-03-05)
    found = q(home, "select rca_created_at from incidents")[0][0].date()
    assert due == add_business_days(max(date(2025, 3, 4), found), 1)
    assert closed and status == "closed"  # green B-0 windows after the breach closed it
    assert q(home, "select phase from flag_state") == [("A-2",)]
    executed = q(home, "select count(*) from rollbacks where status = 'succeeded'")[0][0]
    assert executed == 1  # later breach windows attach to the incident, no second rollback
    rca = (home.rca_dir / f"{iid}.md").read_text()
    for needle in ("Owner: merge-duty-oncall@example.com", f"Due: {due}", "ExitCode=0",
                   "merge_auto_success", "## Root cause"):
        assert needle in rca

    # after the rollback the canary must earn its way back: promotion is refused at once
    capsys.readouterr()
    assert rollout(home, "flags", "promote", "--phase", "B-0") == 2
    assert "green judged windows" in capsys.readouterr().err

    # day 2 afternoon: A-2 traffic, green; then re-promotion to B-0 holds
    simulate(home, "2025-03-04T12:00Z", 3, "A-2")
    run(home, "2025-03-04T12:00Z", "2025-03-04T15:00Z")
    assert rollout(home, "flags", "promote", "--phase", "B-0") == 0
    assert q(home, "select action from flag_history order by changed_at desc limit 1") == [
        ("promote",)]

    # days 3-6 clean B-0: four clean days, GA stays closed
    for day in (5, 6, 7, 8):
        simulate(home, f"2025-03-0{day}T10:00Z", 2, "B-0")
        run(home, f"2025-03-0{day}T10:00Z", f"2025-03-0{day}T12:00Z")
    capsys.readouterr()
    assert rollout(home, "flags", "promote", "--phase", "B-1") == 2
    assert "needs 5 clean UTC days; 4 so far" in capsys.readouterr().err

    # day 7 clean: the fifth clean day opens the GA gate
    simulate(home, "2025-03-09T10:00Z", 2, "B-0")
    run(home, "2025-03-09T10:00Z", "2025-03-09T12:00Z")
    capsys.readouterr()
    assert rollout(home, "flags", "promote", "--phase", "B-1") == 0
    # it says which days held the gate, and that they are not recent (the week is in 2025)
    out = capsys.readouterr().out
    age = (datetime.now(UTC).date() - date(2025, 3, 9)).days
    assert (f"the GA gate held over the 5 UTC days ending 2025-03-09, the last day with data "
            f"({age} days ago: check that this evidence is current)") in out
    assert q(home, "select phase from flag_state") == [("B-1",)]

    sla = q(home, "select day, sum(windows_judged), sum(windows_passed), sum(breaches), "
                  "sum(rollbacks), sum(incidents) from sla_daily group by day order by day")
    assert [r[0] for r in sla] == [date(2025, 3, d) for d in range(3, 10)]
    day2 = sla[1]
    assert day2[3] > 0 and day2[4] == 1 and day2[5] == 1
    assert all(r[1] == r[2] and r[1] > 0 for r in sla[2:])  # days 3-7 fully green
    assert len(list((home.root / "reports" / "daily").glob("*.md"))) == 7
    # every verdict, rollback, promotion and incident names the policy version it was judged by
    versions = q(home, "select distinct policy_version from window_verdicts union "
                       "select distinct policy_version from rollbacks union "
                       "select distinct policy_version from flag_history union "
                       "select distinct policy_version from incidents")
    recorded = q(home, "select policy_version from policy_versions")
    assert {v for (v,) in versions} == {v for (v,) in recorded}
