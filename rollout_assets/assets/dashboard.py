"""Reporter: the seed §8 dashboard, `reports/dashboard/index.html`, rendered from DuckDB.

Not partitioned: it summarises the latest days of every window asset. It runs at the end of the
window job (so the schedule, `rollout run` and the demo refresh it after every range) and
`rollback_job` re-renders it through `refresh_dashboard` once a rollback is recorded, so the page
never shows a breach without the rollback that answered it (so does a Reporter run that failed
to deliver a message, since its failure skips this step).
"""

import dagster as dg

from rollout_assets.assets.common import OWNERS, WAREHOUSE_POOL, publish_for_readers
from rollout_assets.dashboard.render import render_dashboard
from rollout_assets.home import RolloutHome
from rollout_assets.policy import Policy
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource

DASHBOARD_KEY = dg.AssetKey("dashboard")
UPSTREAM = ("window_metrics", "slo_scores", "window_verdicts", "alert_reports")  # partitioned


class DashboardConfig(dg.Config):
    days: float = 7.0  # how many days of windows, up to the latest one with data


def dashboard_metadata(home: RolloutHome, path, data: dict) -> dict:
    """Numbers a reader sees in the Dagster UI without opening the page."""
    sla = data.get("phase_sla") or []
    table = ["| phase | judged | passed | attainment | breaches | rollbacks |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sla:
        att = "—" if r["attainment"] is None else f"{r['attainment'] * 100:.1f} %"
        table.append(f"| {r['phase']} | {r['judged']} | {r['passed']} | {att} | {r['breaches']} "
                     f"| {r['rollbacks']} |")
    rng = data.get("range") or {}
    current = data.get("current") or {}
    return {
        "path": dg.MetadataValue.path(str(path)),
        "relative_path": home.relative(path),
        "current_phase": current.get("phase", "unknown"),
        "from": rng.get("from", "—"), "to": rng.get("to", "—"),
        "windows": len(set((data.get("rows") or {}).get("t", []))),
        "breaches": len(data.get("breaches") or []),
        "rollbacks": sum(1 for r in data.get("rollbacks") or [] if r["status"] != "skipped"),
        "incidents": (len(data["incidents"]["rows"]) if data.get("incidents") else 0),
        "attainment_by_phase": dg.MetadataValue.md("\n".join(table)),
        "policy_version": data["policy"]["version"],
    }


@dg.asset(
    key=DASHBOARD_KEY, group_name="reporter", pool=WAREHOUSE_POOL,
    # The page reads the latest windows. Depending on the *last* partition keeps the lineage
    # without Dagster enumerating every 15-minute partition since PARTITIONS_START for each dep
    # on every run (the default for an unpartitioned asset: ~4 s CPU per window run, growing).
    deps=[*(dg.AssetDep(k, partition_mapping=dg.LastPartitionMapping()) for k in UPSTREAM),
          "incidents"],
    owners=OWNERS, kinds={"duckdb", "html"},
)
def dashboard(
    context: dg.AssetExecutionContext, config: DashboardConfig, home: HomeResource,
    warehouse: DuckDBWarehouse,
) -> dg.MaterializeResult:
    """`reports/dashboard/index.html`: the seed §8 views (AutoSave, Restore, Merge, SLA/SLO) as
    time-series charts with the policy's threshold lines, phase bands and breach / rollback
    markers, the breaches, rollbacks and incidents tables, and the reviewer sign-off checks.

    One self-contained file (script, style and data inlined): it opens from disk, offline.
    """
    policy = home.policy()
    # the same (read-write) open as the other steps of this process: DuckDB refuses a read-only
    # connection beside a read-write one to the same file in one process; the pool serializes
    with warehouse.connect() as con:
        path, data = render_dashboard(con, home.home, policy, days=config.days)
        publish_for_readers(context, con, home.home)  # the window job's last step
    context.log.info(f"dashboard written to {home.home.relative(path)}")
    return dg.MaterializeResult(metadata=dashboard_metadata(home.home, path, data))


def refresh_dashboard(context, con, home: RolloutHome, policy: Policy) -> None:
    """Re-render outside the dashboard's own step (after a rollback, with `rollback_job`'s open
    connection; after a Reporter run that failed to deliver, whose failure skips the step) and
    record it as a materialization of `dashboard`. What called it has already happened: a page
    that cannot be rendered is a warning, never a failure of its own."""
    try:
        path, data = render_dashboard(con, home, policy)
    except Exception as exc:  # noqa: BLE001 - see docstring
        context.log.warning(f"dashboard not refreshed: {exc}")
        return
    context.log_event(dg.AssetMaterialization(
        asset_key=DASHBOARD_KEY, description=f"re-rendered by {context.job_name}",
        metadata=dashboard_metadata(home, path, data)))
