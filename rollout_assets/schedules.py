"""Live mode: every 15 minutes (UTC) materialize the window that just closed, and catch up on
the windows of the last 24 hours that were never judged.

A plain partitioned schedule judges only the window that just closed: windows whose traffic
was on disk before the daemon started, or that closed while it was down, were never judged
(the late-data sensor re-scores only windows already judged), without a word. Each tick also
asks for the windows of the last `CATCH_UP` that have no `window_verdicts` materialization and
that no queued or running window run covers, one run per contiguous range (run key
`catch-up:<first>..<last>`, so a range is asked for once). A window with no events costs
little: it produces no rows.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from rollout_assets.assets.common import tagged_windows
from rollout_assets.jobs import daily_job, window_job
from rollout_assets.partitions import (
    WINDOW,
    floor_window,
    partition_key,
    window_from_key,
    window_partitions,
    window_ranges,
    windows_between,
)

SCHEDULE_NAME = "every_15_minutes"
CATCH_UP = timedelta(hours=24)
VERDICTS_KEY = dg.AssetKey("window_verdicts")
IN_FLIGHT = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED,
             dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def missed_windows(instance: dg.DagsterInstance, latest: datetime) -> list[datetime]:
    """The windows of the `CATCH_UP` before `latest` (the window that just closed) that were
    never judged and that no window run in flight covers."""
    first = window_from_key(window_partitions.get_first_partition_key())
    candidates = windows_between(max(first, latest - CATCH_UP + WINDOW), latest)
    if not candidates:
        return []
    done = instance.get_materialized_partitions(VERDICTS_KEY)
    spans = [tagged_windows(run.tags) for run in instance.get_runs(
        filters=dg.RunsFilter(job_name=window_job.name, statuses=IN_FLIGHT))]
    busy = {w for span in spans if span for w in windows_between(span[0], span[1] + WINDOW)}
    return [w for w in candidates if partition_key(w) not in done and w not in busy]


def window_requests(instance: dg.DagsterInstance, scheduled: datetime) -> list[dg.RunRequest]:
    """The catch-up ranges, oldest first, then the window that just closed."""
    latest = floor_window(scheduled) - WINDOW  # the window that just closed
    if latest < window_from_key(window_partitions.get_first_partition_key()):
        return []
    key = partition_key(latest)
    requests = []
    for lo, hi in window_ranges(missed_windows(instance, latest)):
        start, end = partition_key(lo), partition_key(hi)
        requests.append(dg.RunRequest(
            run_key=f"catch-up:{start}..{end}",
            tags={ASSET_PARTITION_RANGE_START_TAG: start, ASSET_PARTITION_RANGE_END_TAG: end,
                  "rollout/launched_by": SCHEDULE_NAME, "rollout/catch_up": "true"}))
    requests.append(dg.RunRequest(run_key=key, partition_key=key,
                                  tags={"rollout/launched_by": SCHEDULE_NAME}))
    return requests


@dg.schedule(
    name=SCHEDULE_NAME,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    job=window_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Seed §6: Collector → Analyzer → Reporter for the window that just closed, and "
                "for any window of the last 24 h that was never judged (daemon down or started "
                "after the traffic).",
)
def window_schedule(context: dg.ScheduleEvaluationContext):
    return window_requests(context.instance, context.scheduled_execution_time)


daily_schedule = dg.build_schedule_from_partitioned_job(
    daily_job,
    name="daily_sla",
    description="SLA rows, daily summary and GA gate for the UTC day that just ended.",
    hour_of_day=0,
    minute_of_hour=20,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
