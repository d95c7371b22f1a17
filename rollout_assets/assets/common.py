"""Small helpers shared by the window assets."""

from __future__ import annotations

from datetime import datetime

import dagster as dg

from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import window_from_key, window_partitions

WAREHOUSE_POOL = "rollout_warehouse"
OWNERS = ["team:release-engineering"]
WINDOW_ASSET_KWARGS = dict(
    partitions_def=window_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool=WAREHOUSE_POOL,
    owners=OWNERS,
    kinds={"duckdb"},
)


def run_windows(context) -> list[datetime]:
    """The windows this run materializes: one (live schedule) or a range (backfill)."""
    return [window_from_key(k) for k in context.partition_keys]


def column_schema(con, table: str) -> dg.TableSchema:
    cols = con.execute(
        "select column_name, data_type from information_schema.columns where table_name = ? "
        "order by ordinal_position", [table]
    ).fetchall()
    # metric columns carry the catalog's wording, so the UI's column table explains them
    return dg.TableSchema(columns=[
        dg.TableColumn(name, dtype, description=METRICS[name].description if name in METRICS
                       else None)
        for name, dtype in cols])
