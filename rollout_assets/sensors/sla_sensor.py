"""SLA refresh sensor: under the daemon, `sla_daily` rows of past days follow what later runs
changed.

The `daily_sla` schedule computes a UTC day once, 20 minutes after it ends. Runs after that can
still move the day's rows: the late-data sensor re-scores its windows, a window run or a
rollback regroups incidents that opened or closed on it (windows run out of order), a rollback
escalates one. Each `incidents` materialization (window runs) and observation (rollback runs)
names those days in its `sla_days` metadata; this sensor reads them from Dagster's event log
(never the DuckDB file a run may be writing) and launches `rollout_daily_job` for each past day,
once per tick. Today is left to the schedule. Runs launched by `rollout run` are skipped: the
CLI recomputes the same days itself.

The cursor is the last storage id seen of each event type; the first evaluation only records
where the log stands, so enabling the sensor does not recompute the whole history.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import dagster as dg

from rollout_assets.governance import SLA_DAYS_KEY
from rollout_assets.jobs import daily_job

INCIDENTS_KEY = dg.AssetKey("incidents")
BATCH = 500
CLI_TAG = ("rollout/launched_by", "cli")


def _fetchers(instance: dg.DagsterInstance):
    return {"materialization": instance.fetch_materializations,
            "observation": instance.fetch_observations}


def stale_days(instance: dg.DagsterInstance, cursor: dict[str, int], skip_cli: bool = True
               ) -> tuple[dict[date, int], dict[str, int]]:
    """{day: newest storage id naming it} from `incidents` events after the cursor (runs the
    CLI launched left out unless `skip_cli` is false: `rollout run` reads its own this way),
    and the cursor after them."""
    days: dict[date, int] = {}
    new_cursor = dict(cursor)
    cli_runs: dict[str, bool] = {}
    for kind, fetch in _fetchers(instance).items():
        result = fetch(dg.AssetRecordsFilter(asset_key=INCIDENTS_KEY,
                                             after_storage_id=cursor.get(kind)),
                       limit=BATCH, ascending=True)
        for record in result.records:
            new_cursor[kind] = record.storage_id
            event = record.asset_materialization or record.asset_observation
            entry = event.metadata.get(SLA_DAYS_KEY) if event is not None else None
            if entry is None or not entry.value:
                continue
            run_id = record.run_id
            if skip_cli and run_id not in cli_runs:
                run = instance.get_run_by_id(run_id)
                cli_runs[run_id] = run is not None and run.tags.get(CLI_TAG[0]) == CLI_TAG[1]
            if skip_cli and cli_runs[run_id]:
                continue
            for text in str(entry.value).split(","):
                d = date.fromisoformat(text)
                days[d] = max(days.get(d, 0), record.storage_id)
    return days, new_cursor


def latest_storage_ids(instance: dg.DagsterInstance) -> dict[str, int]:
    out = {}
    for kind, fetch in _fetchers(instance).items():
        result = fetch(INCIDENTS_KEY, limit=1)
        out[kind] = result.records[0].storage_id if result.records else 0
    return out


def sla_refresh_requests(instance: dg.DagsterInstance, cursor_text: str | None,
                         today: date) -> tuple[list[dg.RunRequest], str]:
    """The daily runs to launch, and the new cursor (JSON)."""
    if not cursor_text:
        return [], json.dumps(latest_storage_ids(instance))
    days, cursor = stale_days(instance, json.loads(cursor_text))
    requests = [
        dg.RunRequest(run_key=f"sla_daily:{d.isoformat()}:{sid}", partition_key=d.isoformat(),
                      tags={"rollout/reason": "sla_daily refresh after a later run"})
        for d, sid in sorted(days.items()) if d < today
    ]
    return requests, json.dumps(cursor)


@dg.sensor(
    job=daily_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Recomputes sla_daily for past UTC days that later window or rollback runs "
                "changed (re-scored windows, incidents regrouped or escalated).",
)
def sla_refresh_sensor(context: dg.SensorEvaluationContext):
    requests, cursor = sla_refresh_requests(context.instance, context.cursor,
                                            datetime.now(UTC).date())
    if not requests:
        return dg.SensorResult(skip_reason="no past day's SLA rows changed", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
