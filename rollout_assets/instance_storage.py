"""Dagster's SQLite event log storage, with fewer connections and commits per run.

A day backfill writes ~1,400 Dagster events in one run (planned materializations, one
materialization per window and asset, one check evaluation per scored window). Dagster's
`SqliteEventLogStorage` builds a new SQLAlchemy engine, opens a connection and commits for every
write, once for the run's shard and again for the `index` shard that mirrors asset and check
events: 5-15 ms per event, seconds per step.

`BatchingSqliteEventLogStorage` writes the same rows to the same files, and differs in that:

* one engine per shard is kept, with ONE idle connection in its pool, instead of an engine built,
  a connection opened and closed, and the engine disposed per write. Closing a shard's last
  connection is what costs in WAL mode (SQLite checkpoints the log into the database, syncs it
  and deletes the log: ~3 ms, on every event); a kept connection leaves that to SQLite's
  automatic checkpoints. Commits still sync as before (`synchronous` is not changed). A forked
  child forgets the parent's connections without closing them (`os.register_at_fork`), and
  `wipe()` closes them before it deletes the shard files;
* `batch()`: every write of this thread inside it shares ONE connection and ONE transaction per
  shard touched, committed when the outermost batch ends and rolled back if it raises. Other
  threads never see an open batch: their reads and writes wait (on the parent's `_db_lock`,
  which a batch holds from its first write to its end, as the parent holds it around each
  write) and then use their own connections. `store_event_batch` stores its events inside one
  batch;
* a batch Dagster hands over (`store_event_batch`: asset events only) is written set-wise, as
  Dagster's Postgres storage writes one: each event serialized once, one insert per shard, the
  tags in one insert, and each asset key's row once per batch (Postgres writes only the last
  event's key; here every key's, so the rows are the ones written event by event). One by one,
  each event had cost ~1 ms; a day's backfill has ~1,150 of them;
* a new run shard is a copy of an empty shard (`.run-shard-template-dagster-<version>.sqlite3`
  in the same directory, made once by Dagster's own `_initdb`) instead of tables built and
  stamped by Alembic for every run (~70 ms); a shard that already exists is checked by
  `_initdb` as before;
* `has_table` and the asset-key column check, asked by the parent for every check / asset event,
  remember what they found (tables and columns are only ever added, by migrations).

Configure it in dagster.yaml like the parent::

    event_log_storage:
      module: rollout_assets.instance_storage
      class: BatchingSqliteEventLogStorage
      config:
        base_dir: history/runs

`base_dir` is the parent's: an absolute path is used as is. A relative one (unlike the parent,
which resolves it against the current directory) is resolved against the instance's root
directory (`DAGSTER_HOME` / the directory of dagster.yaml) when Dagster registers the instance
with the storage, so a rollout home can be copied or moved. `history/runs` is the directory
Dagster's default storage uses, so an existing home keeps its history.

Dagster hands a batch to `store_event_batch` (the planned-materialization events of a run, the
materializations of a multi-partition output) only when the environment variable
`DAGSTER_EVENT_BATCH_SIZE` is above 0; otherwise it calls `store_event` per event and the batch
override is never used. So creating this storage sets it (`os.environ.setdefault`, to
`DEFAULT_EVENT_BATCH_SIZE`; an operator's own value wins, and "0" turns Dagster's batching off).
Dagster reads the variable at every event, and the storage is created when the instance loads,
before any run: this covers `execute_in_process`, run workers and the webserver alike. It is
process-wide: another instance in the same process (with the default storage) then gets
`store_event_batch` calls too, which the base class stores one event at a time, as before.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster._check as check
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.events import (
    ASSET_CHECK_EVENTS,
    ASSET_EVENTS,
    BATCH_WRITABLE_EVENTS,
)
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SqliteEventLogStorage,
)
from dagster._core.storage.sql import create_engine
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._serdes import ConfigurableClassData
from dagster.version import __version__ as dagster_version
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool, QueuePool

EVENT_BATCH_SIZE_ENV = "DAGSTER_EVENT_BATCH_SIZE"
DEFAULT_EVENT_BATCH_SIZE = "10000"
# engines kept per process: the index shard and the run shards last touched (a webserver reads
# many runs; an evicted engine is rebuilt on its next use). Each keeps one idle connection.
MAX_CACHED_ENGINES = 32
# every storage of this process, so that a forked child can drop the connections it inherited
_STORAGES: weakref.WeakSet[BatchingSqliteEventLogStorage] = weakref.WeakSet()


class _Batch:
    """The open batch of one thread: a connection and its transaction per shard touched."""

    def __init__(self) -> None:
        self.conns: dict[str, tuple[Connection, Any]] = {}
        self.holds_lock = False


class BatchingSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` with one engine per shard and batched writes (see the module)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        os.environ.setdefault(EVENT_BATCH_SIZE_ENV, DEFAULT_EVENT_BATCH_SIZE)
        check.str_param(base_dir, "base_dir")
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_lock = threading.Lock()
        self._local = threading.local()
        self._known_tables: set[str] = set()
        self._known_asset_key_cols: set[str] = set()
        self._pending_base_dir: str | None = None
        _STORAGES.add(self)
        if os.path.isabs(base_dir):
            super().__init__(base_dir, inst_data)
        else:
            # resolved in register_instance, against the instance's root directory
            self._pending_base_dir = base_dir
            self._inst_data = inst_data
            self._obs = None
            self._instance_weakref = None

    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> BatchingSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def register_instance(self, instance) -> None:
        relative = self._pending_base_dir
        if relative is not None:
            # the parent's own initialisation (directory, index shard), now that the path is known
            self._pending_base_dir = None
            try:
                SqliteEventLogStorage.__init__(
                    self, os.path.join(instance.root_directory, relative), self._inst_data)
            except BaseException:
                self._pending_base_dir = relative
                raise
        super().register_instance(instance)

    def conn_string_for_shard(self, shard_name: str) -> str:
        if self._pending_base_dir is not None:
            raise DagsterInvariantViolationError(
                f"{type(self).__name__} with the relative base_dir {self._pending_base_dir!r} is "
                "used before a DagsterInstance was registered with it")
        return super().conn_string_for_shard(shard_name)

    # ---- engines ---------------------------------------------------------------------------
    def _engine(self, shard: str) -> Engine:
        with self._engines_lock:
            engine = self._engines.get(shard)
            if engine is not None:
                self._engines.move_to_end(shard)
                return engine
            # one connection stays open between writes; more are opened for other threads
            # while it is in use, and closed when they are returned (`max_overflow=-1`: never
            # a wait on the pool, only on `_db_lock` and SQLite's own locks)
            engine = create_engine(
                self.conn_string_for_shard(shard),
                poolclass=QueuePool, pool_size=1, max_overflow=-1,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
            )
            self._engines[shard] = engine
            while len(self._engines) > MAX_CACHED_ENGINES:
                old_shard, old = next(iter(self._engines.items()))
                if old_shard == INDEX_SHARD_NAME:
                    self._engines.move_to_end(old_shard)
                    old_shard, old = next(iter(self._engines.items()))
                del self._engines[old_shard]
                old.dispose()  # closes its idle connection; one checked out stays usable
            return engine

    def _ready_engine(self, shard: str) -> Engine:
        """The shard's engine, its database created/stamped on first use (the caller holds
        `_db_lock`, as the parent's `_connect` does around `_initdb`)."""
        engine = self._engine(shard)
        if shard not in self._initialized_dbs:
            if shard == INDEX_SHARD_NAME or not self._new_shard_from_template(shard):
                self._initdb(engine)
            self._initialized_dbs.add(shard)
        return engine

    # ---- new run shards --------------------------------------------------------------------
    def _template_path(self) -> str:
        # not `*.db`: Dagster lists (and `wipe` deletes) run shards by that suffix
        name = f".run-shard-template-dagster-{dagster_version}.sqlite3"
        return os.path.join(self._base_dir, name)

    def _new_shard_from_template(self, shard: str) -> bool:
        """Create a run shard that does not exist yet as a copy of an empty shard, instead of
        building its tables and stamping it with Alembic (~70 ms a run). The template is made
        once per Dagster version by Dagster's own `_initdb`, so a copy is the file `_initdb` would
        write. False when the shard exists (another process made it: `_initdb` then checks it)
        or the copy cannot be linked into place."""
        path = self.path_for_shard(shard)
        if os.path.exists(path):
            return False
        template = self._template_path()
        if not os.path.exists(template):
            self._make_template(template)
        tmp = self._scratch_path("new-shard")
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, path)  # never replaces a shard another process created meanwhile
        except OSError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def _scratch_path(self, kind: str) -> str:
        """A file name of this thread's own in the shard directory (not `*.db`). Files are
        created with the process's usual mode, as `_initdb`'s are (not mkstemp's 0600)."""
        name = f".{kind}-{os.getpid()}-{threading.get_ident()}.sqlite3"
        return os.path.join(self._base_dir, name)

    def _make_template(self, template: str) -> None:
        tmp = self._scratch_path("template")
        try:
            engine = create_engine(f"sqlite:///{tmp}", poolclass=NullPool)
            try:
                self._initdb(engine)
            finally:
                engine.dispose()  # the last connection closed: the WAL is merged and removed
            os.replace(tmp, template)
            for old in glob.glob(os.path.join(self._base_dir, ".run-shard-template-*.sqlite3")):
                if old != template:  # another Dagster version's
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(old)
        finally:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def has_table(self, table_name: str) -> bool:
        # The parent builds an engine per call, and `store_asset_check_event` asks it
        # (`supports_asset_checks`) for every check event. Tables are only ever added (by
        # migrations), so a table once found is remembered.
        if table_name in self._known_tables:
            return True
        engine = self._engine(INDEX_SHARD_NAME)
        with engine.connect() as conn:
            found = bool(engine.dialect.has_table(conn, table_name))
        if found:
            self._known_tables.add(table_name)
        return found

    def _has_asset_key_col_on_connection(self, conn: Connection, column_name: str) -> bool:
        # asked (a PRAGMA table_info) for every asset event by `_store_asset_event`; columns,
        # like tables, are only ever added
        if column_name in self._known_asset_key_cols:
            return True
        found = super()._has_asset_key_col_on_connection(conn, column_name)
        if found:
            self._known_asset_key_cols.add(column_name)
        return found

    # ---- connections -----------------------------------------------------------------------
    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        # `run_connection` and `index_connection` (and so `index_transaction`, which finds the
        # connection already in a transaction) all come here.
        check.str_param(shard, "shard")
        batch: _Batch | None = getattr(self._local, "batch", None)
        if batch is not None:
            yield self._batch_connection(batch, shard)
            return
        with self._db_lock:
            engine = self._ready_engine(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _batch_connection(self, batch: _Batch, shard: str) -> Connection:
        entry = batch.conns.get(shard)
        if entry is None:
            if not batch.holds_lock:
                # held until the batch ends: this thread's later writes must not wait on another
                # thread that itself waits on SQLite for this batch's open transaction
                self._db_lock.acquire()
                batch.holds_lock = True
            engine = self._ready_engine(shard)
            conn = engine.connect()
            try:
                txn = conn.begin()
            except BaseException:
                conn.close()
                raise
            entry = batch.conns[shard] = (conn, txn)
        return entry[0]

    @property
    def in_batch(self) -> bool:
        """Whether this thread has a batch open."""
        return getattr(self._local, "batch", None) is not None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every event-log write of this thread inside the block shares one connection and one
        transaction per shard; committed when the block ends, rolled back if it raises.

        Reads of this thread inside the block see its uncommitted writes; other threads see
        none of them until the commit. A nested `batch()` joins the outer one: only the
        outermost commits or rolls back (SQLite savepoints are not used).
        """
        if self.in_batch:
            yield
            return
        batch = _Batch()
        self._local.batch = batch
        try:
            yield
        except BaseException:
            self._local.batch = None
            self._end_batch(batch, commit=False)
            raise
        self._local.batch = None
        self._end_batch(batch, commit=True)

    def _end_batch(self, batch: _Batch, commit: bool) -> None:
        # shards commit in the order they were first written (run shard before index, as the
        # parent writes them); if one commit fails, the shards not yet committed roll back
        try:
            for _conn, txn in batch.conns.values():
                if commit:
                    txn.commit()
                else:
                    txn.rollback()
        except BaseException:
            for _conn, txn in batch.conns.values():
                if txn.is_active:
                    try:
                        txn.rollback()
                    except Exception:  # noqa: BLE001 - the commit error is the one to raise
                        pass
            raise
        finally:
            for conn, _txn in batch.conns.values():
                conn.close()
            batch.conns.clear()
            if batch.holds_lock:
                batch.holds_lock = False
                self._db_lock.release()

    # ---- writes ----------------------------------------------------------------------------
    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """All events in one batch: the same rows as `store_event` per event, one commit per
        shard. If it raises, nothing of it was written (unless it runs inside an outer batch of
        this thread, which it joins), so Dagster's fallback in `handle_new_event`, which then
        stores the events one by one, writes none of them twice."""
        with self.batch():
            if _batchable(events):
                self._store_batch(events)
            else:
                for event in events:
                    self.store_event(event)

    def _store_batch(self, events: Sequence[EventLogEntry]) -> None:
        """The rows `store_event` writes for each event, written set-wise, as Dagster's Postgres
        storage stores a batch: each event is serialized once; the run shard gets one
        multi-row insert; the index shard one insert of the asset and check events, returning
        their ids in order, then the tags of all asset events in one insert. Ids in every table
        are assigned in event order, as one by one. An asset key's row in `asset_keys` is
        written once, from its last event in the batch, when all of that key's events are of one
        type (each would overwrite the same columns: a day's planned events, or one
        materialization per window), and event by event otherwise; keys new to the table are
        added in the order of their first event."""
        rows = [self._event_to_row(event) for event in events]
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(SqlEventLogStorageTable.insert(), rows)
        # the events the parent's `store_event` mirrors into the index shard
        mirrored = [i for i, event in enumerate(events)
                    if event.dagster_event_type in ASSET_EVENTS | ASSET_CHECK_EVENTS]
        if not mirrored:
            return
        with self.index_transaction() as conn:
            inserted = conn.execute(
                SqlEventLogStorageTable.insert().returning(
                    SqlEventLogStorageTable.c.id, sort_by_parameter_order=True),
                [rows[i] for i in mirrored])
            ids = dict(zip(mirrored, (row[0] for row in inserted), strict=True))
            if any(v is None for v in ids.values()):
                raise DagsterInvariantViolationError(
                    "Cannot store asset event tags for null event id.")
            assets = [i for i in mirrored if events[i].dagster_event_type in ASSET_EVENTS]
            self._store_asset_event_tags(conn, [events[i] for i in assets],
                                         [ids[i] for i in assets])
            by_key: dict[str, list[int]] = {}
            for i in assets:
                by_key.setdefault(rows[i]["asset_key"], []).append(i)
            for positions in by_key.values():
                if len({events[i].dagster_event_type for i in positions}) == 1:
                    positions = positions[-1:]
                for i in positions:
                    self._store_asset_event(conn, events[i], ids[i])
        for i in mirrored:
            if events[i].dagster_event_type in ASSET_CHECK_EVENTS:
                self.store_asset_check_event(events[i], ids[i])

    def wipe(self) -> None:
        # the parent deletes the run shards' files: close their connections first
        self._dispose_engines(keep=INDEX_SHARD_NAME)
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        self._dispose_engines()

    def _dispose_engines(self, keep: str | None = None) -> None:
        with self._engines_lock:
            for shard in [s for s in self._engines if s != keep]:
                self._engines.pop(shard).dispose()

    def _forget_connections(self) -> None:
        """In a forked child: drop the engines without closing their connections, which are
        the parent's (SQLAlchemy's `dispose(close=False)`); new ones are opened on next use."""
        self._engines_lock = threading.Lock()
        self._local = threading.local()
        for engine in self._engines.values():
            engine.dispose(close=False)
        self._engines.clear()


def _batchable(events: Sequence[EventLogEntry]) -> bool:
    """Whether `_store_batch` writes these events as `store_event` would: events of one run,
    each of a type Dagster hands over in batches (asset and check events only: no run status
    change, which `store_event` also mirrors into the index shard)."""
    return bool(events) and all(
        event.is_dagster_event and event.run_id == events[0].run_id
        and event.dagster_event_type in BATCH_WRITABLE_EVENTS
        for event in events)


def _after_fork_in_child() -> None:
    for storage in list(_STORAGES):
        storage._forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)
