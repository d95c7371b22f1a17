"""`BatchingSqliteEventLogStorage` on real on-disk instances: the same rows as Dagster's default
SQLite event log for the same run, all-or-nothing batches, and the home's dagster.yaml."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry

from rollout_assets.home import RolloutHome
from rollout_assets.instance_storage import (
    DEFAULT_EVENT_BATCH_SIZE,
    EVENT_BATCH_SIZE_ENV,
    BatchingSqliteEventLogStorage,
)
from rollout_assets.policy import load_policy
from rollout_assets.runner import (
    EVENT_LOG_STORAGE_YAML,
    INSTANCE_YAML,
    RunSummary,
    prepare_instance,
    run_range,
)
from rollout_assets.simulate import simulate
from rollout_assets_tests.pipeline_helpers import END, START, persistent_home, query

# dagster.yaml as rollout wrote it before the event log stanza existed
OLD_INSTANCE_YAML = INSTANCE_YAML.replace(EVENT_LOG_STORAGE_YAML, "")
# the same settings as a user-written file (no rollout header): never upgraded, default storage
DEFAULT_STORAGE_YAML = OLD_INSTANCE_YAML.split("\n", 1)[1]
# the comparison reads every event type through the one generic API on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Use fetch_.* instead of get_event_records")
COMPARED_EVENTS = (
    DagsterEventType.ASSET_MATERIALIZATION,
    DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
    DagsterEventType.ASSET_CHECK_EVALUATION,
    DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
)


# ---- the same run on a home with the default storage and one with the batching storage --------
@dataclass
class HomeRun:
    home: RolloutHome
    summary: RunSummary
    storage_class: str
    snapshot: dict


def _simulated_home(home: RolloutHome) -> None:
    """One hour of simulated A-1 traffic with a restore_success_rate breach (so the run also
    launches a rollback through the breach sensor)."""
    simulate(home, load_policy(home.policy_path), START, 1, rate=20, seed=5,
             breach_metric="restore_success_rate", only_phase="A-1")


def _run_ids(instance: dg.DagsterInstance) -> dict[str, str]:
    """run id -> "<job>#<n>", n in creation order: the same label for the same run in each home."""
    records = sorted(instance.get_run_records(), key=lambda r: r.create_timestamp)
    seen: Counter = Counter()
    out = {}
    for r in records:
        job = r.dagster_run.job_name
        out[r.dagster_run.run_id] = f"{job}#{seen[job]}"
        seen[job] += 1
    return out


def _index_rows(instance: dg.DagsterInstance, runs: dict[str, str]) -> dict[str, list]:
    """Every row of the index shard's asset/check tables, run ids as labels, without the columns
    that hold wall-clock times or whole serialized events (their contents are compared through
    the instance API instead)."""
    path = Path(instance.event_log_storage._base_dir) / "index.db"  # noqa: SLF001
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        def rows(sql):
            return [tuple(runs.get(v, v) if isinstance(v, str) else v for v in row)
                    for row in con.execute(sql).fetchall()]
        return {
            "event_logs": rows("select id, run_id, dagster_event_type, step_key, asset_key, "
                               "partition from event_logs order by id"),
            "asset_keys": rows("select asset_key, last_run_id, wipe_timestamp is null, "
                               "last_materialization is null, last_materialization_timestamp "
                               "is null from asset_keys order by asset_key"),
            "asset_check_executions": rows(
                "select id, asset_key, check_name, partition, run_id, execution_status, "
                "evaluation_event_storage_id, materialization_event_storage_id, "
                "evaluation_event is null from asset_check_executions order by id"),
            "asset_event_tags": rows("select event_id, asset_key, key from asset_event_tags "
                                     "order by id"),
        }
    finally:
        con.close()


def _snapshot(home: RolloutHome) -> tuple[str, dict]:
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as instance:
        runs = _run_ids(instance)
        storage = instance.event_log_storage
        out: dict = {"index": _index_rows(instance, runs)}
        for event_type in COMPARED_EVENTS:
            records = instance.get_event_records(dg.EventRecordsFilter(event_type), limit=10_000)
            out[event_type.value] = sorted(
                (runs[r.run_id], r.storage_id, r.event_log_entry.step_key,
                 r.asset_key.to_user_string() if r.asset_key else None, r.partition_key,
                 r.event_log_entry.user_message)
                for r in records)
        latest = {}
        for key in instance.get_asset_keys():
            ev = instance.get_latest_materialization_event(key)
            mat = ev.asset_materialization if ev else None
            latest[key.to_user_string()] = None if ev is None else (
                runs[ev.run_id], mat.partition, sorted(mat.metadata))
        out["latest_materialization"] = latest
        out["asset_records"] = sorted(
            (r.asset_entry.asset_key.to_user_string(),
             r.asset_entry.last_materialization_storage_id,
             runs.get(r.asset_entry.last_run_id or "", r.asset_entry.last_run_id))
            for r in instance.get_asset_records())
        checks = {}
        check_keys = {dg.AssetCheckKey(dg.AssetKey.from_db_string(a), c)
                      for _i, a, c, *_ in out["index"]["asset_check_executions"]}
        for key in sorted(check_keys, key=lambda k: k.to_user_string()):
            history = storage.get_asset_check_execution_history(key, limit=10_000)
            checks[key.to_user_string()] = [
                (h.id, runs[h.run_id], h.status.value, h.partition,
                 h.event.asset_check_evaluation.passed if h.event else None,
                 sorted(h.event.asset_check_evaluation.metadata) if h.event else None)
                for h in history]
        out["check_history"] = checks
        out["run_events"] = {
            runs[run_id]: Counter(
                (r.event_log_entry.dagster_event_type, r.event_log_entry.step_key)
                for r in instance.get_records_for_run(run_id, limit=100_000).records)
            for run_id in runs}
        return type(storage).__name__, out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, HomeRun]:
    out = {}
    for name in ("default", "batching"):
        with persistent_home(tmp_path_factory, name) as home:
            if name == "default":
                # Dagster's own storage, and Dagster's own (unbatched) way of calling it
                os.environ.pop(EVENT_BATCH_SIZE_ENV, None)
                home.dagster_home.mkdir(parents=True)
                (home.dagster_home / "dagster.yaml").write_text(DEFAULT_STORAGE_YAML)
            _simulated_home(home)
            summary = run_range(home, START, END, log=lambda _m: None)
            batch_size = os.environ.get(EVENT_BATCH_SIZE_ENV)
            storage_class, snapshot = _snapshot(home)
            out[name] = HomeRun(home, summary, storage_class, snapshot)
            out[name].snapshot["batch_size_env"] = batch_size
    return out


def test_homes_use_the_storage_their_dagster_yaml_names(pair):
    assert pair["default"].storage_class == "SqliteEventLogStorage"
    assert pair["default"].snapshot["batch_size_env"] is None
    assert pair["batching"].storage_class == "BatchingSqliteEventLogStorage"
    assert pair["batching"].snapshot["batch_size_env"] == DEFAULT_EVENT_BATCH_SIZE
    assert (pair["batching"].home.dagster_home / "dagster.yaml").read_text() == INSTANCE_YAML
    # Dagster's default layout: <DAGSTER_HOME>/history/runs/<run id>.db and index.db
    runs_dir = pair["batching"].home.dagster_home / "history" / "runs"
    assert (runs_dir / "index.db").is_file()
    assert (runs_dir / f"{pair['batching'].summary.run_id}.db").is_file()


def test_run_range_on_a_simulated_home_succeeds_with_its_check_history(pair):
    run = pair["batching"]
    assert run.summary.success and run.summary.run_id
    assert run.summary.rollbacks and all(r.success for r in run.summary.rollbacks)  # the breach
    history = run.snapshot["check_history"]
    slo_history = [h for key, hs in history.items() if key.startswith("slo_scores:")
                   for h in hs]
    # one evaluation per score row of the run's windows, each with its window (partition)
    scored = query(run.home, "select count(*) from slo_scores where window_start >= ? and "
                             "window_start < ?", [START, END])[0][0]
    assert scored > 0
    assert len(slo_history) == scored
    assert {h[1] for h in slo_history} == {"rollout_window_job#0"}
    assert {h[2] for h in slo_history} <= {"SUCCEEDED", "FAILED"}
    assert "FAILED" in {h[2] for h in slo_history}  # the breach
    assert {h[3] for h in slo_history} == {"2025-01-18-09:00", "2025-01-18-09:15",
                                           "2025-01-18-09:30", "2025-01-18-09:45"}
    assert all(h[4] is not None and "policy_version" in h[5] for h in slo_history)


def test_run_range_leaves_every_shard_merged_and_a_template_of_its_dagster(pair):
    runs_dir = pair["batching"].home.dagster_home / "history" / "runs"
    assert len(list(runs_dir.glob("*.db"))) >= 3  # index, the window run, the daily run
    # the run closed its kept connections: no shard's writes wait in a WAL file
    assert list(runs_dir.glob("*-wal")) == list(runs_dir.glob("*-shm")) == []
    # (Dagster's own `.db` is the shard of run id "", where runless events go)
    assert [p.name for p in runs_dir.glob(".*.sqlite3")] == [
        f".run-shard-template-dagster-{dg.__version__}.sqlite3"]  # no scratch copy left


@pytest.mark.parametrize("part", ["index", "ASSET_MATERIALIZATION",
                                  "ASSET_MATERIALIZATION_PLANNED", "ASSET_CHECK_EVALUATION",
                                  "ASSET_CHECK_EVALUATION_PLANNED", "latest_materialization",
                                  "asset_records", "check_history", "run_events"])
def test_batching_storage_writes_the_same_rows_as_dagsters(pair, part):
    default, batching = pair["default"].snapshot[part], pair["batching"].snapshot[part]
    assert batching == default
    if part in ("index", "ASSET_MATERIALIZATION", "check_history", "run_events"):
        assert default  # compared something


def test_the_run_wrote_what_a_day_backfill_writes_per_window(pair):
    """The compared run exercises both kinds of batch: planned events, and materializations of
    a multi-partition output (one per window)."""
    snap = pair["batching"].snapshot
    windows = len(query(pair["batching"].home, "select distinct window_start from window_metrics "
                                               "where window_start >= ? and window_start < ?",
                        [START, END]))
    assert windows == 4
    mats = Counter(r[3] for r in snap["ASSET_MATERIALIZATION"] if r[0] == "rollout_window_job#0")
    planned = Counter(r[3] for r in snap["ASSET_MATERIALIZATION_PLANNED"]
                      if r[0] == "rollout_window_job#0")
    assert mats["window_metrics"] == planned["window_metrics"] == windows


# ---- batches on an instance of their own -----------------------------------------------------
@pytest.fixture
def instance(home: RolloutHome):
    inst = prepare_instance(home)
    assert isinstance(inst.event_log_storage, BatchingSqliteEventLogStorage)
    yield inst
    inst.dispose()


def _entry(event_type: DagsterEventType, data, run_id: str = "run-a") -> EventLogEntry:
    return EventLogEntry(
        error_info=None, level=logging.INFO, user_message="", run_id=run_id,
        timestamp=time.time(), step_key="step", job_name="job",
        dagster_event=DagsterEvent(event_type_value=event_type.value, job_name="job",
                                   step_key="step", event_specific_data=data))


def _mat(key: str, partition: str | None = None, run_id: str = "run-a") -> EventLogEntry:
    return _entry(DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(
        dg.AssetMaterialization(asset_key=key, partition=partition)), run_id)


def _check(key: str, passed: bool, run_id: str = "run-a") -> EventLogEntry:
    return _entry(DagsterEventType.ASSET_CHECK_EVALUATION, dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(key), check_name="c", passed=passed), run_id)


def _stored(instance: dg.DagsterInstance, key: str, run_id: str = "run-a") -> dict:
    storage = instance.event_log_storage
    return {
        "materializations": len(instance.fetch_materializations(dg.AssetKey(key), limit=100)
                                .records),
        "asset_record": instance.get_latest_materialization_event(dg.AssetKey(key)) is not None,
        "checks": len(storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(key), "c"), limit=100)),
        "run_shard": len(instance.get_records_for_run(run_id).records),
    }


def _raw_count(storage: BatchingSqliteEventLogStorage, shard: str, table: str) -> int:
    """Rows committed to a shard file, read through a connection of its own."""
    con = sqlite3.connect(storage.path_for_shard(shard), timeout=5)
    try:
        return con.execute(f"select count(*) from {table}").fetchone()[0]
    finally:
        con.close()


def test_a_batch_commits_once_at_its_end(instance):
    storage = instance.event_log_storage
    with storage.batch():
        storage.store_event(_mat("a", "p1"))
        storage.store_event(_mat("a", "p2"))
        storage.store_event(_check("a", True))
        assert storage.in_batch
        # this thread reads its own writes; nothing is committed for anyone else yet
        assert _stored(instance, "a") == {"materializations": 2, "asset_record": True,
                                          "checks": 1, "run_shard": 3}
        assert _raw_count(storage, "index", "event_logs") == 0
        assert _raw_count(storage, "run-a", "event_logs") == 0
    assert not storage.in_batch
    assert _raw_count(storage, "index", "event_logs") == 3
    assert _raw_count(storage, "run-a", "event_logs") == 3
    assert _stored(instance, "a") == {"materializations": 2, "asset_record": True, "checks": 1,
                                      "run_shard": 3}


def test_an_exception_inside_a_batch_leaves_nothing_written(instance):
    storage = instance.event_log_storage
    storage.store_event(_mat("kept"))  # committed before: stays
    with pytest.raises(RuntimeError, match="boom"), storage.batch():
        storage.store_event(_mat("a", "p1"))
        storage.store_event(_check("a", False))
        storage.store_event(_mat("kept", run_id="run-b"))
        with storage.batch():  # a nested batch joins the outer one
            storage.store_event(_mat("a", "p2"))
        raise RuntimeError("boom")
    assert not storage.in_batch
    assert _stored(instance, "a") == {"materializations": 0, "asset_record": False, "checks": 0,
                                      "run_shard": 1}  # run-a: only "kept"
    assert _stored(instance, "kept", "run-b")["run_shard"] == 0
    assert len(instance.fetch_materializations(dg.AssetKey("kept"), limit=10).records) == 1
    assert _raw_count(storage, "index", "asset_check_executions") == 0
    # and the storage works on: the lock was released, connections closed
    storage.store_event(_mat("a"))
    assert _stored(instance, "a")["materializations"] == 1


def test_a_failing_store_event_batch_writes_nothing_and_its_retry_writes_once(instance,
                                                                             monkeypatch):
    storage = instance.event_log_storage
    real = storage._store_asset_event  # noqa: SLF001
    calls = []

    def flaky(conn, event, event_id):
        # the batch's run-shard and index rows are written by now: they must roll back
        calls.append(event_id)
        if len(calls) == 1:
            raise OSError("disk on fire")
        return real(conn, event, event_id)

    monkeypatch.setattr(storage, "_store_asset_event", flaky)
    events = [_mat("a", f"p{i}") for i in range(5)]
    with pytest.raises(OSError):
        storage.store_event_batch(events)
    assert _stored(instance, "a")["materializations"] == 0
    assert _stored(instance, "a")["run_shard"] == 0
    # Dagster's fallback after a failed batch: the events one by one
    for e in events:
        storage.store_event(e)
    assert _stored(instance, "a")["materializations"] == 5
    assert _stored(instance, "a")["run_shard"] == 5


def _dump_shards(storage: BatchingSqliteEventLogStorage, run_id: str) -> dict:
    """Every row of every table of the index and run shard files, all columns but the times the
    database itself stamps on insert (SQL defaults such as CURRENT_TIMESTAMP), without the
    instance's own records of when its migrations ran."""
    out = {}
    for shard in ("index", run_id):
        con = sqlite3.connect(storage.path_for_shard(shard), timeout=5)
        try:
            tables = [r[0] for r in con.execute(
                "select name from sqlite_master where type = 'table' and name not like "
                "'sqlite_%' and name not in ('alembic_version', 'secondary_indexes') "
                "order by name")]
            for table in tables:
                cols = [f'"{r[1]}"' for r in con.execute(f"pragma table_info({table})")
                        if not (r[4] or "").upper().startswith("CURRENT_")]
                out[f"{shard}.{table}"] = con.execute(
                    f"select {', '.join(cols)} from {table} order by rowid").fetchall()
        finally:
            con.close()
    return out


