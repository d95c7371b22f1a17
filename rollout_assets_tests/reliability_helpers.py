"""Helpers for the reliability tests (test_reliability_*.py): the `rollout` CLI as a subprocess in
a clean environment, small hand-made canary data, and table snapshots that ignore timestamps."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from rollout_assets.home import RolloutHome
from rollout_assets.run_health import instance_lock
from rollout_assets.warehouse import PAUSE_ENV, connect
from rollout_assets_tests.conftest import DAY, event, write_canary
from rollout_assets_tests.pipeline_helpers import query  # noqa: F401 (re-exported for tests)

ROLLOUT = shutil.which("rollout", path=os.path.dirname(sys.executable)) or "rollout"
SECRET_ENV = ("SLACK_BOT_TOKEN", "PAGERDUTY_ROUTING_KEY_AUTOSAVE", "PAGERDUTY_ROUTING_KEY_MERGE")
T0 = DAY.replace(hour=9)

# every contract table, plus the extensions a re-run must reproduce; timestamps that say when a
# row was written, run ids and log paths naming a run are not part of the comparison
COMPARED_TABLES = {
    "window_metrics": "select * exclude (computed_at) from window_metrics",
    "window_exclusions": "select * from window_exclusions",
    "slo_scores": "select * exclude (scored_at) from slo_scores",
    "window_verdicts": "select * exclude (judged_at) from window_verdicts",
    "quarantine": "select * exclude (ingested_at) from quarantine",
    "rollbacks": "select * exclude (started_at, finished_at, dagster_run_id) from rollbacks",
    "notifications": "select * exclude (created_at, updated_at) from notifications",
    "canary_events": "select count(*), count(distinct event_key), sum(hash(event_key, ts, "
                     "phase, kind, latency_ms, ok, source_file, line_no)) "
                     "from canary_event_sources",
    "ingest_files": "select source_file, byte_offset, lines_read, loaded, duplicates, "
                    "quarantined from ingest_files",
    "collector_faults": "select * exclude (detected_at) from collector_faults",
    "flag_state": "select phase, flags from flag_state",
}


def clean_env(**extra: str) -> dict:
    """The environment a user's shell would give `rollout`: no home, instance or secrets
    inherited from the test run, unbuffered output, no bytecode written into the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ROLLOUT_HOME", "DAGSTER_HOME", *SECRET_ENV)}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def rollout_cmd(home: Path | RolloutHome, *args: str) -> list[str]:
    root = home.root if isinstance(home, RolloutHome) else home
    return [ROLLOUT, "--home", str(root), *args]


def rollout(home, *args: str, timeout: float = 300, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    root = home.root if isinstance(home, RolloutHome) else home
    return subprocess.run(rollout_cmd(home, *args), capture_output=True, text=True,
                          env=env or clean_env(), cwd=str(cwd or root), timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def window_events(phase: str, ws: datetime, tag: str, autosaves: int = 12, restores: int = 12,
                  failed_restores: int = 0) -> list[dict]:
    """A window of judged traffic: `autosaves` fast autosaves, `restores` restores of which the
    first `failed_restores` failed. Event ids are `<phase>-<tag>-...`, unique per tag."""
    out = []
    for i in range(autosaves):
        out.append(event(event_id=f"{phase}-{tag}-as{i}", phase=phase, kind="autosave",
                         ts=iso(ws + timedelta(seconds=50 * i + 1)), latency_ms=400.0 + 10 * i,
                         ok=True))
    for i in range(restores):
        out.append(event(event_id=f"{phase}-{tag}-rs{i}", phase=phase, kind="restore",
                         ts=iso(ws + timedelta(seconds=50 * i + 20)), ok=i >= failed_restores,
                         drop=["latency_ms"]))
    return out


def write_events(home: RolloutHome, phase: str, lines: list, file_phase: str | None = None):
    return write_canary(home, file_phase or phase, lines)


def _portable(value, root: str):
    """A value with the home's own path replaced, so two homes can be compared."""
    if isinstance(value, str):
        return value.replace(root, "<home>")
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v, root) for v in value)
    return value


def snapshot(home: RolloutHome) -> dict[str, list]:
    """Every compared table, sorted, as Python values (the home's path written as <home>)."""
    con = connect(home.db_path, read_only=True)
    try:
        return {name: sorted((_portable(row, str(home.root))
                              for row in con.execute(sql).fetchall()), key=repr)
                for name, sql in COMPARED_TABLES.items()}
    finally:
        con.close()


def promote_to(home: RolloutHome, phase: str, force: bool = False) -> None:
    """Move the flags forward to `phase` through the CLI's own code path (in-process); flags
    already past it stay where they are. `force`: past the promotion gate, as
    `--force --reason` does (a set-up with no judged traffic yet)."""
    from rollout_assets import flags
    from rollout_assets.policy import load_policy

    policy = load_policy(home.policy_path)
    con = connect(home.db_path)
    try:
        state = flags.current_state(con, policy)
        order = policy.phase_names
        while order.index(state.phase) < order.index(phase):
            flags.promote(con, policy, policy.next_phase(state.phase), actor="pytest",
                          reason="test set-up" if force else None, force=force)
            state = flags.current_state(con, policy)
    finally:
        con.close()


def instance_of(home: RolloutHome) -> dg.DagsterInstance:
    with instance_lock(home.dagster_home):  # never while a run is creating it
        return dg.DagsterInstance.from_config(str(home.dagster_home))


def start_run(home: RolloutHome, start: str = "2025-01-18T09:00Z", end: str = "2025-01-18T10:00Z",
              **env) -> subprocess.Popen:
    return subprocess.Popen(rollout_cmd(home, "run", "--from", start, "--to", end),
                            env=clean_env(**env), cwd=str(home.root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def kill_in_transaction(home: RolloutHome, where: str, tmp: Path, **run) -> str:
    """Run, pause inside the transaction `where` (after its writes, before its commit), SIGKILL."""
    marker = tmp / f"paused-in-{where.replace('#', '-')}"
    proc = start_run(home, **run, **{PAUSE_ENV: f"{where}:{marker}"})
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {where}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"the run never reached {where}")
        time.sleep(0.05)
    kill(proc)
    return marker.read_text().split()[0]
