"""Runs whose process died (SIGKILL, OOM, a power cut) must not block the rollout forever.

A run killed mid-write stays STARTED in Dagster's instance, and keeps any pool slot it claimed:
with `concurrency.pools.default_limit: 1` every later step of the `rollout_warehouse` pool would
wait for it forever (and Dagster 1.13 busy-waits for a slot, burning a core). The local run
launchers give the daemon no way to see such a death, so `reap_dead_runs` does: a run is dead
when the process that executes it (recorded by Dagster as "Executing steps in process (pid: N)")
no longer exists, is a zombie, or is a newer process that reused the pid. A dead run is marked
failed with a message that says so, tagged `rollout/reaped`, and its pool slots are freed.

Only for instances on this machine's storage (SQLite under `.dagster`): with a shared Postgres
instance the pid may belong to another host, and Dagster's run monitoring is the tool there.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

REAPED_TAG = "rollout/reaped"
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING]
PID_REUSE_SLACK_SECONDS = 5.0


def is_local_instance(instance: dg.DagsterInstance) -> bool:
    return "sqlite" in type(instance.run_storage).__name__.lower()


def run_pid(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The pid of the process executing the run, from its first engine event that names one,
    and that event's time: the process had started by then."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=20).records
    for rec in records:
        event = rec.event_log_entry.dagster_event
        data = event.engine_event_data if event is not None else None
        pid = data.metadata.get("pid") if data is not None and data.metadata else None
        if pid is not None:
            try:
                return int(pid.value), rec.event_log_entry.timestamp
            except (TypeError, ValueError):
                continue
    return None


def _proc_start_epoch(pid: int) -> tuple[float | None, str | None]:
    """(start time as epoch seconds, state letter) from /proc, or (None, None) without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None, None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    state, start_ticks = fields[0], int(fields[19])
    return btime + start_ticks / os.sysconf("SC_CLK_TCK"), state


def process_alive(pid: int, seen_at: float | None = None) -> bool:
    """Whether `pid` is still the process that was seen running at `seen_at` (epoch seconds):
    it exists, is no zombie, and did not start after then (a reused pid)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    started, state = _proc_start_epoch(pid)
    if state == "Z":
        return False
    if started is not None and seen_at is not None and (
            started > seen_at + PID_REUSE_SLACK_SECONDS):
        return False  # the pid was reused by a process younger than the one seen
    return True


def reap_dead_runs(instance: dg.DagsterInstance,
                   log: Callable[[str], None] | None = None) -> list[str]:
    """Mark in-progress runs whose process is gone as failed and free their pool slots.
    Returns the reaped run ids."""
    if not is_local_instance(instance):
        return []
    reaped = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        found = run_pid(instance, run.run_id)
        if found is None:
            continue
        # compared with when the pid was recorded, not with when the run was created or
        # started: a queued run's process starts long after its creation (it waited for the
        # pool), and it reports its pid before the run starts
        pid, seen_at = found
        if process_alive(pid, seen_at):
            continue
        message = (f"run process {pid} is gone (killed or crashed); marked failed by rollout so "
                   "its pool slot and run key are released. Its writes were rolled back; re-run "
                   "the windows to finish them.")
        instance.add_run_tags(run.run_id, {REAPED_TAG: "true"})
        instance.report_run_failed(run, message=message)
        reaped.append(run.run_id)
        if log is not None:
            log(f"run {run.run_id[:8]}: {message}")
    # slots still held by runs that are no longer in progress (reaped now or finished while the
    # daemon was down) are freed as the daemon's concurrency monitor would
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.status not in IN_PROGRESS:
                storage.free_concurrency_slots_for_run(run_id)
    return reaped


@contextmanager
def instance_lock(dagster_home: Path, name: str = ".rollout-instance.lock") -> Iterator[None]:
    """Serialize opening (and on first use, creating) the home's SQLite instance: two processes
    creating its schema at the same time fail with `table alembic_version already exists`.
    With another `name`, any other critical section of processes sharing the instance."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    with open(dagster_home / name, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