def test_a_batch_writes_every_row_store_event_writes_one_by_one(home: RolloutHome, tmp_path,
                                                               monkeypatch):
    """The set-wise batch against `store_event` per event, on two instances: planned events of
    several keys (the key written once, from its last event), a check's planned event between
    them, materializations with an indexed tag (data version), and a key whose events are of two
    types (written event by event). Every table of both shard files, row for row."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationPlanned,
    )
    from dagster._core.events import AssetMaterializationPlannedData, AssetObservationData

    def planned(key, partition):
        return _entry(DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
                      AssetMaterializationPlannedData(dg.AssetKey(key), partition))

    def mat(key, partition, version):
        return _entry(DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(
            dg.AssetMaterialization(asset_key=key, partition=partition,
                                    tags={"dagster/data_version": version})))

    events = [planned("b", "p0"), planned("a", "p0"), planned("b", "p1"),
              _entry(DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED, AssetCheckEvaluationPlanned(
                  asset_key=dg.AssetKey("a"), check_name="c")),
              planned("a", "p1"), mat("m", "p0", "v0"), mat("m", "p1", "v1"),
              mat("d", "p0", "w0"),
              _entry(DagsterEventType.ASSET_OBSERVATION,
                     AssetObservationData(dg.AssetObservation(asset_key="d", partition="p1"))),
              mat("n", None, "x")]
    batched = prepare_instance(home)
    other = RolloutHome((tmp_path / "one-by-one").resolve())
    other.root.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(other.root / ".dagster"))
    one_by_one = prepare_instance(other)
    try:
        writes = []
        real = batched.event_log_storage.store_event
        batched.event_log_storage.store_event = lambda e: (writes.append(e), real(e))
        batched.event_log_storage.store_event_batch(events)
        assert writes == []  # written set-wise, not through store_event
        for event in events:
            one_by_one.event_log_storage.store_event(event)
        got = _dump_shards(batched.event_log_storage, "run-a")
        want = _dump_shards(one_by_one.event_log_storage, "run-a")
        assert len(want["index.event_logs"]) == len(events)
        assert len(want["run-a.event_logs"]) == len(events)
        assert len(want["index.asset_keys"]) == 5 and want["index.asset_event_tags"]
        assert want["index.asset_check_executions"]
        assert got == want
    finally:
        batched.dispose()
        one_by_one.dispose()


def test_dagster_hands_multi_partition_materializations_over_as_one_batch(instance,
                                                                         monkeypatch):
    storage = instance.event_log_storage
    batches = []
    real = storage.store_event_batch
    monkeypatch.setattr(storage, "store_event_batch",
                        lambda events: (batches.append(len(events)), real(events)))
    parts = dg.StaticPartitionsDefinition(["p1", "p2", "p3"])

    @dg.asset(partitions_def=parts, backfill_policy=dg.BackfillPolicy.single_run())
    def wide(context):
        return dg.MaterializeResult()

    result = dg.materialize([wide], instance=instance, tags={
        "dagster/asset_partition_range_start": "p1", "dagster/asset_partition_range_end": "p3"})
    assert result.success
    assert 3 in batches  # the 3 materializations (and the 3 planned events) in one batch each
    assert _stored(instance, "wide", result.run_id)["materializations"] == 3


def test_other_threads_wait_for_the_batch_and_never_see_it_open(instance):
    storage = instance.event_log_storage
    seen = {}
    started, done = threading.Event(), threading.Event()

    def other():
        started.set()
        assert not storage.in_batch
        storage.store_event(_mat("b", run_id="run-b"))  # waits for the batch's lock
        seen["a"] = len(instance.fetch_materializations(dg.AssetKey("a"), limit=10).records)
        done.set()

    with storage.batch():
        storage.store_event(_mat("a"))
        t = threading.Thread(target=other)
        t.start()
        assert started.wait(5)
        assert not done.wait(0.5)  # blocked: no interleaved write inside this transaction
    t.join(30)
    assert done.is_set() and seen["a"] == 1
    assert len(instance.fetch_materializations(dg.AssetKey("b"), limit=10).records) == 1


def test_log_events_batches_check_evaluations_in_a_run(instance, monkeypatch):
    from rollout_assets.assets.common import log_events

    storage = instance.event_log_storage
    commits = []
    real_end = storage._end_batch  # noqa: SLF001
    monkeypatch.setattr(storage, "_end_batch", lambda batch, commit: (
        commits.append((sorted(batch.conns), commit)), real_end(batch, commit)))

    # as slo_scores does: evaluations of checks the asset does not declare (they are defined
    # in a check of their own), so Dagster plans none of them
    @dg.asset
    def checked(context):
        log_events(context, (dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey("checked"), check_name=f"c{i}", passed=i % 2 == 0)
            for i in range(5)))

    result = dg.materialize([checked], instance=instance)
    assert result.success
    assert (sorted(["index", result.run_id]), True) in commits
    for i in range(5):
        history = storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("checked"), f"c{i}"), limit=10)
        assert [h.status.value for h in history] == ["SUCCEEDED" if i % 2 == 0 else "FAILED"]


def test_log_events_with_another_storage_logs_one_by_one():
    from rollout_assets.assets.common import log_events

    @dg.asset
    def plain(context):
        log_events(context, [dg.AssetCheckEvaluation(asset_key=dg.AssetKey("plain"),
                                                     check_name="c", passed=True)])

    with dg.instance_for_test() as inst:
        assert not isinstance(inst.event_log_storage, BatchingSqliteEventLogStorage)
        assert dg.materialize([plain], instance=inst).success
        history = inst.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("plain"), "c"), limit=10)
        assert [h.status.value for h in history] == ["SUCCEEDED"]


# ---- kept connections ------------------------------------------------------------------------
def _count_connects(storage: BatchingSqliteEventLogStorage, shard: str) -> list[int]:
    """A list that grows by one for every SQLite connection the shard's engine opens."""
    from sqlalchemy import event

    opened: list[int] = []
    event.listen(storage._engine(shard), "connect",  # noqa: SLF001
                 lambda *_: opened.append(1))
    return opened


