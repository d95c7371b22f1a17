"""Analyzer (seed §6, minutes 7–12): `window_metrics` → `slo_scores` → `window_verdicts`."""


import dagster as dg

from rollout_assets.analyze import judge_range, score_range
from rollout_assets.assets.collector import window_metrics
from rollout_assets.assets.common import (
    WINDOW_ASSET_KWARGS,
    column_schema,
    log_events,
    on_last_window,
    run_totals,
    windows_to_compute,
)
from rollout_assets.checks.etl_slots import slot_evaluations
from rollout_assets.checks.slo_checks import slo_check_evaluations
from rollout_assets.collect import now_utc
from rollout_assets.governance import record_policy_version
from rollout_assets.partitions import partition_key
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource


@dg.asset(group_name="analyzer", deps=[window_metrics], **WINDOW_ASSET_KWARGS)
def slo_scores(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """One row per (window, phase, SLO): value vs the policy's threshold, sample size, and
    `passed` (NULL when the sample is below the rule's minimum or the value is NULL).

    Emits one asset-check evaluation per scored (window, phase, SLO) for the checks of
    governance/policy.yaml: their history is the governance audit trail.
    """
    policy = home.policy()
    with warehouse.connect() as con:
        if record_policy_version(con, policy, home.home.relative(home.home.policy_path)):
            context.log.info(f"policy version {policy.version} ({policy.version_label}) recorded")
        windows = windows_to_compute(context, con, policy)
        scores = score_range(con, policy, windows[0], windows[-1], now_utc()) if windows else []
        schema = column_schema(con, "slo_scores")
    log_events(context, slo_check_evaluations(scores, policy.version))
    failed = [s for s in scores if s.passed is False]
    by_window: dict = {}
    for s in scores:
        by_window.setdefault(s.window_start, []).append(s)
    for w in windows:
        ws = by_window.get(w, [])
        context.add_asset_metadata(
            {"scored": len(ws), "failed": sum(1 for s in ws if s.passed is False),
             "not_judged": sum(1 for s in ws if s.passed is None)},
            partition_key=partition_key(w),
        )
    on_last_window(context, {"dagster/column_schema": schema})
    return run_totals(context, {
        "scores": len(scores), "passed": sum(1 for s in scores if s.passed),
        "failed": len(failed), "not_judged": sum(1 for s in scores if s.passed is None),
    }, policy_version=policy.version)


@dg.asset(group_name="analyzer", deps=[slo_scores], **WINDOW_ASSET_KWARGS)
def window_verdicts(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """One row per (window, phase): `breach`, `rollback_required`, `rollback_to` (the previous
    phase in policy order), notification `level` and the failed SLOs.

    Each window's materialization carries the rollbacks it requires; the breach sensor reads
    them from Dagster's event log (not from DuckDB) and launches `rollback_job`.
    """
    policy = home.policy()
    with warehouse.connect() as con:
        windows = windows_to_compute(context, con, policy)
        verdicts = judge_range(con, policy, windows[0], windows[-1],
                               now_utc()) if windows else []
        schema = column_schema(con, "window_verdicts")
    by_window: dict = {}
    for v in verdicts:
        by_window.setdefault(v.window_start, []).append(v)
    for w in windows:
        vs = by_window.get(w, [])
        context.add_asset_metadata({
            "breaches": sum(1 for v in vs if v.breach),
            "level": max((v.level for v in vs), key=("ok", "warning", "P2", "P1").index,
                         default="ok"),
            "rollbacks_required": dg.MetadataValue.json([
                {"phase": v.phase, "rollback_to": v.rollback_to, "level": v.level,
                 "failed_slos": v.failed_slos}
                for v in vs if v.rollback_required
            ]),
        }, partition_key=partition_key(w))
    log_events(context, slot_evaluations(policy, "analyzer", windows, now_utc()))
    breaches = [v for v in verdicts if v.breach]
    on_last_window(context, {"dagster/column_schema": schema})
    return run_totals(context, {
        "verdicts": len(verdicts), "breaches": len(breaches),
        "rollbacks_required": sum(1 for v in verdicts if v.rollback_required),
    }, policy_version=policy.version)
