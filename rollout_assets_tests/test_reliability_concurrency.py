"""Concurrency: DuckDB lets one process write the file, and a read-only open fails while it does.
Two `rollout run`s for different windows at the same time, and a read-only reader polling while
they write, never fail on that lock (writers and readers wait with back-off; a run holds the
writer from its first warehouse step to its end). A run killed while
holding the `rollout_warehouse` pool slot does not block the next run forever: its dead process
is detected, the run is marked failed and the slot freed. A file whose headers the first writer
has not written yet is waited for, not reported corrupt."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import dagster as dg
import duckdb
import pytest

from rollout_assets.home import RolloutHome
from rollout_assets.run_health import REAPED_TAG
from rollout_assets.runner import INSTANCE_YAML
from rollout_assets.warehouse import connect
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    instance_of,
    kill_in_transaction,
    ok,
    query,
    rollout,
    start_run,
    window_events,
)

START = T0 - timedelta(hours=1)  # 08:00
WINDOWS = [START + timedelta(minutes=15 * i) for i in range(8)]


def two_hours_of_traffic(home: RolloutHome) -> None:
    lines = []
    for i, w in enumerate(WINDOWS):
        lines += window_events("A-1", w, f"w{i}")
    write_canary(home, "A-1", lines)


class Reader(threading.Thread):
    """Opens the warehouse read-only and queries it, again and again, until stopped."""

    def __init__(self, home: RolloutHome):
        super().__init__(daemon=True)
        self.home, self.reads, self.errors, self.stop = home, 0, [], threading.Event()
        self.longest_wait = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.home.db_path.exists():
                time.sleep(0.05)
                continue
            t0 = time.monotonic()
            try:
                con = connect(self.home.db_path, read_only=True)
                try:
                    self.longest_wait = max(self.longest_wait, time.monotonic() - t0)
                    con.execute("select count(*) from information_schema.tables").fetchone()
                finally:
                    con.close()
                self.reads += 1
            except Exception as exc:  # noqa: BLE001 - any failure is what the test looks for
                self.errors.append(repr(exc))
            time.sleep(0.02)


def test_two_runs_and_a_reader_at_the_same_time(home):
    two_hours_of_traffic(home)
    reader = Reader(home)
    reader.start()
    first = start_run(home, "2025-01-18T08:00Z", "2025-01-18T09:00Z")
    second = start_run(home, "2025-01-18T09:00Z", "2025-01-18T10:00Z")
    try:
        out1, _ = first.communicate(timeout=300)
        out2, _ = second.communicate(timeout=300)
        # A run holds the writer from its first warehouse step to its end (one connection per
        # run), so the reader mostly gets in between and after the runs: it waits, never fails.
        reads_during_runs = reader.reads
        deadline = time.monotonic() + 60
        while reader.reads < reads_during_runs + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        reader.stop.set()
        reader.join(timeout=30)
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0, out1
    assert second.returncode == 0, out2
    assert reader.errors == [] and reader.reads >= reads_during_runs + 3, (
        reader.errors[:3], reader.reads)
    assert query(home, "select count(distinct window_start), count(*) from window_metrics") == [
        (8, 8)]
    assert query(home, "select count(*) from window_verdicts where phase = 'A-1'") == [(8,)]
    assert query(home, "select count(*), count(distinct event_key) from canary_events") == [
        (8 * 24, 8 * 24)]
    instance = instance_of(home)
    runs = instance.get_runs(dg.RunsFilter(job_name="rollout_window_job"))
    assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    instance.dispose()


def test_a_session_on_the_readers_copy_never_holds_up_a_run(home):
    """An SQL session held open on the warehouse stalls every run for up to 15 minutes and can
    make a rollback time out. Readers have `data/rollout-read.duckdb`: every table but the raw
    events, renamed into place after each run, so a session (another process, holding it
    open) never waits for a run nor holds one up; it reads the copy it opened, and the next
    session opens the newest."""
    import subprocess
    import sys

    two_hours_of_traffic(home)
    ok(rollout(home, "run", "--from", "2025-01-18T08:00Z", "--to", "2025-01-18T09:00Z"))
    copy = home.reader_db_path
    assert copy.is_file()
    session = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\n"
         f"c = duckdb.connect({str(copy)!r}, read_only=True)\n"
         "q = 'select count(*) from window_verdicts'\n"
         "print(c.execute(q).fetchone()[0], flush=True)\n"
         "sys.stdin.readline()\n"  # held open until the test says
         "print(c.execute(q).fetchone()[0], flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert session.stdout.readline().strip() == "4"
        t0 = time.monotonic()
        ok(rollout(home, "run", "--from", "2025-01-18T09:00Z", "--to", "2025-01-18T10:00Z"))
        assert time.monotonic() - t0 < 120 and session.poll() is None
        out, _ = session.communicate("go\n", timeout=60)
        assert out.strip() == "4"  # its own snapshot, whole
    finally:
        if session.poll() is None:
            session.kill()
    fresh = duckdb.connect(str(copy), read_only=True)
    try:
        assert fresh.execute("select count(*) from window_verdicts").fetchone() == (8,)
        tables = {t for (t,) in fresh.execute("show tables").fetchall()}
    finally:
        fresh.close()
    live = connect(home.db_path, read_only=True)
    try:
        every = {t for (t,) in live.execute("show tables").fetchall()}
        for t in ("window_metrics", "slo_scores", "window_verdicts", "quarantine", "rollbacks",
                  "notifications", "incidents", "sla_daily"):
            assert live.execute(f"select count(*) from {t}").fetchone() == duckdb.connect(
                str(copy), read_only=True).execute(f"select count(*) from {t}").fetchone(), t
    finally:
        live.close()
    assert tables == every - {"canary_events", "canary_event_sources"}  # the raw events
    assert [p.name for p in copy.parent.iterdir() if ".tmp" in p.name] == []

    # a session that opened the copy read-write and was killed leaves a log beside it; the
    # next copy must not have it replayed onto it (it deleted rows by number; found by an
    # independent audit)
    killed = subprocess.run(
        [sys.executable, "-c", "import duckdb, os\n"
         f"c = duckdb.connect({str(copy)!r})\n"
         "c.execute('delete from window_verdicts where phase = \\'A-1\\'')\n"
         "os._exit(9)\n"], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert copy.with_name(copy.name + ".wal").exists()
    ok(rollout(home, "run", "--from", "2025-01-18T09:00Z", "--to", "2025-01-18T09:15Z"))
    again = duckdb.connect(str(copy), read_only=True)
    try:
        assert again.execute("select count(*) from window_verdicts where phase = 'A-1'"
                             ).fetchone() == (8,)
    finally:
        again.close()
    # the flag commands change tables too: a move by hand is in the copy at once (it stayed
    # stale until the next run; found by the same audit)
    ok(rollout(home, "flags", "promote", "--phase", "A-1", "--force", "--reason", "by hand"))
    after = duckdb.connect(str(copy), read_only=True)
    try:
        assert after.execute("select phase from flag_state").fetchall() == [("A-1",)]
    finally:
        after.close()


def test_a_file_still_being_created_is_waited_for_not_reported_corrupt(tmp_path):
    """DuckDB creates a new file, then writes its headers: a reader (or a second writer) that
    opens it in between is told the file "is not a valid DuckDB database file". That is
    waited out like the lock; a file as long as the headers that does not open is not."""
    path = tmp_path / "rollout.duckdb"
    path.touch()  # created, headers not written yet
    opened: list = []
    reader = threading.Thread(target=lambda: opened.append(connect(path, read_only=True,
                                                                   wait_seconds=30)))
    reader.start()
    time.sleep(0.5)
    assert reader.is_alive() and opened == []  # waiting, not failed
    made = tmp_path / "made.duckdb"
    con = duckdb.connect(str(made))
    con.execute("create table t as select 42 as x")
    con.close()
    os.replace(made, path)  # the writer's headers and data land
    reader.join(timeout=30)
    assert opened and opened[0].execute("select x from t").fetchall() == [(42,)]
    opened[0].close()

    # an empty file nobody finishes: the caller's wait, then the error
    stuck = tmp_path / "stuck.duckdb"
    stuck.touch()
    t0 = time.monotonic()
    with pytest.raises(duckdb.IOException, match="not a valid DuckDB database file"):
        connect(stuck, read_only=True, wait_seconds=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5
    # as long as the headers and still not a database: raised at once, for readers and writers
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(os.urandom(3 * 4096))
    for read_only in (True, False):
        t0 = time.monotonic()
        with pytest.raises(duckdb.IOException, match="not a valid DuckDB database file"):
            connect(junk, read_only=read_only, wait_seconds=30)
        assert time.monotonic() - t0 < 1


def test_a_killed_run_does_not_hold_the_pool_slot_forever(home, tmp_path):
    """At op granularity (Dagster's default, and the instance config of homes created before
    `granularity: run`) a step holds its pool slot while it runs; SIGKILL leaves it claimed."""
    two_hours_of_traffic(home)
    home.dagster_home.mkdir(parents=True)
    (home.dagster_home / "dagster.yaml").write_text(
        INSTANCE_YAML.replace("granularity: run", "granularity: op"))
    assert kill_in_transaction(home, "compute_window_metrics", tmp_path,
                               start="2025-01-18T08:00Z", end="2025-01-18T09:00Z"
                               ) == "compute_window_metrics"
    instance = instance_of(home)
    info = instance.event_log_storage.get_concurrency_info("rollout_warehouse")
    assert [s.step_key for s in info.claimed_slots] == ["window_metrics"]  # the dead run's
    dead = info.claimed_slots[0].run_id
    instance.dispose()

    # without reaping, this run would wait for the slot forever (and Dagster busy-waits)
    out = ok(rollout(home, "run", "--from", "2025-01-18T09:00Z", "--to", "2025-01-18T10:00Z",
                     timeout=180))
    assert f"run {dead[:8]}: run process" in out and "is gone" in out
    instance = instance_of(home)
    run = instance.get_run_by_id(dead)
    assert run.status == dg.DagsterRunStatus.FAILURE and run.tags[REAPED_TAG] == "true"
    assert instance.event_log_storage.get_concurrency_run_ids() == set()
    assert query(home, "select count(*) from window_verdicts where phase = 'A-1'") == [(4,)]
    instance.dispose()


def test_a_queued_run_whose_worker_started_late_is_not_reaped(tmp_path, monkeypatch):
    """A run waits in the queue for the warehouse pool, then its worker starts and reports its
    pid, and is still importing when another process reaps. The worker started long after
    the run was created: the reaper took that for a reused pid and marked the live run failed,
    and its worker gave up (found by an independent audit, under `rollout ui` with a backfill
    beside `rollout run`). A pid is now compared with when it was recorded. A process that
    really is gone is still reaped."""
    import subprocess

    from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData

    from rollout_assets import run_health

    monkeypatch.setattr(run_health, "PID_REUSE_SLACK_SECONDS", 0.2)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        @dg.job
        def queued():
            pass

        def started_run(argv: list[str]) -> tuple[dg.DagsterRun, subprocess.Popen]:
            run = instance.create_run_for_job(queued, status=dg.DagsterRunStatus.NOT_STARTED)
            time.sleep(1.5)  # in the queue (/proc start times are exact to ~1 s)
            worker = subprocess.Popen(argv)
            instance.handle_run_event(run.run_id, DagsterEvent(
                DagsterEventType.PIPELINE_STARTING.value, job_name=run.job_name))
            instance.report_engine_event(
                f"Started process for run (pid: {worker.pid}).", run,
                EngineEventData(metadata={"pid": dg.MetadataValue.text(str(worker.pid))}))
            return run, worker

        live, live_worker = started_run(["sleep", "30"])
        try:
            dead, dead_worker = started_run(["true"])
            dead_worker.wait()
            assert run_health.reap_dead_runs(instance) == [dead.run_id]
            assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.STARTING
        finally:
            live_worker.kill()