def test_events_written_one_by_one_share_one_kept_connection(instance):
    storage = instance.event_log_storage
    storage.store_event(_mat("a", run_id="run-a"))  # the shard exists from here on
    opened = {s: _count_connects(storage, s) for s in ("run-a", "index")}
    for i in range(20):
        storage.store_event(_mat("a", f"p{i}", run_id="run-a"))
    # SQLite closing a shard's last connection checkpoints its WAL: that cost must not recur
    assert (len(opened["run-a"]), len(opened["index"])) == (0, 0)
    assert _raw_count(storage, "run-a", "event_logs") == 21
    assert _raw_count(storage, "index", "event_logs") == 21


def test_another_thread_writes_while_the_kept_connection_is_in_use(instance):
    storage = instance.event_log_storage
    storage.store_event(_mat("a"))
    errors = []

    def writer(n):
        try:
            for i in range(10):
                storage.store_event(_mat("a", f"t{n}-{i}"))
                instance.fetch_materializations(dg.AssetKey("a"), limit=5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert _raw_count(storage, "run-a", "event_logs") == 41


def test_wipe_closes_kept_connections_before_deleting_the_shard_files(instance):
    storage = instance.event_log_storage
    storage.store_event(_mat("a", run_id="run-a"))
    shard = Path(storage.path_for_shard("run-a"))
    assert shard.exists()
    instance.wipe()
    assert not shard.exists()
    # a connection still open on the deleted file would write there, and not to a new file
    storage.store_event(_mat("b", run_id="run-a"))
    assert shard.exists()
    assert _raw_count(storage, "run-a", "event_logs") == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connections(instance):
    storage = instance.event_log_storage
    storage.store_event(_mat("a", run_id="run-a"))  # the parent now holds kept connections
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its write is stored
        code = 1
        try:
            opened = _count_connects(storage, "run-a")
            storage.store_event(_mat("a", "child", run_id="run-a"))
            code = 0 if opened == [1] else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60  # a child stuck on a lock it inherited fails, not hangs
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish its write in 60 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    storage.store_event(_mat("a", "parent", run_id="run-a"))  # the parent's connection still works
    assert _raw_count(storage, "run-a", "event_logs") == 3
    con = sqlite3.connect(storage.path_for_shard("run-a"))
    try:
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


# ---- new run shards from the template ------------------------------------------------------
def _schema(path: str) -> dict:
    con = sqlite3.connect(path)
    try:
        return {
            "objects": sorted(con.execute(
                "select type, name, tbl_name, sql from sqlite_master").fetchall()),
            "alembic": con.execute("select version_num from alembic_version").fetchall(),
            "journal_mode": con.execute("pragma journal_mode").fetchone()[0],
            "mode": os.stat(path).st_mode & 0o777,
        }
    finally:
        con.close()


def test_a_new_run_shard_is_the_file_dagsters_initdb_writes(instance, tmp_path):
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    storage = instance.event_log_storage
    storage.store_event(_mat("a", run_id="run-new"))
    reference = SqliteEventLogStorage(str(tmp_path / "plain"))
    reference.store_event(_mat("a", run_id="run-new"))
    reference.dispose()
    ours, theirs = (_schema(s.path_for_shard("run-new")) for s in (storage, reference))
    assert ours["alembic"] and ours["journal_mode"] == "wal"
    assert ours == theirs
    # the template is no run: Dagster lists run shards by their `.db` suffix
    assert storage.get_all_run_ids() == ["run-new"]


def test_the_template_is_made_once_and_existing_shards_are_checked_as_before(instance,
                                                                             monkeypatch):
    storage = instance.event_log_storage
    stale = Path(storage._base_dir) / ".run-shard-template-dagster-0.0.1.sqlite3"  # noqa: SLF001
    stale.write_bytes(b"another Dagster version's template")
    initdb = []
    real = storage._initdb  # noqa: SLF001
    monkeypatch.setattr(storage, "_initdb", lambda engine, **kw: (
        initdb.append(str(engine.url)), real(engine, **kw))[1])
    for run in ("run-a", "run-b", "run-c"):
        storage.store_event(_mat("a", run_id=run))
    assert len(initdb) == 1 and "template" in initdb[0]  # one build, three copies
    assert not stale.exists()  # replaced by this version's

    # a shard that already exists (another process made it) is never replaced
    other = BatchingSqliteEventLogStorage(storage._base_dir)  # noqa: SLF001
    other.store_event(_mat("a", run_id="run-z"))
    other.dispose()
    storage.store_event(_mat("b", run_id="run-z"))
    assert _raw_count(storage, "run-z", "event_logs") == 2
    assert initdb[-1].endswith("run-z.db")  # checked by Dagster's _initdb, as before
    assert _raw_count(storage, "run-a", "event_logs") == 1
# ---- the home's dagster.yaml -----------------------------------------------------------------
def test_an_old_rollout_home_is_upgraded_in_place_and_keeps_its_history(home: RolloutHome):
    home.dagster_home.mkdir(parents=True)
    cfg = home.dagster_home / "dagster.yaml"
    cfg.write_text(OLD_INSTANCE_YAML.replace("granularity: run", "granularity: op"))
    with dg.DagsterInstance.from_config(str(home.dagster_home)) as old:
        assert type(old.event_log_storage).__name__ == "SqliteEventLogStorage"
        old.report_runless_asset_event(dg.AssetMaterialization("before", partition="p0"))
    instance = prepare_instance(home)
    try:
        text = cfg.read_text()
        assert text.startswith(OLD_INSTANCE_YAML.replace("granularity: run", "granularity: op"))
        assert text.endswith(EVENT_LOG_STORAGE_YAML)  # the rest of the file as it was
        assert isinstance(instance.event_log_storage, BatchingSqliteEventLogStorage)
        assert instance.event_log_storage._base_dir == str(  # noqa: SLF001
            home.dagster_home / "history" / "runs")
        before = instance.get_latest_materialization_event(dg.AssetKey("before"))
        assert before is not None and before.asset_materialization.partition == "p0"
        instance.report_runless_asset_event(dg.AssetMaterialization("before", partition="p1"))
        assert len(instance.fetch_materializations(dg.AssetKey("before"), limit=10).records) == 2
    finally:
        instance.dispose()
    prepare_instance(home).dispose()
    assert cfg.read_text() == text  # upgraded once


@pytest.mark.parametrize("content", [
    DEFAULT_STORAGE_YAML,  # the user's own file
    "# my instance\n" + OLD_INSTANCE_YAML,
    OLD_INSTANCE_YAML + "storage:\n  sqlite:\n    base_dir: elsewhere\n",  # storage configured
])
def test_a_dagster_yaml_rollout_did_not_write_or_with_storage_is_not_touched(home, content):
    home.dagster_home.mkdir(parents=True)
    cfg = home.dagster_home / "dagster.yaml"
    cfg.write_text(content)
    from rollout_assets.runner import upgrade_instance_yaml

    assert not upgrade_instance_yaml(cfg)
    assert cfg.read_text() == content


def test_a_copied_home_writes_its_own_history(home: RolloutHome, tmp_path, monkeypatch):
    """base_dir is relative to the instance's directory: a copy never writes to the original."""
    instance = prepare_instance(home)
    instance.report_runless_asset_event(dg.AssetMaterialization("x"))
    instance.dispose()
    copy = tmp_path / "copy"
    shutil.copytree(home.root, copy)
    monkeypatch.setenv("DAGSTER_HOME", str(copy / ".dagster"))
    with dg.DagsterInstance.from_config(str(copy / ".dagster")) as other:
        assert other.event_log_storage._base_dir == str(  # noqa: SLF001
            copy / ".dagster" / "history" / "runs")
        other.report_runless_asset_event(dg.AssetMaterialization("x"))
        assert len(other.fetch_materializations(dg.AssetKey("x"), limit=10).records) == 2
    with dg.DagsterInstance.from_config(str(home.root / ".dagster")) as original:
        assert len(original.fetch_materializations(dg.AssetKey("x"), limit=10).records) == 1


def test_an_operators_batch_size_wins(home: RolloutHome, monkeypatch):
    monkeypatch.setenv(EVENT_BATCH_SIZE_ENV, "0")
    prepare_instance(home).dispose()
    assert os.environ[EVENT_BATCH_SIZE_ENV] == "0"
    monkeypatch.delenv(EVENT_BATCH_SIZE_ENV)
    prepare_instance(home).dispose()
    assert os.environ[EVENT_BATCH_SIZE_ENV] == DEFAULT_EVENT_BATCH_SIZE
