"""Seed §6 ETL slots as Dagster freshness: Collector within 7 minutes of a window's close,
Analyzer within 12, Reporter within 15 (minutes from governance/policy.yaml `etl_slots`).

Two views of the same rule:
- a cron `FreshnessPolicy` per stage asset, so the UI shows a stage that missed its slot as
  stale; and
- an `etl_slot` asset check per stage, evaluated for each live window a run materializes
  (its close within the last hour): passed when the stage finished inside its slot, a WARN
  failure otherwise, with the minutes after close in the metadata. Backfills of old windows are
  not timed.
"""

from collections.abc import Iterator
from datetime import datetime, timedelta

import dagster as dg

from rollout_assets.partitions import WINDOW, partition_key, window_partitions
from rollout_assets.policy import Policy

STAGE_ASSETS = {
    "collector": ("canary_events", "window_metrics"),
    "analyzer": ("slo_scores", "window_verdicts"),
    "reporter": ("alert_reports",),
}
TIMED_ASSET = {"collector": "window_metrics", "analyzer": "window_verdicts",
               "reporter": "alert_reports"}
LIVE_HORIZON = timedelta(hours=1)
CHECK_NAME = "etl_slot"


def slot_minutes(policy: Policy, stage: str) -> int:
    return getattr(policy.etl_slots, stage)


def freshness_policy(minutes: int) -> dg.FreshnessPolicy:
    """Materialized between a window's close and `minutes` after it, every 15 minutes."""
    deadlines = sorted({(q * 15 + minutes) % 60 for q in range(4)})
    return dg.FreshnessPolicy.cron(
        deadline_cron=f"{','.join(map(str, deadlines))} * * * *",
        lower_bound_delta=timedelta(minutes=minutes),
    )


def with_slot_freshness(defs: dg.Definitions, policy: Policy) -> dg.Definitions:
    by_key = {
        dg.AssetKey(key): freshness_policy(slot_minutes(policy, stage))
        for stage, keys in STAGE_ASSETS.items() for key in keys
    }
    return defs.map_asset_specs(
        func=lambda spec: dg.apply_freshness_policy(spec, by_key[spec.key])
        if spec.key in by_key else spec
    )


def build_etl_slot_checks(policy: Policy) -> list[dg.AssetChecksDefinition]:
    specs = [
        dg.AssetCheckSpec(
            CHECK_NAME, asset=asset, partitions_def=window_partitions,
            description=(f"Seed §6 ETL slot: the {stage} finishes within "
                         f"{slot_minutes(policy, stage)} minutes of the window's close."),
        )
        for stage, asset in TIMED_ASSET.items()
    ]

    @dg.multi_asset_check(
        specs=specs, can_subset=True, name="etl_slot_checks",
        description="Evaluated by each stage as it finishes a live window; running it by hand "
                    "evaluates nothing (the moment a stage finished cannot be re-observed).",
    )
    def etl_slot_checks(context):
        context.log.info("ETL slots are evaluated by the stage assets themselves")
        yield from ()

    return [etl_slot_checks]


def slot_evaluations(policy: Policy, stage: str, windows: list[datetime],
                     now: datetime) -> Iterator[dg.AssetCheckEvaluation]:
    """One evaluation per live window: minutes from its close to now vs the stage's slot."""
    slot = slot_minutes(policy, stage)
    for ws in windows:
        closed = ws + WINDOW
        if not (now - LIVE_HORIZON <= closed <= now):
            continue
        late = (now - closed).total_seconds() / 60
        yield dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(TIMED_ASSET[stage]), check_name=CHECK_NAME,
            passed=late <= slot, severity=dg.AssetCheckSeverity.WARN,
            partition=partition_key(ws),
            description=f"{stage} finished {late:.1f} min after the window closed "
                        f"(slot {slot} min)",
            metadata={"minutes_after_close": round(late, 2), "slot_minutes": slot,
                      "stage": stage},
        )
