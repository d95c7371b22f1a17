"""Promotion after a rollback, through real window runs and the real rollback command: seed §5
restarts from the canary. An A-1 breach rolls the flags back to A-0, whose windows are never
judged, so the A-1 incident cannot see its green cycles there; it must not block re-promotion
to A-1 (it deadlocked: promote refused for the open incident, found by an independent audit),
and closes on A-1's green windows after it. Any other open incident still blocks."""

from __future__ import annotations

from datetime import timedelta

from rollout_assets.cli import main
from rollout_assets.runner import run_range
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import T0, promote_to, query, window_events

W = timedelta(minutes=15)


def run(home, first, last) -> None:
    run_range(home, first, last + W, log=lambda m: None)


def test_a_rolled_back_canary_restarts_and_its_incident_closes_there(home, capsys):
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", T0, "red", failed_restores=6))
    write_canary(home, "A-0", [e for i in range(1, 4)
                               for e in window_events("A-0", T0 + i * W, f"w{i}")])
    run(home, T0, T0 + 3 * W)
    assert query(home, "select phase from flag_state") == [("A-0",)]  # rolled back
    assert query(home, "select incident_id, status from incidents") == [
        ("INC-20250118T0900Z-A-1", "open")]  # A-0's windows are not judged: no green cycle

    capsys.readouterr()
    # not until a window an hour after the rolled-back one is judged: no flapping
    assert main(["--home", str(home.root), "flags", "promote", "--phase", "A-1"]) == 2
    assert "rollback.cooldown_minutes holds its promotion back" in capsys.readouterr().err
    write_canary(home, "A-0", window_events("A-0", T0 + 4 * W, "w4"))
    run(home, T0 + 4 * W, T0 + 4 * W)
    assert main(["--home", str(home.root), "flags", "promote", "--phase", "A-1"]) == 0
    out = capsys.readouterr().out
    assert ("restarting from the canary: INC-20250118T0900Z-A-1 stays open until A-1's "
            "windows are green again") in out
    assert query(home, "select phase from flag_state") == [("A-1",)]

    write_canary(home, "A-1", [e for i in (4, 5) for e in window_events("A-1", T0 + i * W,
                                                                         f"green{i}")])
    run(home, T0 + 4 * W, T0 + 5 * W)
    assert query(home, "select status, closed_window from incidents") == [
        ("closed", T0 + 5 * W)]


def test_an_open_incident_of_a_live_phase_still_blocks_promotion(home, capsys):
    """An A-1 breach that is only a warning (no rollback: the A-1 flags stay on) leaves its
    incident open: promoting on to A-2 is refused with the reason."""
    promote_to(home, "A-1")
    text = (home.policy_path).read_text()
    (home.root / "governance").mkdir(exist_ok=True)
    p2 = "        severity: P2\n        rollback: "
    (home.root / "governance" / "policy.yaml").write_text(
        text.replace(p2 + "true", p2 + "false", 1))  # A-1's restore_success
    write_canary(home, "A-1", window_events("A-1", T0, "red", failed_restores=6))
    run(home, T0, T0)
    assert query(home, "select phase from flag_state") == [("A-1",)]
    capsys.readouterr()
    assert main(["--home", str(home.root), "flags", "promote", "--phase", "A-2"]) == 2
    assert "open incident(s): INC-20250118T0900Z-A-1" in capsys.readouterr().err
