"""The DuckDB warehouse as a Dagster resource: writers and readers wait for the file lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from rollout_assets import warehouse


class DuckDBWarehouse(dg.ConfigurableResource):
    """`data/rollout.duckdb` under the home.

    In a run, the steps share one read-write connection: the first `connect()` opens it and
    Dagster's teardown of the run's resources closes it (with the in-process executor the
    jobs use, once per run). Opening the file and closing it after writes (DuckDB then
    checkpoints) cost ~50 ms each time: per step, that was a third of one window's run. So a
    run holds DuckDB's single-writer lock from its first warehouse step to its end, as its
    Dagster pool (`rollout_warehouse`, one run at a time) already reserves the file for it.

    * A block that raises closes the connection (an open transaction is discarded); the next
      `connect()` opens a new one.
    * `release()` closes it before the run ends: `rollback_job` does so while the rollback
      command runs, since that command opens the file itself.
    * Outside an execution (no `setup_for_execution`, e.g. a script using the class directly)
      every `connect()` opens and closes its own connection, so nothing stays locked.

    DuckDB lets one process open the file for writing, and a read-only open fails while it does:
    both wait (with back-off) for up to `lock_wait_seconds`, which covers a concurrent run; a
    window's whole ETL slot is 15 minutes."""

    path: str
    lock_wait_seconds: float = warehouse.LOCK_WAIT_SECONDS
    _keep: bool = PrivateAttr(default=False)
    _con: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._keep = True

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release()
        self._keep = False

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator:
        """The run's connection (read-write: a process cannot hold a read-only one beside it),
        or, outside an execution, a connection of the block's own."""
        if not self._keep:
            con = self._open(read_only)
            try:
                yield con
            finally:
                con.close()
            return
        if self._con is None:
            self._con = self._open(read_only=False)
        try:
            yield self._con
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Close the run's connection, if open (checkpointing what it wrote)."""
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def _open(self, read_only: bool):
        return warehouse.connect(Path(self.path), read_only=read_only,
                                 wait_seconds=self.lock_wait_seconds)
