"""Small helpers shared by the window assets."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from datetime import date, datetime, timedelta

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from rollout_assets.instance_storage import BatchingSqliteEventLogStorage
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import partition_key, window_from_key, window_partitions
from rollout_assets.retention import kept_before, kept_note, split_kept
from rollout_assets.warehouse import refresh_reader_copy

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


def windows_to_compute(context, con, policy) -> list[datetime]:
    """This run's windows whose rows are recomputed: those retention keeps as they are (their
    events, or the history their verdicts read, are deleted) get a `kept` note instead."""
    windows = run_windows(context)
    kept = kept_before(con, policy)
    live, frozen = split_kept(windows, kept)
    for w in frozen:
        context.add_asset_metadata({"kept": kept_note(kept)}, partition_key=partition_key(w))
    if frozen:
        context.log.warning(f"{len(frozen)} window(s) {partition_key(frozen[0])} .. "
                            f"{partition_key(frozen[-1])} {kept_note(kept)}")
    return live


def tagged_windows(tags) -> tuple[datetime, datetime] | None:
    """The first and last window a window run materializes, read from its tags (one partition,
    or a single-run range); None for a run of no window."""
    first = tags.get(ASSET_PARTITION_RANGE_START_TAG) or tags.get(PARTITION_NAME_TAG)
    last = tags.get(ASSET_PARTITION_RANGE_END_TAG) or tags.get(PARTITION_NAME_TAG)
    if not first or not last:
        return None
    return window_from_key(first), window_from_key(last)


def run_window_days(tags) -> set[date]:
    """The UTC days of the windows a window run materializes, read from its tags (for an
    asset outside the window partitions, such as `incidents`, in the same run)."""
    span = tagged_windows(tags)
    if span is None:
        return set()
    day, end = span[0].date(), span[1].date()
    out = set()
    while day <= end:
        out.add(day)
        day += timedelta(days=1)
    return out


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


def run_totals(context, totals: dict, **every_window) -> dg.MaterializeResult:
    """The run's totals, as `run/<name>` on its last window's materialization only: a
    `MaterializeResult`'s metadata is copied onto every partition's event, so each window of a
    96-window backfill showed the whole day's counts as its own. `every_window` is metadata
    true of each window (the policy version)."""
    on_last_window(context, {f"run/{k}": v for k, v in totals.items()})
    return dg.MaterializeResult(metadata=every_window or None)


def on_last_window(context, metadata: dict) -> None:
    """Metadata about the run's output as a whole (the table's column schema, per-file stats):
    on the materialization of the run's last window only. A `MaterializeResult`'s metadata is
    copied onto every partition's event, so a day's backfill stored and serialized a 3-4 KB
    column schema 96 times per asset. The UI shows an asset's columns from its latest
    materialization, which is the last window's."""
    context.add_asset_metadata(metadata, partition_key=context.partition_keys[-1])


def log_events(context, events: Iterable) -> int:
    """`context.log_event` for each event (e.g. a step's asset-check evaluations), all inside one
    event-log batch when the instance's storage batches (`BatchingSqliteEventLogStorage`): one
    connection and commit per shard for the lot instead of per event, and none of them stored if
    one fails. With any other storage, plainly one by one. Returns how many were logged."""
    events = list(events)  # computed before the batch opens: it holds the event log's lock
    storage = context.instance.event_log_storage
    batch = (storage.batch() if isinstance(storage, BatchingSqliteEventLogStorage)
             else nullcontext())
    with batch:
        for event in events:
            context.log_event(event)
    return len(events)


def publish_for_readers(context, con, home) -> None:
    """Refresh the SQL readers' copy (`warehouse.publish_reader_copy`) once a run's writes are
    done. A copy that cannot be written is a warning: the run's own work stands, and readers
    keep the previous copy."""
    n = refresh_reader_copy(con, home.reader_db_path, context.log.warning)
    if n is not None:
        context.log.info(f"readers' copy {home.relative(home.reader_db_path)}: {n} tables")
