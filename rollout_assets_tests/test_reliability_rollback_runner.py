"""The rollback runner: argv only, never a shell; the phase validated against the policy before any
process starts; a timeout kills the command and everything it started; a non-zero exit is
recorded and escalated (P1: #incident and a PagerDuty page); no secret reaches the command or
its log."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import duckdb
import pytest
import yaml

from rollout_assets import cli
from rollout_assets.definitions import build_definitions
from rollout_assets.flags import FlagError
from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import Policy
from rollout_assets.resources.rollback_runner import TIMEOUT_EXIT_CODE, RollbackRunner
from rollout_assets.run_health import process_alive
from rollout_assets.runner import QUIET, prepare_instance
from rollout_assets.warehouse import connect
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    ok,
    promote_to,
    query,
    rollout,
    start_run,
    window_events,
)

BAD_PHASES = ["A-1; rm -rf /", "../../x", "A-1\n", "A-1 ", "$(reboot)", "`id`", "Z-9", "",
              "A-0\x00", "a-1", "A-1/../A-0"]
MARKER_TOKEN = "xoxb-MARKER-do-not-leak-7f3c"
RETRY_AFTER = 3.0  # seconds: the retry tests' rollback.retry_after_minutes


def with_command(policy: Policy, command: list[str], timeout: float = 60) -> Policy:
    return policy.model_copy(update={"rollback": policy.rollback.model_copy(
        update={"command": tuple(command), "timeout_seconds": timeout})})


def write_home_policy(home: RolloutHome, command: list[str], timeout: float = 60) -> None:
    raw = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(command=command, timeout_seconds=timeout)
    path = home.root / "governance" / "policy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("phase", BAD_PHASES)
def test_a_bad_phase_never_starts_a_process(home, policy, phase):
    touched = home.root / "started"
    runner = RollbackRunner(home=str(home.root))
    bad = with_command(policy, ["{python}", "-c", f"open({str(touched)!r}, 'w')", "{phase}"])
    with pytest.raises(FlagError, match="phase"):
        runner.run(bad, phase)
    assert not touched.exists()


@pytest.mark.parametrize("phase", ["A-1; rm -rf /", "../../x", "A-1\n"])
def test_the_cli_refuses_a_bad_phase_with_exit_2_and_one_line(home, capsys, phase):
    promote_to(home, "A-1")
    before = query(home, "select * from flag_history order by all")
    assert cli.main(["--home", str(home.root), "flags", "rollback", "--phase", phase]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rollout: invalid phase")
    assert repr(phase) in err and "A-0, A-1, A-2, B-0, B-1" in err
    assert query(home, "select * from flag_history order by all") == before


def test_the_command_is_an_argv_never_a_shell(home, policy):
    """Shell syntax in the command template reaches the process as literal arguments."""
    argv = ["{python}", "-c", "import sys; print(sys.argv[1:])", "$(touch {home}/pwned)",
            "`touch {home}/pwned2`", "; touch {home}/pwned3", "{phase}", "*"]
    out = RollbackRunner(home=str(home.root)).run(with_command(policy, argv), "A-0")
    assert out.exit_code == 0, out.output
    assert f"$(touch {home.root}/pwned)" in out.output and "'*'" in out.output
    assert not any((home.root / n).exists() for n in ("pwned", "pwned2", "pwned3"))


def test_a_timeout_kills_the_command_and_its_children(home, policy, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('waiting for the flag service', flush=True)\n"
        "time.sleep(120)\n")
    t0 = time.monotonic()
    out = RollbackRunner(home=str(home.root)).run(
        with_command(policy, ["{python}", str(script), "{phase}"], timeout=2), "A-0")
    assert time.monotonic() - t0 < 15
    assert (out.exit_code, out.timed_out) == (TIMEOUT_EXIT_CODE, True)
    assert "waiting for the flag service" in out.output and "timed out after 2s" in out.output
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while process_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(grandchild), "the command's child outlived the timeout"


def test_no_secret_reaches_the_command_or_its_output(home, policy, tmp_path, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", MARKER_TOKEN)
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_MERGE", MARKER_TOKEN + "-pd")
    monkeypatch.setenv("SOME_API_TOKEN", MARKER_TOKEN + "-other")
    leaked = tmp_path / "config.txt"  # a script that prints a token it found elsewhere
    leaked.write_text(f"token={MARKER_TOKEN}\n")
    script = ("import os, sys; print(sorted(os.environ)); print(dict(os.environ)); "
              f"print(open({str(leaked)!r}).read())")
    out = RollbackRunner(home=str(home.root)).run(
        with_command(policy, ["{python}", "-c", script, "{phase}"]), "A-0")
    assert out.exit_code == 0, out.output
    assert "SLACK_BOT_TOKEN" not in out.output and "PAGERDUTY_ROUTING_KEY_MERGE" not in out.output
    assert MARKER_TOKEN not in out.output and "token=[redacted]" in out.output
    assert "ROLLOUT_HOME" in out.output  # the rest of the environment is passed on


def test_a_failing_rollback_is_recorded_and_escalated_to_p1(home, tmp_path):
    promote_to(home, "A-1")
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('flag service said no to', sys.argv[1])\nsys.exit(3)\n")
    write_home_policy(home, ["{python}", str(script), "{phase}"])
    w = T0 + timedelta(minutes=15)  # 09:15
    con = connect(home.db_path)
    try:  # the breached window the rollback is for (its alert report is re-rendered)
        con.execute("insert into window_verdicts values (?, ?, 'A-1', 'breach', true, true, "
                    "'A-0', 'P2', ['restore_success'], 't', ?)", [w, w + timedelta(minutes=15), w])
    finally:
        con.close()
    instance = prepare_instance(home)
    defs = build_definitions(home)
    res = defs.resolve_job_def("rollback_job").execute_in_process(
        run_config={**QUIET, "ops": {"execute_rollback": {"config": {
            "window": "20250118T0915Z", "phase": "A-1", "rollback_to": "A-0", "level": "P2",
            "failed_slos": ["restore_success"]}}}},
        instance=instance, raise_on_error=False)
    assert not res.success
    assert query(home, "select status, exit_code from rollbacks") == [("failed", 3)]
    assert query(home, "select phase from flag_state") == [("A-1",)]  # nothing moved
    sent = set(query(home, "select channel, kind, level from notifications"))
    assert {("#incident", "rollback", "P1"), ("#launch-autosave", "rollback", "P1")} <= sent
    assert ("pagerduty:Autosave & Precision Merge", "escalation", "P1") in sent
    # the alert report says so too (it said P2 while the incident said P1)
    report = (home.root / "reports" / "alerts" / "20250118T0915Z.md").read_text()
    assert "- Level: **P2**, escalated to **P1**: a rollback failed" in report
    assert "ExitCode=3: the breach is live, escalated to P1" in report
    instance.dispose()



def test_a_failed_rollback_is_retried_by_the_breach_sensor_until_it_succeeds(home, tmp_path):
    """Found by independent audits: a failed rollback (a broken flag service; a reader holding
    the warehouse past the command's timeout) was never tried again, and the breach stayed
    live. The breach sensor retries it (`rollback.retries`, `retry_after_minutes`), with the
    real rollback command once the cause is gone, and stops when it succeeds."""
    from rollout_assets.runner import run_range, tick_breach_sensor

    promote_to(home, "A-1")
    gate = tmp_path / "flag-service-up"
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, subprocess, sys\n"
        f"if not os.path.exists({str(gate)!r}):\n"
        "    print('flag service unavailable'); sys.exit(3)\n"
        "sys.exit(subprocess.call([sys.executable, '-m', 'rollout_assets.cli', '--home', "
        "sys.argv[1], 'flags', 'rollback', '--phase', sys.argv[2]]))\n")
    write_home_policy(home, ["{python}", str(script), "{home}", "{phase}"])
    raw = yaml.safe_load((home.root / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(retries=2, retry_after_minutes=RETRY_AFTER / 60)
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_canary(home, "A-1", window_events("A-1", T0, "red", failed_restores=6))
    summary = run_range(home, T0, T0 + timedelta(minutes=15), log=lambda m: None)
    assert [(r.run_key, r.success) for r in summary.rollbacks] == [("20250118T0900Z:A-1", False)]
    assert query(home, "select status, exit_code from rollbacks") == [("failed", 3)]
    assert query(home, "select phase from flag_state") == [("A-1",)]

    instance = prepare_instance(home)
    defs = build_definitions(home)
    try:
        assert tick_breach_sensor(instance, defs, log=lambda m: None) == []  # not yet
        time.sleep(RETRY_AFTER)
        (first,) = tick_breach_sensor(instance, defs, log=lambda m: None)  # still down
        assert (first.run_key, first.success) == ("20250118T0900Z:A-1:retry-1", False)
        gate.touch()  # the flag service is back
        time.sleep(RETRY_AFTER)
        (second,) = tick_breach_sensor(instance, defs, log=lambda m: None)
        assert (second.run_key, second.success) == ("20250118T0900Z:A-1:retry-2", True)
        # one row and one log per attempt: the retry overwrote the failed attempts' rows and
        # log, the incident fell back to P2 and the P1 it paged left no trace in the tables
        # the GA gate reads (found by an independent audit)
        assert query(home, "select rollback_id, status, exit_code, log_path from rollbacks "
                           "order by started_at") == [
            ("20250118T0900Z:A-1", "failed", 3, "reports/rollbacks/20250118T0900Z-A-1.log"),
            ("20250118T0900Z:A-1:retry-1", "failed", 3,
             "reports/rollbacks/20250118T0900Z-A-1-retry-1.log"),
            ("20250118T0900Z:A-1:retry-2", "succeeded", 0,
             "reports/rollbacks/20250118T0900Z-A-1-retry-2.log")]
        for (log,) in query(home, "select log_path from rollbacks"):
            assert "ExitCode=" in (home.root / log).read_text()
        assert query(home, "select level, rollback_exit_code from incidents") == [("P1", 0)]
        report = (home.alerts_dir / "20250118T0900Z.md").read_text()
        assert "escalated to **P1**" in report and "- Status: succeeded" in report
        assert "- Earlier attempt `20250118T0900Z:A-1`: failed, ExitCode=3" in report
        assert "- Earlier attempt `20250118T0900Z:A-1:retry-1`: failed, ExitCode=3" in report
        # the readers' copy has the last attempt (the job writes it once its row is in; its
        # command, a `flags rollback`, leaves that to the job)
        copy = duckdb.connect(str(home.reader_db_path), read_only=True)
        try:
            assert copy.execute("select count(*), max(status) from rollbacks").fetchone() == (
                3, "succeeded")
            assert copy.execute("select phase from flag_state").fetchall() == [("A-0",)]
        finally:
            copy.close()
        assert query(home, "select phase from flag_state") == [("A-0",)]
        assert tick_breach_sensor(instance, defs, log=lambda m: None) == []  # done
        # each attempt's outcome was told (a retry's message had the first one's ledger key
        # and was dropped: the channel kept saying ExitCode=3, found by an independent audit)
        assert query(home, "select idempotency_key from notifications where kind = 'rollback' "
                           "and channel = '#launch-autosave' order by created_at") == [
            ("20250118T0900Z:A-1:#launch-autosave:rollback",),
            ("20250118T0900Z:A-1:#launch-autosave:rollback:retry-1",),
            ("20250118T0900Z:A-1:#launch-autosave:rollback:retry-2",)]
    finally:
        instance.dispose()


def test_rollout_run_exits_0_when_its_own_retry_succeeded(home, tmp_path, capsys):
    """Found by an independent audit: the run printed the retry's success, then exited 1 for
    the first attempt."""
    promote_to(home, "A-1")
    gate = tmp_path / "tried-once"
    script = tmp_path / "second-time-lucky.py"
    script.write_text(
        "import os, subprocess, sys\n"
        f"if not os.path.exists({str(gate)!r}):\n"
        f"    open({str(gate)!r}, 'w').close(); sys.exit(3)\n"
        "sys.exit(subprocess.call([sys.executable, '-m', 'rollout_assets.cli', '--home', "
        "sys.argv[1], 'flags', 'rollback', '--phase', sys.argv[2]]))\n")
    write_home_policy(home, ["{python}", str(script), "{home}", "{phase}"])
    raw = yaml.safe_load((home.root / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(retries=1, retry_after_minutes=0)
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_canary(home, "A-1", window_events("A-1", T0, "red", failed_restores=6))
    code = cli.main(["--home", str(home.root), "run", "--from", "2025-01-18T09:00Z",
                     "--to", "2025-01-18T09:15Z"])
    out = capsys.readouterr().out
    assert "20250118T0900Z:A-1: FAILED" in out and "20250118T0900Z:A-1:retry-1: succeeded" in out
    assert code == 0
    assert query(home, "select phase from flag_state") == [("A-0",)]


def test_a_retry_skipped_for_a_closed_incident_does_not_turn_a_failure_into_success(
        home, tmp_path, capsys):
    """The rollback failed, the incident closed on green windows, and the retry was skipped for
    it: `rollout run` printed the retry's "succeeded" and exited 0, and 1 when run again (found
    by an independent audit). The breach's outcome is its latest attempt's row: failed, both
    times."""
    promote_to(home, "A-1")
    write_home_policy(home, ["{python}", "-c", "raise SystemExit(3)", "{phase}"])
    raw = yaml.safe_load((home.root / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(retries=1, retry_after_minutes=0)
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_canary(home, "A-1", window_events("A-1", T0, "red", failed_restores=6)
                 + window_events("A-1", T0 + timedelta(minutes=15), "g1")
                 + window_events("A-1", T0 + timedelta(minutes=30), "g2"))
    args = ["--home", str(home.root), "run", "--from", "2025-01-18T09:00Z",
            "--to", "2025-01-18T09:45Z"]
    assert cli.main(args) == 1
    out, err = capsys.readouterr()
    assert "rollback failed for 20250118T0900Z:A-1" in err
    assert query(home, "select status from incidents") == [("closed",)]
    assert query(home, "select rollback_id, status from rollbacks") == [
        ("20250118T0900Z:A-1", "failed")]
    assert cli.main(args) == 1


def test_retries_stop_at_the_policys_count(home, tmp_path):
    from rollout_assets.runner import run_range, tick_breach_sensor

    promote_to(home, "A-1")
    write_home_policy(home, ["{python}", "-c", "raise SystemExit(3)", "{phase}"])
    raw = yaml.safe_load((home.root / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(retries=1, retry_after_minutes=0)
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_canary(home, "A-1", window_events("A-1", T0, "red", failed_restores=6))
    # (no wait: the run's own sensor tick retries at once)
    summary = run_range(home, T0, T0 + timedelta(minutes=15), log=lambda m: None)
    assert [(r.run_key, r.success) for r in summary.rollbacks] == [
        ("20250118T0900Z:A-1", False), ("20250118T0900Z:A-1:retry-1", False)]
    instance = prepare_instance(home)
    defs = build_definitions(home)
    try:
        assert tick_breach_sensor(instance, defs, log=lambda m: None) == []
    finally:
        instance.dispose()


def test_a_retry_takes_over_an_earlier_retry_whose_run_was_killed(home, tmp_path):
    """Attempts have rows of their own: retry 2 did not see retry 1's row, left 'running' by a
    killed run whose command had moved the flags, and recorded "skipped: the flags are at
    A-0" (found by an independent audit). It takes over: retry 1 is marked interrupted, and
    retry 2's row says A-1 -> A-0, with the interrupted attempt named in its log."""
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", T0, "w0", failed_restores=3))
    calls, moved = tmp_path / "calls", tmp_path / "moved"
    script = tmp_path / "fails_then_slow.py"
    script.write_text(
        "import pathlib, subprocess, sys, time\n"
        "home, phase, calls, marker = sys.argv[1:5]\n"
        "p = pathlib.Path(calls); n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "if n == 1:\n"
        "    print('flag service down'); sys.exit(3)\n"
        "r = subprocess.run([sys.executable, '-m', 'rollout_assets.cli', '--home', home, "
        "'flags', 'rollback', '--phase', phase])\n"
        "if n == 2:\n"
        "    pathlib.Path(marker).write_text(str(r.returncode)); time.sleep(2)\n"
        "sys.exit(r.returncode)\n")
    write_home_policy(home, ["{python}", str(script), "{home}", "{phase}", str(calls), str(moved)])
    raw = yaml.safe_load((home.root / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(retries=2, retry_after_minutes=0)
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    frm, to = "2025-01-18T09:00Z", "2025-01-18T09:15Z"
    proc = start_run(home, frm, to)  # attempt 1 fails; the run's own tick retries at once
    deadline = time.monotonic() + 120
    while not moved.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert moved.exists(), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)  # while retry 1's command sleeps
    proc.wait(timeout=30)
    time.sleep(2.5)
    assert query(home, "select phase from flag_state") == [("A-0",)]

    ok(rollout(home, "run", "--from", frm, "--to", to))
    rows = query(home, "select rollback_id, status, exit_code, flags_before like 'A-1 %', "
                       "flags_after like 'A-0 %' from rollbacks order by started_at")
    assert rows == [("20250118T0900Z:A-1", "failed", 3, True, False),
                    ("20250118T0900Z:A-1:retry-1", "interrupted", None, True, None),
                    ("20250118T0900Z:A-1:retry-2", "succeeded", 0, True, True)], rows
    tail = query(home, "select log_tail from rollbacks where rollback_id like '%retry-2'")[0][0]
    assert "an earlier attempt (20250118T0900Z:A-1:retry-1" in tail and "was interrupted" in tail
    assert query(home, "select count(*) from flag_history where action = 'rollback'") == [(1,)]
    # and a run of the range again says the rollback succeeded (its first attempt's failed
    # row made it exit 1; found by the same audit)
    ok(rollout(home, "run", "--from", frm, "--to", to))
    # one breach rolled back, however many attempts it took (the count was 3)
    assert query(home, "select breaches, rollbacks from sla_daily where phase = 'A-1'") == [
        (1, 1)]


def test_a_rollback_whose_run_was_killed_while_its_command_ran_is_recorded_from_the_start(
        home, tmp_path):
    """`rollout run` is killed while the rollback command runs. The command runs in its own
    session, so it finishes and moves the flags A-1 -> A-0. The next run launches the rollback
    again, whose command finds the flags moved: its row said "A-0 -> A-0, nothing to roll
    back", and nothing anywhere recorded the change this incident's rollback made (found by an
    independent audit). The attempt is now on record before the command runs, so the retry's
    row says A-1 -> A-0 and its log why."""
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", T0, "w0", failed_restores=3))
    moved = tmp_path / "moved"
    script = tmp_path / "slow_rollback.py"
    script.write_text(
        "import pathlib, subprocess, sys, time\n"
        "home, phase, marker = sys.argv[1:4]\n"
        "r = subprocess.run([sys.executable, '-m', 'rollout_assets.cli', '--home', home, "
        "'flags', 'rollback', '--phase', phase])\n"
        "pathlib.Path(marker).write_text(str(r.returncode))\n"
        "time.sleep(2)\n"
        "sys.exit(r.returncode)\n")
    write_home_policy(home, ["{python}", str(script), "{home}", "{phase}", str(moved)])
    frm, to = "2025-01-18T09:00Z", "2025-01-18T09:15Z"
    proc = start_run(home, frm, to)
    deadline = time.monotonic() + 120
    while not moved.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert moved.exists(), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)  # while the command sleeps: the run never records it
    proc.wait(timeout=30)
    time.sleep(2.5)  # the orphaned command finishes
    assert query(home, "select phase from flag_state") == [("A-0",)]
    assert query(home, "select status, flags_before like 'A-1 %' from rollbacks") == [
        ("running", True)]

    ok(rollout(home, "run", "--from", frm, "--to", to))
    (row,) = query(home, "select status, exit_code, flags_before, flags_after, log_tail "
                         "from rollbacks")
    status, code, before, after, tail = row
    assert (status, code) == ("succeeded", 0)
    assert before.startswith("A-1 ") and after.startswith("A-0 "), row
    assert "an earlier attempt" in tail and "was interrupted" in tail
    assert query(home, "select count(*) from flag_history where action = 'rollback'") == [(1,)]


def test_a_demo_whose_rollback_failed_exits_1(home, capsys):
    """Like `rollout run`: the demo's rollback failed and it exited 0 (found by an independent
    audit)."""
    write_home_policy(home, ["{python}", "-c", "raise SystemExit(3)", "{phase}"])
    raw = yaml.safe_load((home.root / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(retries=0)
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli.main(["--home", str(home.root), "demo", "--rate", "5"]) == 1
    err = capsys.readouterr().err
    assert "rollback failed for " in err and len(err.strip().splitlines()) == 1
