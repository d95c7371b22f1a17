"""Breach sensor: launches `rollback_job` for every verdict that requires a rollback.

It reads `window_verdicts` materializations from Dagster's event log (never the DuckDB file,
which a run may be writing), keeps the last storage id it saw as its cursor, and keys each run
`<window>:<phase>` so one breach starts one rollback, however often the window is re-scored.
"""


import dagster as dg

from rollout_assets.jobs import rollback_job
from rollout_assets.partitions import window_from_key, window_stamp
from rollout_assets.reporting import rollback_run_key

VERDICTS_KEY = dg.AssetKey("window_verdicts")
BATCH = 500


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
                      "rollout/rollback_to": r["rollback_to"]},
            )))
    last = result.records[-1].storage_id if result.records else after_storage_id
    # one request per run key: a window scored by two runs (the daemon's and `rollout run`'s)
    # has two materializations; the latest one's verdict is the one to act on
    latest = {rr.run_key: (sid, rr) for sid, rr in out}
    return sorted(latest.values(), key=lambda x: x[0]), last, result.has_more


@dg.sensor(
    job=rollback_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches rollback_job for each breach that requires a rollback (run key "
                "<window>:<phase>; cursor = last window_verdicts event seen).",
)
def breach_sensor(context: dg.SensorEvaluationContext):
    cursor = int(context.cursor) if context.cursor else None
    requests, last, _ = rollback_requests(context.instance, cursor)
    new_cursor = str(last) if last is not None else None
    if not requests:
        return dg.SensorResult(
            skip_reason="no new verdict requires a rollback", cursor=new_cursor)
    return dg.SensorResult(run_requests=[rr for _, rr in requests], cursor=new_cursor)
