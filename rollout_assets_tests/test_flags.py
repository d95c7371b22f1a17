"""The flag store as a state machine: rollback never moves forward, promotion is gated."""

from datetime import datetime, timedelta

import pytest

from rollout_assets import flags
from rollout_assets.policy import PolicyError, parse_policy

W0 = datetime(2025, 1, 18, 9, 0)
W = timedelta(minutes=15)


def _state(con):
    return con.execute("select phase from flag_state").fetchone()[0]


def test_rollback_when_already_behind_the_target_is_a_no_op(con, policy):
    flags.promote(con, policy, "A-1", reason="t", force=True)
    before, after, msg = flags.rollback(con, policy, "A-2")  # an A-2 breach seen late
    assert (before.phase, after.phase, _state(con)) == ("A-1", "A-1", "A-1")
    assert "already behind A-2" in msg
    _, after, msg = flags.rollback(con, policy, "A-1")
    assert after.phase == "A-1" and "already at A-1" in msg
    actions = [r[0] for r in con.execute(
        "select action from flag_history order by changed_at").fetchall()]
    assert actions == ["init", "promote"]  # A-0 judges nothing, so its gate holds; no-ops: none


def test_rollback_moves_back_and_records_history(con, policy):
    for phase in ("A-1", "A-2", "B-0"):
        flags.promote(con, policy, phase, reason="t", force=True)
    _, after, _ = flags.rollback(con, policy, "A-2", reason="merge breach")
    assert after.phase == "A-2" and after.flags == dict(policy.phase("A-2").flags)
    row = con.execute("select action, from_phase, to_phase, reason, policy_version "
                      "from flag_history order by changed_at desc limit 1").fetchone()
    assert row == ("rollback", "B-0", "A-2", "merge breach", policy.version)


def test_promotion_gate_needs_green_windows_since_the_last_change(con, policy):
    flags.promote(con, policy, "A-1", reason="t", force=True)
    # the forced change came before any judged window: said so, not "1970-01-01"
    with pytest.raises(flags.FlagError, match=r"needs 4 consecutive green judged windows since "
                       r"the last flag change \(made before any judged window\); it has 0"):
        flags.promote(con, policy, "A-2")
    with pytest.raises(flags.FlagError, match="the next phase is A-2"):
        flags.promote(con, policy, "B-0")
    for i in range(4):
        ws = W0 + i * W
        con.execute("insert into window_verdicts values (?, ?, 'A-1', 'pass', false, false, NULL, "
                    "'ok', [], 't', ?)", [ws, ws + W, ws])
    _, after, _ = flags.promote(con, policy, "A-2")
    assert after.phase == "A-2"
    assert con.execute("select action from flag_history order by changed_at desc "
                       "limit 1").fetchone() == ("promote",)


def test_a_forced_promotion_needs_a_reason(con, policy):
    flags.promote(con, policy, "A-1")  # A-0 judges nothing: the gate holds
    with pytest.raises(flags.FlagError, match="needs --reason"):
        flags.promote(con, policy, "A-2", force=True)
    _, _, msg = flags.promote(con, policy, "A-2", force=True, reason="hotfix verified by hand")
    # the override is said, not only recorded (an audit found "promoted ..." alone)
    assert "(forced past the gate: A-1 needs 4 consecutive green" in msg
    assert msg.endswith("; reason: hotfix verified by hand)")
    assert con.execute("select action, reason from flag_history order by changed_at desc "
                       "limit 1").fetchone() == ("promote_forced", "hotfix verified by hand")


def test_dry_run_rollback_writes_a_rehearsal_and_changes_nothing(con, home, policy):
    flags.promote(con, policy, "A-1", reason="t", force=True)
    rel = flags.write_rehearsal(home, policy, flags.current_state(con, policy), "A-0")
    text = (home.root / rel).read_text()
    assert rel.startswith("docs/rehearsal/") and "no flag was changed" in text
    assert "| `autosave.enabled` | `True` | `False` |" in text
    assert _state(con) == "A-1"


def test_a_drill_shows_what_the_real_rollback_would_do_and_never_overwrites_one(
        con, home, policy):
    """Found by an independent audit: with the flags at A-1, a drill to B-1 showed
    `merge.precision legacy -> stable`, which the real command refuses; and two drills in the
    same second left one file."""
    flags.promote(con, policy, "A-1", reason="t", force=True)
    state = flags.current_state(con, policy)
    when = datetime(2025, 1, 18, 9, 0, 0)
    first = flags.write_rehearsal(home, policy, state, "B-1", when=when)
    second = flags.write_rehearsal(home, policy, state, "A-0", when=when)
    assert (first, second) == ("docs/rehearsal/20250118T090000Z.md",
                               "docs/rehearsal/20250118T090000Z-2.md")
    text = (home.root / first).read_text()
    assert "The real rollback: flags already behind B-1 (at A-1); nothing to roll back" in text
    assert "| `merge.precision` | `legacy` | `legacy` |" in text
    assert "The real rollback: moves the flags A-1 -> A-0" in (home.root / second).read_text()
    assert _state(con) == "A-1"


@pytest.mark.parametrize("bad", ["A-1; rm -rf /", "../../x", "A-1\n", "Z-9", ""])
def test_phases_that_are_not_in_the_policy_are_refused(con, policy, bad):
    with pytest.raises(flags.FlagError):
        flags.rollback(con, policy, bad)


def test_a_percent_typo_in_a_rate_threshold_fails_at_load(policy):
    with pytest.raises(PolicyError, match="outside restore_success_rate's range"):
        parse_policy(policy.source_text.replace("threshold: 0.995", "threshold: 99.5", 1))


def test_the_stores_first_state_is_no_change_whatever_ran_before(con, policy):
    """`init` is not a flag change: its effective window was the newest verdict at the moment
    the store was first read, so two homes fed the same days in another order differed."""
    con.execute("insert into window_verdicts values (?, ?, 'A-1', 'pass', false, false, NULL, "
                "'ok', [], 't', ?)", [W0, W0 + W, W0])
    flags.current_state(con, policy)
    assert con.execute("select action, effective_window from flag_history").fetchall() == [
        ("init", None)]
