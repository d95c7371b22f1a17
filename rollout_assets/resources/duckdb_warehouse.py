"""The DuckDB warehouse as a Dagster resource: writers wait for the file lock, readers don't lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from rollout_assets import warehouse


class DuckDBWarehouse(dg.ConfigurableResource):
    """`data/rollout.duckdb` under the home. Connections are opened per step and closed at once,
    so no process holds the single-writer lock longer than one step."""

    path: str
    lock_wait_seconds: float = 120.0

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator:
        con = warehouse.connect(Path(self.path), read_only=read_only,
                                wait_seconds=self.lock_wait_seconds)
        try:
            yield con
        finally:
            con.close()
