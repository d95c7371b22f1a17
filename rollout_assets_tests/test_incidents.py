"""Incident lifecycle as a pure fold, business-day due dates, RCA drafts that keep human edits."""

from datetime import date, datetime, timedelta

from rollout_assets.incidents import (
    AUTO_END,
    AUTO_START,
    WindowOutcome,
    add_business_days,
    fold_incidents,
    refresh_incidents,
)

T0 = datetime(2025, 1, 17, 9, 0)  # a Friday
W = timedelta(minutes=15)


def breach(i, phase="A-2", level="P2", slos=("restore_success",), rb=True):
    return WindowOutcome(T0 + i * W, True, {phase: (level, tuple(slos), rb)})


def green(i):
    return WindowOutcome(T0 + i * W, True, {})


def quiet(i):
    return WindowOutcome(T0 + i * W, False, {})


def test_first_breach_opens_later_breaches_attach_two_green_cycles_close():
    incs = fold_incidents([breach(0), breach(1, level="P1", slos=("crash_rate_delta",)), green(2),
                           green(3), green(4)], close_after=2)
    assert len(incs) == 1
    inc = incs[0]
    assert inc.incident_id == "INC-20250117T0900Z-A-2"
    assert inc.breach_windows == 2
    assert inc.level == "P1"  # the worst level seen
    assert inc.failed_slos == ["crash_rate_delta", "restore_success"]
    assert inc.closed_window == T0 + 3 * W
    assert [s for _, s, _ in inc.timeline] == [
        "opened", "breach attached", "green cycle", "green cycle", "closed"]


def test_a_breach_resets_the_green_count_and_unjudged_windows_do_not_count():
    incs = fold_incidents([breach(0), green(1), breach(2), green(3), quiet(4), green(5)],
                          close_after=2)
    assert len(incs) == 1
    assert incs[0].breach_windows == 2
    assert incs[0].closed_window == T0 + 5 * W  # windows 3 and 5; the unjudged 4 is no cycle


def test_a_new_breach_after_closure_opens_a_new_incident_and_phases_are_separate():
    incs = fold_incidents([breach(0), green(1), green(2), breach(3), breach(3 + 0, phase="B-0")],
                          close_after=2)
    ids = [i.incident_id for i in incs]
    assert ids == ["INC-20250117T0900Z-A-2", "INC-20250117T0945Z-A-2", "INC-20250117T0945Z-B-0"]
    assert incs[0].status == "closed" and incs[1].status == "open"


def test_order_of_input_does_not_matter():
    seq = [breach(0), breach(1), green(2), green(3)]
    a = fold_incidents(seq, 2)
    b = fold_incidents(list(reversed(seq)), 2)
    assert [(i.incident_id, i.closed_window) for i in a] == [
        (i.incident_id, i.closed_window) for i in b]


def test_business_days_skip_weekends():
    assert add_business_days(date(2025, 1, 16), 1) == date(2025, 1, 17)  # Thu -> Fri
    assert add_business_days(date(2025, 1, 17), 1) == date(2025, 1, 20)  # Fri -> Mon
    assert add_business_days(date(2025, 1, 18), 1) == date(2025, 1, 20)  # Sat -> Mon
    assert add_business_days(date(2025, 1, 19), 1) == date(2025, 1, 20)  # Sun -> Mon
    assert add_business_days(date(2025, 1, 17), 2) == date(2025, 1, 21)


def _verdict(con, ws, phase, status, level="ok", failed=(), rb=False, rollback_to=None):
    con.execute(
        "insert into window_verdicts values (?, ?, ?, ?, ?, ?, ?, ?, ?, 'test', ?)",
        [ws, ws + W, phase, status, status == "breach", rb, rollback_to, level, list(failed), ws])


def test_refresh_writes_rows_timeline_and_an_rca_that_keeps_human_edits(con, home, policy):
    _verdict(con, T0, "A-2", "breach", "P2", ["restore_success"], True, "A-1")
    _verdict(con, T0 + W, "A-2", "pass")
    rows = refresh_incidents(con, home, policy, now=T0 + 2 * W)  # live: seen as it happened
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "open" and r["green_cycles"] == 1
    assert r["rca_due"] == date(2025, 1, 20)  # opened Friday -> due Monday
    assert r["owner"] == policy.incidents.oncall["autosave"][0]
    assert r["rollback_executed_at"] is None and r["escalation_decided_at"] is None
    rca = home.rca_dir / "INC-20250117T0900Z-A-2.md"
    text = rca.read_text()
    assert "Due: 2025-01-20" in text and AUTO_START in text and "restore_success" not in text.split(
        AUTO_END)[1]
    # a person fills in the root cause; the next run refreshes only the generated block
    rca.write_text(text.replace("## Root cause\n\n_Fill in._", "## Root cause\n\nA bad index."))
    _verdict(con, T0 + 2 * W, "A-2", "pass")
    rows = refresh_incidents(con, home, policy)
    assert rows[0]["status"] == "closed"
    text = rca.read_text()
    assert "A bad index." in text
    assert "after 2 green cycles" in text
    timeline = con.execute(
        "select step from incident_timeline order by window_start, step").fetchall()
    assert [t[0] for t in timeline] == ["opened", "green cycle", "closed", "green cycle"]


