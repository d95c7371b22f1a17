"""Collector I/O faults (seed §7.4): a canary file that cannot be read is retried when the error is
retryable and escalated when it is not. Escalation is a verdict: not retryable (missing, permission
denied, not a regular file) -> breach, rollback_required, level P1 (paged, #incident, rolled back
one phase); retryable and still failing after the retries -> breach, level P2, no rollback. The
other canary files are ingested as usual, and the fault is visible in `collector_faults`, the
verdict's failed SLOs, the run's log and the alert report.

Real faults, no mocks: EIO comes from reading /proc/self/mem through a symlink named like a
canary file; "unreadable" is chmod 000, or a directory in its place when the tests run as root
(root reads any file); "missing" is a file the Collector has read before, deleted.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from rollout_assets import cli
from rollout_assets.collector_faults import HARD_SLO, SOFT_SLO, probe_file
from rollout_assets.runner import run_range
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    instance_of,
    promote_to,
    query,
    window_events,
)

W0, W1, W2 = T0, T0 + timedelta(minutes=15), T0 + timedelta(minutes=30)
EIO_SOURCE = "/proc/self/mem"  # reading it at offset 0 fails with EIO, for every process


def make_unreadable(path: Path) -> str:
    """Make a canary file unreadable, as far as this user can; returns the expected errno."""
    if os.geteuid() != 0:
        path.chmod(0)
        return "EACCES"
    path.unlink()
    path.mkdir()  # root reads any file, but no one reads a directory as a file
    return "EISDIR"


def make_eio(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(EIO_SOURCE)


def verdict(home, ws, phase):
    return query(home, "select breach, rollback_required, rollback_to, level, failed_slos "
                       "from window_verdicts where window_start = ? and phase = ?", [ws, phase])


def faults(home):
    return query(home, "select window_start, phase, source_file, retryable, reason, attempts "
                       "from collector_faults order by all")


@pytest.mark.skipif(not Path(EIO_SOURCE).exists(), reason="needs /proc")
def test_a_retryable_error_is_retried_until_it_clears(tmp_path):
    path = tmp_path / "phase-A-1.jsonl"
    make_eio(path)
    seen = []

    def fix_after_first_failure(attempt, exc):
        seen.append((attempt, exc.errno))
        path.unlink()
        path.write_text("{}\n")

    assert probe_file(path, "x", retries=3, delay=0.01, on_retry=fix_after_first_failure) is None
    assert seen == [(1, 5)]  # EIO once, then it read


@pytest.mark.skipif(not Path(EIO_SOURCE).exists(), reason="needs /proc")
def test_a_retryable_error_that_persists_is_a_retryable_fault(tmp_path):
    path = tmp_path / "phase-A-1.jsonl"
    make_eio(path)
    retries = []
    fault = probe_file(path, "x", retries=3, delay=0.01, on_retry=lambda n, e: retries.append(n))
    assert retries == [1, 2, 3]
    assert (fault.retryable, fault.attempts) == (True, 4) and fault.reason.startswith("EIO")


def test_a_non_retryable_error_is_not_retried(tmp_path):
    path = tmp_path / "phase-A-1.jsonl"
    path.write_text("{}\n")
    errno_name = make_unreadable(path)
    calls = []
    fault = probe_file(path, "x", retries=3, delay=0.01, on_retry=lambda n, e: calls.append(n))
    assert calls == [] and (fault.retryable, fault.attempts) == (False, 1)
    assert fault.reason.startswith(errno_name)
    dangling = tmp_path / "phase-B-0.jsonl"
    dangling.symlink_to(tmp_path / "gone")
    fault = probe_file(dangling, "y", retries=3, delay=0.01)
    assert (fault.retryable, fault.reason.split(":")[0]) == (False, "ENOENT")


def test_unreadable_and_missing_files_escalate_p1_with_rollback(home):
    promote_to(home, "A-1")
    a1 = write_canary(home, "A-1", window_events("A-1", W0, "w0") + window_events("A-1", W1, "w1"))
    write_canary(home, "A-2", window_events("A-2", W0, "w0"))
    run_range(home, W0, W1, log=lambda m: None)
    assert verdict(home, W0, "A-1")[0][0] is False and faults(home) == []

    # A-1's file becomes unreadable; A-2 gets new events for 09:15 that must still be ingested
    errno_name = make_unreadable(a1)
    write_canary(home, "A-2", window_events("A-2", W1, "w1"))
    log: list[str] = []
    try:
        summary = run_range(home, W1, W2, log=log.append)
    finally:
        if a1.is_dir():
            a1.rmdir()
    assert summary.success
    assert verdict(home, W1, "A-1") == [(True, True, "A-0", "P1", [HARD_SLO])]
    assert faults(home) == [(W1, "A-1", "reports/canary/phase-A-1.jsonl", False,
                             faults(home)[0][4], 1)]
    assert faults(home)[0][4].startswith(errno_name)
    assert query(home, "select events from window_metrics where window_start = ? and "
                       "phase = 'A-2'", [W1]) == [(24,)]  # the healthy file was ingested
    # escalated: rolled back one phase, paged, told #incident, in the alert report
    assert query(home, "select rollback_to, status from rollbacks") == [("A-0", "succeeded")]
    assert query(home, "select phase from flag_state") == [("A-0",)]
    channels = {r[0] for r in query(home, "select channel from notifications where level = 'P1'")}
    assert "#incident" in channels and any(c.startswith("pagerduty:") for c in channels)
    report = (home.root / "reports" / "alerts" / "20250118T0915Z.md").read_text()
    assert HARD_SLO in report and "P1" in report
    instance = instance_of(home)
    run = instance.get_run_by_id(summary.run_id)
    errors = [r.user_message for r in instance.all_logs(run.run_id)
              if r.level >= 40 and "collector fault" in (r.user_message or "")]
    assert errors and "phase-A-1.jsonl" in errors[0] and "P1" in errors[0]
    instance.dispose()

    # a file the Collector has read before that is gone is missing: not retryable either
    (home.root / "reports/canary/phase-A-2.jsonl").unlink()
    write_canary(home, "A-1", window_events("A-1", W2, "w2"))
    run_range(home, W2, W2 + timedelta(minutes=15), log=lambda m: None)
    assert [f[1:5] for f in faults(home) if f[0] == W2] == [
        ("A-2", "reports/canary/phase-A-2.jsonl", False, "ENOENT: canary file missing (read "
                                                         "before)")]
    assert verdict(home, W2, "A-2")[0][:4] == (True, True, "A-1", "P1")
    assert verdict(home, W2, "A-1")[0][0] is False  # A-1 is readable again: judged as usual


def test_a_gone_file_whose_name_says_no_phase_faults_the_phases_it_fed(home):
    """`phase-shard-7.jsonl` carried A-1's events: when it goes, A-1 is escalated, not every
    phase of the policy (it paged P1 and rolled back in all five)."""
    promote_to(home, "A-1")
    write_canary(home, "shard-7", window_events("A-1", W0, "w0"))
    write_canary(home, "A-2", window_events("A-2", W0, "w0") + window_events("A-2", W1, "w1"))
    run_range(home, W0, W1, log=lambda m: None)
    assert faults(home) == []
    (home.root / "reports/canary/phase-shard-7.jsonl").unlink()
    run_range(home, W1, W2, log=lambda m: None)
    assert [f[1:4] for f in faults(home)] == [("A-1", "reports/canary/phase-shard-7.jsonl",
                                               False)]
    assert verdict(home, W1, "A-1")[0][:4] == (True, True, "A-0", "P1")
    assert verdict(home, W1, "A-2")[0][0] is False
    # a file with no event stored from it could feed any phase: all of them
    write_canary(home, "junk", ["not json"])
    run_range(home, W1, W2, log=lambda m: None)
    (home.root / "reports/canary/phase-junk.jsonl").unlink()
    run_range(home, W1, W2, log=lambda m: None)
    assert {f[1] for f in faults(home) if f[2].endswith("phase-junk.jsonl")} == {
        "A-0", "A-1", "A-2", "B-0", "B-1"}


@pytest.mark.skipif(not Path(EIO_SOURCE).exists(), reason="needs /proc")
def test_a_persistent_retryable_error_escalates_p2_without_rollback(home):
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", W0, "w0"))
    make_eio(home.canary_dir / "phase-A-2.jsonl")
    summary = run_range(home, W0, W1, log=lambda m: None)
    assert summary.success
    assert verdict(home, W0, "A-2") == [(True, False, None, "P2", [SOFT_SLO])]
    assert verdict(home, W0, "A-1")[0][0] is False  # the readable file is judged as usual
    (fault,) = faults(home)
    assert fault[1:4] == ("A-2", "reports/canary/phase-A-2.jsonl", True)
    assert fault[4].startswith("EIO") and fault[5] == 4  # first attempt + 3 retries
    assert query(home, "select count(*) from rollbacks") == [(0,)]
    instance = instance_of(home)
    warnings = [r.user_message for r in instance.all_logs(summary.run_id)
                if "retrying" in (r.user_message or "")]
    assert len(warnings) == 3
    instance.dispose()

    # once the file reads again, re-running the window clears the fault and the verdict
    (home.canary_dir / "phase-A-2.jsonl").unlink()
    write_canary(home, "A-2", window_events("A-2", W0, "w0"))
    run_range(home, W0, W1, log=lambda m: None)
    assert faults(home) == []
    assert verdict(home, W0, "A-2")[0][0] is False
    instance = instance_of(home)
    assert instance.get_runs(dg.RunsFilter(job_name="rollback_job")) == []
    instance.dispose()


def test_a_retired_file_is_forgotten_by_the_operator_and_no_longer_a_fault(home, capsys):
    """A file read before that is gone raises P1 every window until it is back; if it was
    retired, `rollout files forget` says so (with a reason, recorded) and the P1s stop."""
    promote_to(home, "A-1")
    write_canary(home, "A-1", [*window_events("A-1", W0, "w0"), *window_events("A-1", W1, "w1"),
                               *window_events("A-1", W2, "w2")])
    a2 = write_canary(home, "A-2", [*window_events("A-2", W0, "w0"), "not json, first life"])
    run_range(home, W0, W1, log=lambda m: None)

    def rollout(*args: str) -> tuple[int, str, str]:
        code = cli.main(["--home", str(home.root), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = rollout("files", "forget", "phase-A-2.jsonl", "--reason", "retired")
    assert code == 2 and "is still there" in err  # only a file that is gone
    a2.unlink()
    run_range(home, W1, W2, log=lambda m: None)
    assert verdict(home, W1, "A-2")[0][:4] == (True, True, "A-1", "P1")
    code, out, _ = rollout("files", "list")
    assert code == 0 and "reports/canary/phase-A-2.jsonl: GONE" in out

    code, out, _ = rollout("files", "forget", "phase-A-2.jsonl", "--reason", "A-2 retired",
                           "--actor", "alice")
    assert code == 0 and "its 24 events stay stored" in out
    assert query(home, "select source_file, lines_read, loaded, reason, actor "
                       "from forgotten_files") == [
        ("reports/canary/phase-A-2.jsonl", 25, 24, "A-2 retired", "alice")]
    code, _, err = rollout("files", "forget", "phase-A-2.jsonl", "--reason", "again")
    assert code == 2 and "reports/canary/phase-A-2.jsonl was already forgotten (by alice, " in err

    run_range(home, W1, W2 + timedelta(minutes=15), log=lambda m: None)  # W1 re-run, and W2
    assert faults(home) == []
    # no A-2 events after 09:15: no window_metrics row, so no verdict (the P1 is gone)
    assert verdict(home, W1, "A-2") == [] and verdict(home, W2, "A-2") == []
    assert query(home, "select count(*) from canary_events") == [(24 * 4,)]  # nothing lost
    # a file of that name written again is read from its first line; an event stored before
    # still counts once
    write_canary(home, "A-2", window_events("A-2", W0, "w0")[:1] + window_events("A-2", W2, "w2")
                 + ["not json, second life"])
    run_range(home, W2, W2 + timedelta(minutes=15), log=lambda m: None)
    assert query(home, "select events from window_metrics where window_start = ? and "
                       "phase = 'A-2'", [W2]) == [(24,)]
    assert query(home, "select lines_read, loaded, duplicates, quarantined from ingest_files "
                       "where source_file = 'reports/canary/phase-A-2.jsonl'") == [(26, 24, 1, 1)]
    # the forgotten file's quarantine rows went with it: under the name, only the new file's
    # (they were mixed: 2 rows, 1 quarantined; found by an independent audit)
    assert query(home, "select line_no, raw from quarantine where source_file = "
                       "'reports/canary/phase-A-2.jsonl'") == [(26, "not json, second life")]
    assert query(home, "select source_file like 'reports/canary/phase-A-2.jsonl#%', line_no "
                       "from quarantine where raw = 'not json, first life'") == [(True, 25)]
