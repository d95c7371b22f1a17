"""Breach sensor: launches `rollback_job` for every verdict that requires a rollback.

It reads `window_verdicts` materializations from Dagster's event log (never the DuckDB file,
which a run may be writing), keeps the last storage id it saw as its cursor, and keys each run
`<window>:<phase>` so one breach starts one rollback, however often the window is re-scored.

A rollback run that failed (its command failed or timed out, e.g. while a reader held the
warehouse; its process died) is launched again, `rollback.retries` times at most, each
`rollback.retry_after_minutes` after the last attempt, keyed `<window>:<phase>:retry-<n>`. The
job itself finishes a rollback already done, and runs no retry once the incident has closed or
the flags are no further than the target.
"""

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG

from rollout_assets.jobs import rollback_job
from rollout_assets.partitions import window_from_key, window_stamp
from rollout_assets.policy import PolicyError
from rollout_assets.reporting import RETRY_SEP, rollback_run_key
from rollout_assets.resources.home import HomeResource

VERDICTS_KEY = dg.AssetKey("window_verdicts")
BATCH = 500
KEY_TAG = "rollout/rollback_key"  # the breach's run key, on its first run and every retry
RETRY_TAG = "rollout/retry"
RETRY_HORIZON = timedelta(days=1)  # failures older than this are left to people


def rollback_requests(instance: dg.DagsterInstance, after_storage_id: int | None):
    """(storage_id, RunRequest) for each rollback required by verdicts newer than the cursor."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=VERDICTS_KEY, after_storage_id=after_storage_id),
        limit=BATCH, ascending=True,
    )
    out = []
    for record in result.records:
        mat = record.asset_materialization
        if mat is None or mat.partition is None:
            continue
        entry = mat.metadata.get("rollbacks_required")
        required = entry.value if entry is not None else []
        ws = window_from_key(mat.partition)
        for r in required or []:
            out.append((record.storage_id, dg.RunRequest(
                run_key=rollback_run_key(ws, r["phase"]),
                run_config=dg.RunConfig(ops={"execute_rollback": {"config": {
                    "window": window_stamp(ws), "phase": r["phase"],
                    "rollback_to": r["rollback_to"], "level": r["level"],
                    "failed_slos": list(r["failed_slos"]),
                }}}),
                tags={"rollout/window": window_stamp(ws), "rollout/phase": r["phase"],
                      "rollout/rollback_to": r["rollback_to"],
                      KEY_TAG: rollback_run_key(ws, r["phase"])},
            )))
    last = result.records[-1].storage_id if result.records else after_storage_id
    # one request per run key: a window scored by two runs (the daemon's and `rollout run`'s)
    # has two materializations; the latest one's verdict is the one to act on
    latest = {rr.run_key: (sid, rr) for sid, rr in out}
    return sorted(latest.values(), key=lambda x: x[0]), last, result.has_more


def retry_requests(instance: dg.DagsterInstance, retries: int, after_minutes: float,
                   now: float | None = None) -> list[dg.RunRequest]:
    """A retry for each breach whose latest rollback run failed, while it has had at most
    `retries` retries and its last attempt ended `after_minutes` ago or more."""
    if not retries:
        return []
    now = time.time() if now is None else now
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=rollback_job.name,
                              updated_after=datetime.fromtimestamp(now, UTC) - RETRY_HORIZON),
        limit=1000)
    latest: dict[str, dg.RunRecord] = {}
    attempts: Counter = Counter()
    for rec in records:
        run = rec.dagster_run
        key = run.tags.get(KEY_TAG) or (run.tags.get(RUN_KEY_TAG) or "").split(RETRY_SEP)[0]
        if not key:
            continue
        attempts[key] += 1
        if key not in latest or rec.create_timestamp > latest[key].create_timestamp:
            latest[key] = rec
    out = []
    for key, rec in sorted(latest.items()):
        run = rec.dagster_run
        done = attempts[key] - 1  # retries so far
        if (run.status != dg.DagsterRunStatus.FAILURE or done >= retries
                or rec.end_time is None or now - rec.end_time < after_minutes * 60):
            continue
        config = run.run_config["ops"]["execute_rollback"]["config"]
        out.append(dg.RunRequest(
            run_key=f"{key}{RETRY_SEP}{done + 1}",
            run_config={"ops": {"execute_rollback": {"config": {**config, "retry": done + 1}}}},
            tags={**{k: v for k, v in run.tags.items() if k.startswith("rollout/")},
                  KEY_TAG: key, RETRY_TAG: str(done + 1)}))
    return out


@dg.sensor(
    job=rollback_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches rollback_job for each breach that requires a rollback (run key "
                "<window>:<phase>; cursor = last window_verdicts event seen), and again for a "
                "failed one (rollback.retries, <window>:<phase>:retry-<n>).",
)
def breach_sensor(context: dg.SensorEvaluationContext, home: HomeResource):
    cursor = int(context.cursor) if context.cursor else None
    requests, last, _ = rollback_requests(context.instance, cursor)
    new_cursor = str(last) if last is not None else None
    try:
        rb = home.policy().rollback
        retries = retry_requests(context.instance, rb.retries, rb.retry_after_minutes)
    except PolicyError:
        retries = []  # the runs say what is wrong with the policy
    run_requests = [rr for _, rr in requests] + retries
    if not run_requests:
        return dg.SensorResult(
            skip_reason="no new verdict requires a rollback", cursor=new_cursor)
    return dg.SensorResult(run_requests=run_requests, cursor=new_cursor)
