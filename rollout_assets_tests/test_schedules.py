"""The live schedule: the window that just closed, and every window of the last 24 h that was
never judged (found by an independent audit: traffic on disk before the daemon started, or
windows that closed while it was down, stayed unjudged for good; the late-data sensor only
re-scores windows already judged)."""

from __future__ import annotations

from datetime import UTC, timedelta

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from rollout_assets.definitions import build_definitions
from rollout_assets.partitions import partition_key
from rollout_assets.runner import QUIET, prepare_instance, run_range
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import T0, promote_to, query, window_events

W = timedelta(minutes=15)


def requests(defs, instance, scheduled):
    schedule = defs.resolve_schedule_def("every_15_minutes")
    ctx = dg.build_schedule_context(instance=instance,
                                    scheduled_execution_time=scheduled.replace(tzinfo=UTC),
                                    repository_def=defs.get_repository_def())
    return [(r.run_key, r.partition_key, r.tags.get(ASSET_PARTITION_RANGE_START_TAG),
             r.tags.get(ASSET_PARTITION_RANGE_END_TAG))
            for r in schedule.evaluate_tick(ctx).run_requests]


def test_the_schedule_catches_up_on_windows_never_judged(home):
    promote_to(home, "A-1")
    for i in range(4):  # 09:00 .. 09:45, on disk before anything ran
        write_canary(home, "A-1", window_events("A-1", T0 + i * W, f"w{i}"))
    assert run_range(home, T0, T0 + W, log=lambda m: None).success  # only 09:00 judged
    instance = prepare_instance(home)
    defs = build_definitions(home)
    try:
        k = partition_key
        day_before = T0 + 4 * W - timedelta(hours=24) + W  # the oldest window caught up
        got = requests(defs, instance, T0 + 5 * W)  # 10:15: 10:00 just closed
        assert got == [
            (f"catch-up:{k(day_before)}..{k(T0 - W)}", None, k(day_before), k(T0 - W)),
            (f"catch-up:{k(T0 + W)}..{k(T0 + 3 * W)}", None, k(T0 + W), k(T0 + 3 * W)),
            (k(T0 + 4 * W), k(T0 + 4 * W), None, None),
        ]
        # a window run in flight covers its windows: they are not asked for twice
        job = defs.resolve_job_def("rollout_window_job")
        instance.create_run_for_job(job, status=dg.DagsterRunStatus.NOT_STARTED, tags={
            ASSET_PARTITION_RANGE_START_TAG: k(T0 + W),
            ASSET_PARTITION_RANGE_END_TAG: k(T0 + 2 * W)})
        got = requests(defs, instance, T0 + 5 * W)
        assert [r[0] for r in got] == [f"catch-up:{k(day_before)}..{k(T0 - W)}",
                                       f"catch-up:{k(T0 + 3 * W)}..{k(T0 + 3 * W)}",
                                       k(T0 + 4 * W)]

        # the catch-up run judges the traffic that was waiting
        res = job.execute_in_process(instance=instance, run_config=QUIET, tags={
            ASSET_PARTITION_RANGE_START_TAG: k(T0 + W),
            ASSET_PARTITION_RANGE_END_TAG: k(T0 + 3 * W)})
        assert res.success
        assert query(home, "select count(distinct window_start) from window_verdicts "
                           "where phase = 'A-1'") == [(4,)]
        assert [r[0] for r in requests(defs, instance, T0 + 5 * W)] == [
            f"catch-up:{k(day_before)}..{k(T0 - W)}", k(T0 + 4 * W)]
    finally:
        instance.dispose()
