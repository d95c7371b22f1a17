"""Window arithmetic: the one place that knows how a 15-minute window is named and bounded.

Windows are `[start, start + 15m)` in UTC, aligned to :00, :15, :30, :45. Dagster partition keys
use `%Y-%m-%d-%H:%M`; files use the contract's `YYYYMMDDTHHMMZ` stamp.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg

WINDOW = timedelta(minutes=15)
PARTITION_FMT = "%Y-%m-%d-%H:%M"
STAMP_FMT = "%Y%m%dT%H%MZ"
# The first window Dagster knows about. Older data can be replayed by setting this earlier.
PARTITIONS_START = os.environ.get("ROLLOUT_PARTITIONS_START", "2024-01-01-00:00")


def check_partitions_start() -> None:
    """ROLLOUT_PARTITIONS_START must name a window start (Dagster's own error is a traceback)."""
    try:  # strptime alone takes "2024-1-1-0:00", which the daily partitions then refuse
        start = (datetime.strptime(PARTITIONS_START, PARTITION_FMT)
                 if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}-[0-9]{2}:[0-9]{2}", PARTITIONS_START)
                 else None)
    except ValueError:
        start = None
    if start is None or start.minute % 15:
        raise ValueError(f"ROLLOUT_PARTITIONS_START={PARTITIONS_START!r}: expected a window start "
                         "as YYYY-MM-DD-HH:MM in UTC, minutes 00, 15, 30 or 45 (e.g. "
                         "2024-01-01-00:00)")
    now = datetime.now(UTC).replace(tzinfo=None)
    if not datetime(2000, 1, 1) <= start <= now:  # events before 2000 are never stored
        raise ValueError(f"ROLLOUT_PARTITIONS_START={PARTITIONS_START!r}: must lie between "
                         f"2000-01-01-00:00 and now ({now:{PARTITION_FMT}} UTC)")


def _build_partitions() -> dict:
    import dagster as dg

    check_partitions_start()

    return {
        "window_partitions": dg.TimeWindowPartitionsDefinition(
            cron_schedule="*/15 * * * *",
            start=PARTITIONS_START,
            fmt=PARTITION_FMT,
            timezone="UTC",
        ),
        "daily_partitions": dg.DailyPartitionsDefinition(
            start_date=PARTITIONS_START[:10], timezone="UTC", end_offset=0
        ),
    }


window_partitions: dg.TimeWindowPartitionsDefinition
daily_partitions: dg.DailyPartitionsDefinition


def __getattr__(name: str):
    """`window_partitions` / `daily_partitions` are built on first use (PEP 562), so the window
    arithmetic below, and everything that only needs it (event validation, the flag store,
    `rollout flags rollback`: the rollback command itself), starts without importing Dagster."""
    if name in ("window_partitions", "daily_partitions"):
        globals().update(_build_partitions())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_utc_naive(dt: datetime) -> datetime:
    """DuckDB TIMESTAMP columns hold naive UTC."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def floor_window(dt: datetime) -> datetime:
    dt = to_utc_naive(dt)
    return dt.replace(minute=dt.minute - dt.minute % 15, second=0, microsecond=0)


def ceil_window(dt: datetime) -> datetime:
    f = floor_window(dt)
    return f if f == to_utc_naive(dt) else f + WINDOW


def partition_key(window_start: datetime) -> str:
    return to_utc_naive(window_start).strftime(PARTITION_FMT)


def window_from_key(key: str) -> datetime:
    return datetime.strptime(key, PARTITION_FMT)


def window_stamp(window_start: datetime) -> str:
    return to_utc_naive(window_start).strftime(STAMP_FMT)


def window_from_stamp(stamp: str) -> datetime:
    return datetime.strptime(stamp, STAMP_FMT)


def windows_between(start: datetime, end: datetime) -> list[datetime]:
    """Every window whose start lies in [start, end)."""
    out = []
    w = ceil_window(start)
    end = to_utc_naive(end)
    while w < end:
        out.append(w)
        w += WINDOW
    return out


def parse_cli_time(text: str) -> datetime:
    """Parse an ISO timestamp from the CLI; a value without a zone is taken as UTC."""
    t = text.strip()
    if t.endswith("Z") or t.endswith("z"):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return to_utc_naive(dt)


def partition_keys_in_context(context) -> list[str]:
    """Partition keys of a run: one window, or a range from a single-run backfill."""
    if not context.has_partition_key and not context.has_partition_key_range:
        return []
    return list(context.partition_keys)


def window_ranges(windows: list[datetime]) -> list[tuple[datetime, datetime]]:
    """Sorted windows as contiguous runs (first, last): one run of the window job each."""
    out: list[tuple[datetime, datetime]] = []
    for w in windows:
        if out and w == out[-1][1] + WINDOW:
            out[-1] = (out[-1][0], w)
        else:
            out.append((w, w))
    return out
