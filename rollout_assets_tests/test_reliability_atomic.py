"""Atomic, idempotent windows: `rollout run` killed with SIGKILL mid-write, then run again, leaves
exactly the tables a clean run leaves on a fresh home.

The kill lands mid-write reliably: for the window assets and the Reporter the crash-test hook in
`warehouse.transaction` (ROLLOUT_TEST_PAUSE_IN_TRANSACTION, see docs/guarantees.md) makes the run
pause inside a named transaction, after its writes and before its commit, and the test kills it
there; for the ingest (which commits its own transactions) a large canary file keeps the run
inside `canary_events` long enough to kill it there. After each kill the test checks that the
interrupted transaction left nothing behind, and that the killed run no longer blocks anything
(its Dagster run is reaped: marked failed, pool slots freed).
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from rollout_assets.home import RolloutHome
from rollout_assets.run_health import REAPED_TAG
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    instance_of,
    kill,
    kill_in_transaction,
    ok,
    promote_to,
    query,
    rollout,
    snapshot,
    start_run,
    window_events,
)

WINDOWS = [T0 + timedelta(minutes=15 * i) for i in range(4)]
FROM, TO = "2025-01-18T09:00Z", "2025-01-18T10:00Z"
BIG_LINES = 200_000  # A-0 sessions: about 2 s of ingest, one transaction
OLD = time.time() - 86400
OUTPUT_DIRS = ("reports/monitoring", "reports/alerts", "reports/outbox", "reports/rollbacks")


def write_inputs(root: Path) -> None:
    """09:00-10:00: A-1 traffic with a restore breach at 09:15, junk and a duplicate delivery,
    plus a large file of A-0 sessions."""
    home = RolloutHome(root)
    lines = []
    for i, w in enumerate(WINDOWS):
        lines += window_events("A-1", w, f"w{i}", failed_restores=6 if i == 1 else 0)
    write_canary(home, "A-1", lines + ["not json", '{"event_id": "x", "ts": 5}'] + lines[:3])
    big = home.canary_dir / "phase-A-0.jsonl"
    with open(big, "w") as f:
        for i in range(BIG_LINES):
            ts = T0 + timedelta(milliseconds=(i * 17) % 3_600_000)  # spread over the hour
            f.write(f'{{"event_id":"a0-{i}","ts":"{ts:%Y-%m-%dT%H:%M:%S}.'
                    f'{ts.microsecond // 1000:03d}Z",'
                    f'"phase":"A-0","kind":"session","tenant":"qa"}}\n')
    for p in home.canary_files():
        os.utime(p, (OLD, OLD))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    write_inputs(root)
    return root


def fresh_home(tmp_path_factory, name: str, inputs: Path) -> RolloutHome:
    root = (tmp_path_factory.mktemp(name) / "home").resolve()
    shutil.copytree(inputs, root)
    home = RolloutHome(root)
    promote_to(home, "A-1")
    return home


def kill_during_ingest(home: RolloutHome) -> None:
    """Run and SIGKILL it shortly after the canary_events step has started reading."""
    proc = start_run(home)
    instance = instance_of(home) if home.dagster_home.exists() else None
    deadline = time.monotonic() + 240
    started = False
    while not started:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the ingest:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail("the canary_events step never started")
        time.sleep(0.05)
        if instance is None:
            if not (home.dagster_home / "dagster.yaml").exists():
                continue
            instance = instance_of(home)
        for run in instance.get_runs(dg.RunsFilter(job_name="rollout_window_job")):
            if run.status != dg.DagsterRunStatus.STARTED:
                continue
            steps = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.STEP_START).records
            started = any(r.event_log_entry.step_key == "canary_events" for r in steps)
    time.sleep(0.3)
    kill(proc)
    instance.dispose()


def balanced(home: RolloutHome) -> bool:
    rows = query(home, "select lines_read = loaded + duplicates + quarantined from ingest_files")
    events = query(home, "select count(*) from canary_events")[0][0]
    loaded = query(home, "select coalesce(sum(loaded), 0) from ingest_files")[0][0]
    return all(r[0] for r in rows) and events == loaded


def file_names(home: RolloutHome) -> set[str]:
    return {str(p.relative_to(home.root)) for d in OUTPUT_DIRS
            for p in (home.root / d).rglob("*") if p.is_file()}


def test_a_run_killed_mid_write_then_rerun_equals_a_clean_run(tmp_path_factory, inputs):
    clean = fresh_home(tmp_path_factory, "clean", inputs)
    ok(rollout(clean, "run", "--from", FROM, "--to", TO))
    expected = snapshot(clean)
    assert expected["rollbacks"] and expected["notifications"] and expected["quarantine"]
    assert any(v[4] for v in expected["window_verdicts"])  # the 09:15 breach

    home = fresh_home(tmp_path_factory, "crashed", inputs)
    tmp = tmp_path_factory.mktemp("markers")

    kill_during_ingest(home)  # an uncommitted ingest leaves no event and no cursor behind
    assert balanced(home)
    assert query(home, "select count(*) from window_metrics") == [(0,)]

    assert kill_in_transaction(home, "compute_window_metrics", tmp) == "compute_window_metrics"
    assert balanced(home)
    assert query(home, "select count(*) from canary_events")[0][0] > 0
    assert query(home, "select count(*) from window_metrics") == [(0,)]  # not half a range

    assert kill_in_transaction(home, "judge_range", tmp) == "judge_range"
    assert query(home, "select count(*) from slo_scores")[0][0] > 0
    assert query(home, "select count(*) from window_verdicts") == [(0,)]

    # the Reporter: the alert report row is rolled back; the notification ledger commits each
    # message as it goes out (at most once), so the re-run must not send those again
    assert kill_in_transaction(home, "publish_window", tmp) == "publish_window"
    assert query(home, "select count(*) from window_verdicts where breach") == [(1,)]
    assert query(home, "select count(*) from alert_reports") == [(0,)]
    assert query(home, "select count(*) from rollbacks") == [(0,)]

    out = ok(rollout(home, "run", "--from", FROM, "--to", TO))
    assert snapshot(home) == expected, out
    assert file_names(home) == file_names(clean)

    # every killed run was reaped: failed, tagged, no pool slot held
    instance = instance_of(home)
    killed = [r for r in instance.get_runs() if REAPED_TAG in r.tags]
    assert len(killed) == 4
    assert all(r.status == dg.DagsterRunStatus.FAILURE for r in killed)
    assert instance.event_log_storage.get_concurrency_run_ids() == set()
    instance.dispose()

