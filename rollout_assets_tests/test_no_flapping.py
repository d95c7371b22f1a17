"""No flapping, and no breach left live: a phase rolled back is not promoted again within the
cooldown (`rollback.cooldown_minutes`), and a breach while the flags are past its rollback target
is always rolled back; other breaches of an incident already rolled back record a skip."""

from datetime import datetime, timedelta

import dagster as dg
import pytest

from rollout_assets.definitions import build_definitions
from rollout_assets.flags import FlagError, promote
from rollout_assets.incidents import refresh_incidents
from rollout_assets.partitions import window_stamp
from rollout_assets.warehouse import connect

W0 = datetime(2025, 1, 18, 9, 0)
W = timedelta(minutes=15)


def _verdicts(con, rows):
    for i, status in rows:
        ws = W0 + i * W
        breach = status == "breach"
        con.execute("insert into window_verdicts values (?, ?, 'A-2', ?, ?, ?, ?, ?, ?, 't', ?)",
                    [ws, ws + W, status, breach, breach, "A-1" if breach else None,
                     "P2" if breach else "ok", ["restore_success"] if breach else [], ws])


def at_a2_with(home, policy, rows) -> None:
    """The flags at A-2 (forced), these A-2 verdicts stored, the incidents folded from them."""
    con = connect(home.db_path)
    try:
        for phase in ("A-1", "A-2"):
            promote(con, policy, phase, reason="test", force=True)
        _verdicts(con, rows)
        refresh_incidents(con, home, policy)
    finally:
        con.close()


def _rollback(home, i):
    defs = build_definitions(home)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("rollback_job").execute_in_process(
            instance=instance, run_config={"ops": {"execute_rollback": {"config": {
                "window": window_stamp(W0 + i * W), "phase": "A-2", "rollback_to": "A-1",
                "level": "P2", "failed_slos": ["restore_success"]}}}})
    assert result.success
    con = connect(home.db_path)
    try:
        return con.execute("select status, log_tail from rollbacks where window_start = ?",
                           [W0 + i * W]).fetchone()
    finally:
        con.close()


def test_a_rolled_back_phase_waits_out_the_cooldown_and_is_rolled_back_again_if_forced(
        home, policy):
    """Found by an independent audit: after a forced re-promotion, a new breach inside the
    cooldown was recorded as skipped and the breaching phase stayed live. The cooldown now holds
    the promotion back instead (in window time)."""
    at_a2_with(home, policy, [(0, "breach"), (1, "pass"), (2, "pass")])
    assert _rollback(home, 0)[0] == "succeeded"  # the first incident rolls A-2 back to A-1
    con = connect(home.db_path)
    try:
        with pytest.raises(FlagError, match=r"A-2 was rolled back for window 2025-01-18 09:00 "
                                            r"and the newest judged window is 2025-01-18 09:30: "
                                            r"rollback.cooldown_minutes holds its promotion"):
            promote(con, policy, "A-2", reason="re-promoted")
        promote(con, policy, "A-2", reason="test: re-promoted by hand", force=True)
        _verdicts(con, [(3, "breach"), (4, "pass"), (5, "pass"), (8, "breach")])
        refresh_incidents(con, home, policy)
        assert con.execute("select count(*) from incidents").fetchone()[0] == 3
    finally:
        con.close()
    status, log = _rollback(home, 3)  # a new incident while A-2 is live again: rolled back
    assert status == "succeeded", log
    status, log = _rollback(home, 8)  # the flags are behind A-2 already: nothing to move
    assert status == "skipped" and "the flags are at A-1, not past A-1" in log
    con = connect(home.db_path)
    try:
        assert con.execute("select count(*) from flag_history where action = 'rollback'"
                           ).fetchone()[0] == 2
    finally:
        con.close()


def test_windows_run_out_of_order_still_roll_an_incident_back_once(home, policy):
    """A late file breaches 10:00 after 10:15's breach was rolled back: both windows are one
    incident (opened 10:00 now), which was rolled back already; and a breach of another
    incident finds the flags rolled back already."""
    at_a2_with(home, policy, [(5, "breach"), (6, "pass"), (7, "pass")])
    assert _rollback(home, 5)[0] == "succeeded"
    con = connect(home.db_path)
    try:
        _verdicts(con, [(4, "breach"), (1, "breach"), (2, "pass"), (3, "pass")])  # arrive late
        refresh_incidents(con, home, policy)
        assert con.execute("select opened_window from incidents order by 1").fetchall() == [
            (W0 + W,), (W0 + 4 * W,)]
    finally:
        con.close()
    status, log = _rollback(home, 4)  # the incident 10:15 rolled back now opens at 10:00
    assert status == "skipped" and "was already rolled back by 20250118T1015Z:A-2" in log
    status, log = _rollback(home, 1)  # its own incident, with the flags rolled back already
    assert status == "skipped" and "the flags are at A-1, not past A-1" in log
    con = connect(home.db_path)
    try:
        assert con.execute("select count(*) from flag_history where action = 'rollback'"
                           ).fetchone()[0] == 1
    finally:
        con.close()


def test_a_relaunched_rollback_that_already_succeeded_keeps_its_record(home, policy):
    at_a2_with(home, policy, [(0, "breach")])
    assert _rollback(home, 0)[0] == "succeeded"
    con = connect(home.db_path)
    first = con.execute("select flags_before, flags_after, started_at from rollbacks").fetchall()
    con.close()
    assert _rollback(home, 0)[0] == "succeeded"  # e.g. relaunched after its process was killed
    con = connect(home.db_path)
    try:
        assert con.execute("select flags_before, flags_after, started_at from rollbacks"
                           ).fetchall() == first
        assert con.execute("select count(*) from flag_history where action = 'rollback'"
                           ).fetchone()[0] == 1
    finally:
        con.close()


def test_a_late_breach_from_before_a_re_promotion_does_not_roll_the_new_stint_back(home, policy):
    """Found by an independent audit: A-2 breached at 10:00 and was rolled back; windows up to
    11:00 were judged and A-2 promoted again; then late data made 09:45 breach. That breach
    belongs to the earlier stint, already rolled back: the healthy re-promoted phase stays."""
    at_a2_with(home, policy, [(4, "breach")])
    assert _rollback(home, 4)[0] == "succeeded"
    con = connect(home.db_path)
    try:
        _verdicts(con, [(i, "pass") for i in range(5, 9)])  # 10:15 .. 11:00
        promote(con, policy, "A-2", reason="test: re-promoted", force=True)
        _verdicts(con, [(3, "breach")])  # 09:45, late
        refresh_incidents(con, home, policy)
    finally:
        con.close()
    status, log = _rollback(home, 3)
    assert status == "skipped" and ("window 2025-01-18 09:45 was judged before the flags last "
                                    "moved to A-2 (after window 2025-01-18 11:00)") in log
    con = connect(home.db_path)
    try:
        assert con.execute("select phase from flag_state").fetchone() == ("A-2",)
    finally:
        con.close()
