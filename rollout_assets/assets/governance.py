"""Governance assets (seed §5, §8): incidents with their checklist and RCA drafts, daily SLA rows
and the GA gate check."""

from datetime import date, datetime

import dagster as dg

from rollout_assets.assets.analyzer import window_verdicts
from rollout_assets.assets.common import (
    OWNERS,
    WAREHOUSE_POOL,
    column_schema,
    publish_for_readers,
    run_window_days,
)
from rollout_assets.governance import (
    SLA_DAYS_KEY,
    compute_sla_daily,
    days_of_changed_incidents,
    days_with_gates,
    ga_gate,
    incident_facts,
    sla_days_text,
    write_daily_summary,
)
from rollout_assets.incidents import refresh_incidents
from rollout_assets.partitions import daily_partitions
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource


@dg.asset(
    group_name="governance", pool=WAREHOUSE_POOL, owners=OWNERS, kinds={"duckdb"},
    # Recomputed from every verdict, so not partitioned: one materialization per run instead of
    # one per window (2 x 96 Dagster events a day). Depending on the last partition keeps the
    # lineage without Dagster enumerating every window since the partitions start.
    deps=[dg.AssetDep(window_verdicts, partition_mapping=dg.LastPartitionMapping())],
)
def incidents(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """Incidents (seed §8): opened by a phase's first breach, later breaches attached, closed after
    the policy's consecutive green cycles; checklist timestamps (alert, escalation, rollback, RCA,
    close) and an RCA draft in `reports/rca/<incident>.md` owned by the on-call, due one business
    day later. Recomputed from `window_verdicts`, so a re-scored window corrects it. The resolve
    messages go out from `alert_reports`, after the alerts they resolve.

    Its metadata names the days whose `sla_daily` rows the run touched (its windows' and those
    of every incident it changed): `sla_refresh_sensor` recomputes the past ones."""
    policy = home.policy()
    with warehouse.connect() as con:
        before = incident_facts(con)
        rows = refresh_incidents(con, home.home, policy)
        touched = run_window_days(context.run.tags) | days_of_changed_incidents(
            before, incident_facts(con))
        schema = column_schema(con, "incidents")
    open_ = [r for r in rows if r["status"] == "open"]
    return dg.MaterializeResult(metadata={
        "incidents": len(rows), "open": len(open_),
        "open_ids": ", ".join(r["incident_id"] for r in open_) or "none",
        "late_escalations": sum(1 for r in rows if r["escalation_late"]),
        "closed": sum(1 for r in rows if r["status"] == "closed"),
        SLA_DAYS_KEY: sla_days_text(touched),
        "dagster/column_schema": schema,
    })


def _days(context) -> list[date]:
    return [datetime.strptime(k, "%Y-%m-%d").date() for k in context.partition_keys]


@dg.asset(
    group_name="governance", deps=[incidents], partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(), pool=WAREHOUSE_POOL, owners=OWNERS,
    kinds={"duckdb"},
)
def sla_daily(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """SLA rows per (phase, UTC day) for consumers: windows judged and passed, attainment,
    breaches, rollbacks, incidents, mean time to restore; observed-only and drill traffic counted
    as footnotes. Also writes `reports/daily/<day>.md`."""
    policy = home.policy()
    days = _days(context)
    with warehouse.connect() as con:
        n = compute_sla_daily(con, policy, days[0], days[-1])
        # the later days' summaries show their gate, which reads these days' rows
        summaries = [write_daily_summary(con, home.home, policy, d)
                     for d in days_with_gates(con, policy, days)]
        for d in days:
            att = con.execute(
                "select phase, attainment from sla_daily where day = ? order by phase",
                [d]).fetchall()
            context.add_asset_metadata(
                {f"{ph}/attainment": float(a) for ph, a in att if a is not None},
                partition_key=d.isoformat())
        schema = column_schema(con, "sla_daily")
        publish_for_readers(context, con, home.home)
    return dg.MaterializeResult(metadata={
        "rows": n, "days": len(days), "summaries": len([s for s in summaries if s]),
        "dagster/column_schema": schema,
    })


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(
        "ga_gate", asset=sla_daily, partitions_def=daily_partitions,
        description=("Seed §3 GA gate: B-1 needs every judged window of the policy's "
                     "consecutive days to pass and no major (P1) incident. A closed gate is a "
                     "WARN, not an error."),
    )],
    can_subset=True, pool=WAREHOUSE_POOL,
)
def ga_gate_check(context, home: HomeResource, warehouse: DuckDBWarehouse):
    policy = home.policy()
    with warehouse.connect() as con:
        # also the later days whose gate reads the run's days: a late breach on day 3 closes
        # the gate of days 4-7 in the audit trail too, and days run newest first open theirs
        for d in days_with_gates(con, policy, _days(context)):
            g = ga_gate(con, policy, d)
            yield dg.AssetCheckEvaluation(
                asset_key=sla_daily.key, check_name="ga_gate", passed=g.ok,
                partition=d.isoformat(), severity=dg.AssetCheckSeverity.WARN,
                description="gate open" if g.ok else "; ".join(g.reasons),
                metadata={**g.details, "policy_version": policy.version},
            )