def test_an_incident_found_by_a_backfill_is_due_a_business_day_after_it_was_found(con, home,
                                                                                 policy):
    """Its due date counted from the breached window's day: a backfill of last month made
    drafts already overdue (found by an independent audit). It counts from when the incident
    was first seen, when that is later, and keeps that date on later runs."""
    _verdict(con, T0, "A-2", "breach", "P2", ["restore_success"], True, "A-1")
    found = datetime(2025, 3, 6, 16, 0)  # a Thursday, weeks later
    (row,) = refresh_incidents(con, home, policy, now=found)
    assert row["rca_due"] == date(2025, 3, 7)
    (row,) = refresh_incidents(con, home, policy, now=found + timedelta(days=5))
    assert row["rca_due"] == date(2025, 3, 7) and row["rca_created_at"] == found
    assert "Due: 2025-03-07" in (home.rca_dir / "INC-20250117T0900Z-A-2.md").read_text()


def test_failed_rollback_escalates_to_p1(con, home, policy):
    _verdict(con, T0, "A-2", "breach", "P2", ["restore_success"], True, "A-1")
    con.execute(
        "insert into rollbacks values ('k', ?, 'A-2', 'A-1', 'failed', 'cmd', 3, 'boom', NULL, "
        "'A-2', 'A-2', 'run', 'test', ?, ?)", [T0, T0 + W, T0 + W])
    rows = refresh_incidents(con, home, policy)
    assert rows[0]["level"] == "P1"
    assert rows[0]["rollback_exit_code"] == 3


def test_the_rca_header_follows_an_escalation_and_keeps_a_level_people_wrote(con, home,
                                                                             policy):
    """The draft is written once, when the incident opens at P2; a failed rollback (or a later
    P1 breach) escalates it, and the header said P2 for good (found by an independent audit).
    The generated level line follows the incident; one a person rewrote is theirs."""
    _verdict(con, T0, "A-2", "breach", "P2", ["restore_success"], True, "A-1")
    refresh_incidents(con, home, policy)
    rca = home.rca_dir / "INC-20250117T0900Z-A-2.md"
    assert "\n- Level: P2\n" in rca.read_text()
    rca.write_text(rca.read_text().replace("_Fill in._", "A bad index.", 1))
    con.execute(
        "insert into rollbacks values ('k', ?, 'A-2', 'A-1', 'failed', 'cmd', 3, 'boom', NULL, "
        "'A-2', 'A-2', 'run', 'test', ?, ?)", [T0, T0 + W, T0 + W])
    refresh_incidents(con, home, policy)
    text = rca.read_text()
    assert "\n- Level: P1\n" in text and "- Level: P2" not in text
    assert "A bad index." in text
    # the on-call's own words on the level stay as they wrote them
    rca.write_text(text.replace("- Level: P1\n", "- Level: P1 (IC call: sev-1)\n"))
    _verdict(con, T0 + W, "A-2", "breach", "P1", ["restore_success"], True, "A-1")
    refresh_incidents(con, home, policy)
    assert "- Level: P1 (IC call: sev-1)\n" in rca.read_text()


def test_an_incident_never_closes_before_its_alert_was_received(con, home, policy):
    """A range run closes an incident (two green windows after its breach) in its incidents
    step, before its Reporter step sends the alert: the next refresh found the alert received
    after the close (found by an independent audit). A close is recorded no earlier than the
    alert."""
    _verdict(con, T0, "A-2", "breach", "P2", ["restore_success"], True, "A-1")
    _verdict(con, T0 + W, "A-2", "pass")
    _verdict(con, T0 + 2 * W, "A-2", "pass")
    t1 = datetime(2025, 1, 18, 12, 0)
    (row,) = refresh_incidents(con, home, policy, now=t1)
    assert row["status"] == "closed" and row["closed_at"] == t1
    assert row["alert_received_at"] <= t1  # judged_at, until an alert is delivered
    sent = t1 + timedelta(seconds=3)  # the Reporter, after the incidents step
    con.execute(
        "insert into notifications (idempotency_key, window_start, phase, channel, kind, level, "
        "transport, status, attempts, incident_id, created_at, updated_at) values "
        "('k', ?, 'A-2', '#launch-autosave', 'alert', 'P2', 'slack', 'sent', 1, "
        "'INC-20250117T0900Z-A-2', ?, ?)", [T0, sent, sent])
    (row,) = refresh_incidents(con, home, policy, now=t1 + timedelta(minutes=15))
    assert row["alert_received_at"] == sent
    assert row["closed_at"] == sent
    assert con.execute("select closed_at >= alert_received_at from incidents").fetchone() == (
        True,)


def test_an_alert_report_shows_the_failed_attempts_before_a_skipped_one(con, home, policy):
    """A breach whose rollback failed, then whose retry was skipped (another window's retry had
    rolled the incident back): its report said "escalated to P1: a rollback failed (see
    below)" and below showed only "Not run again" (found by an independent audit)."""
    from rollout_assets.reporting import alert_context, render_alert

    _verdict(con, T0, "A-2", "breach", "P2", ["restore_success"], True, "A-1")
    for rid, status, code, tail, log, at in (
            ("20250117T0900Z:A-2", "failed", 3, "flag service down",
             "reports/rollbacks/20250117T0900Z-A-2.log", T0 + W),
            ("20250117T0900Z:A-2:retry-1", "skipped", None,
             "incident was already rolled back by 20250117T0915Z:A-2:retry-1", None,
             T0 + 2 * W)):
        con.execute("insert into rollbacks values (?, ?, 'A-2', 'A-1', ?, 'cmd', ?, ?, ?, "
                    "'A-2', 'A-2', 'run', 'test', ?, ?)",
                    [rid, T0, status, code, tail, log, at, at])
    text = render_alert(home, alert_context(con, policy, T0)).read_text()
    assert "escalated to **P1**: a rollback failed (see below)" in text
    assert "Not run again: incident was already rolled back by 20250117T0915Z:A-2:retry-1" in text
    assert ("- Earlier attempt `20250117T0900Z:A-2`: failed, ExitCode=3 (log "
            "`reports/rollbacks/20250117T0900Z-A-2.log`)") in text
