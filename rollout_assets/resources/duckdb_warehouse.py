"""The DuckDB warehouse as a Dagster resource: writers and readers wait for the file lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from rollout_assets import warehouse


class DuckDBWarehouse(dg.ConfigurableResource):
    """`data/rollout.duckdb` under the home. Connections are opened per step and closed at once,
    so no process holds the single-writer lock longer than one step.

    DuckDB lets one process open the file for writing, and a read-only open fails while it does:
    both wait (with back-off) for up to `lock_wait_seconds`, which covers a concurrent run's
    longest step; a window's whole ETL slot is 15 minutes."""

    path: str
    lock_wait_seconds: float = 900.0

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator:
        con = warehouse.connect(Path(self.path), read_only=read_only,
                                wait_seconds=self.lock_wait_seconds)
        try:
            yield con
        finally:
            con.close()
