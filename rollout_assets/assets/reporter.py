"""Reporter (seed §6, minutes 12–15): breached windows → alert reports and notifications."""


import dagster as dg

from rollout_assets.assets.analyzer import window_verdicts
from rollout_assets.assets.common import (
    WINDOW_ASSET_KWARGS,
    column_schema,
    log_events,
    on_last_window,
    publish_for_readers,
    run_totals,
    run_windows,
)
from rollout_assets.assets.dashboard import refresh_dashboard
from rollout_assets.assets.governance import incidents
from rollout_assets.checks.etl_slots import slot_evaluations
from rollout_assets.collect import now_utc
from rollout_assets.partitions import WINDOW, partition_key
from rollout_assets.reporting import (
    alert_context,
    alert_messages,
    mark_withdrawn,
    rca_messages,
    render_alert,
    reopened_messages,
    resolve_messages,
)
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.resources.notifier import Notifier
from rollout_assets.warehouse import transaction


def publish_window(con, home: HomeResource, notifier: Notifier, ws) -> tuple[str, dict] | None:
    """Render `reports/alerts/<window>.md` for a breached window and send its messages once."""
    policy = home.policy()
    ctx = alert_context(con, policy, ws)
    if ctx is None:
        return None
    path = render_alert(home.home, ctx)
    rel = home.home.relative(path)
    sent = {"queued": 0, "sent": 0, "failed": 0, "duplicate": 0}
    with transaction(con):
        con.execute("insert or replace into alert_reports values (?, ?, ?, ?, now()::TIMESTAMP)",
                    [ws, rel, [p["phase"] for p in ctx["phases"]], ctx["level"]])
        for msg in alert_messages(ctx, ws, rel):
            sent[notifier.send(con, msg)] += 1
    return rel, {"level": ctx["level"], **sent}


@dg.asset(group_name="reporter", deps=[window_verdicts, incidents], **WINDOW_ASSET_KWARGS)
def alert_reports(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse,
    notifier: Notifier,
) -> dg.MaterializeResult:
    """`reports/alerts/<window>.md` for every breached window, rendered from
    `templates/alerts/rollback.md` (Slack, PagerDuty and rollback sections), and the Slack /
    PagerDuty messages the policy routes it to, each recorded once in `notifications`.

    The rollback section is filled in by `rollback_job` once the breach sensor has run it.
    """
    windows = run_windows(context)
    reports = []
    totals = {"queued": 0, "sent": 0, "failed": 0, "duplicate": 0}
    with warehouse.connect() as con:
        notifier.catch_up(con, windows[0])  # earlier windows' undelivered messages first
        breached = [r[0] for r in con.execute(
            "select distinct window_start from window_verdicts where breach and window_start >= ? "
            "and window_start < ? order by 1", [windows[0], windows[-1] + WINDOW]
        ).fetchall()]
        # a window that no longer breaches (re-scored) must not keep a stale report
        stale = con.execute(
            "select window_start, path from alert_reports where window_start >= ? and "
            "window_start < ?", [windows[0], windows[-1] + WINDOW]
        ).fetchall()
        for ws, path in stale:
            if ws in breached:
                continue
            if con.execute("select 1 from rollbacks where window_start = ? and status <> "
                           "'skipped'", [ws]).fetchone():
                # a rollback ran for it: its report keeps the rollback's exit code and log
                # (seed §8 step 3), and says the breach was withdrawn
                mark_withdrawn(home.home.root / path)
                continue
            (home.home.root / path).unlink(missing_ok=True)
            con.execute("delete from alert_reports where window_start = ?", [ws])
        for ws in breached:
            out = publish_window(con, home, notifier, ws)
            if out:
                rel, info = out
                reports.append(rel)
                for k in totals:
                    totals[k] += info[k]
                context.add_asset_metadata(
                    {"report": rel, "level": info["level"], "messages_queued": info["queued"]},
                    partition_key=partition_key(ws),
                )
        for msg in rca_messages(con, home.policy()):  # before the closing notices
            notifier.send(con, msg)
        for msg in reopened_messages(con):  # a withdrawn breach that came back
            notifier.send(con, msg)
        # resolves after the alerts: PagerDuty must see trigger before resolve
        resolves = {"queued": 0, "sent": 0, "failed": 0, "duplicate": 0}
        for msg in resolve_messages(con, home.policy()):
            resolves[notifier.send(con, msg)] += 1
        schema = column_schema(con, "alert_reports")
        if notifier.failures():
            # this step fails below, and Dagster then skips the dashboard's: keep the page
            # current here, failed deliveries and all
            refresh_dashboard(context, con, home.home, home.policy())
            publish_for_readers(context, con, home.home)
    log_events(context, slot_evaluations(home.policy(), "reporter", windows, now_utc()))
    notifier.raise_for_failures()  # after every window's messages went out (or escalated)
    on_last_window(context, {"latest_reports": dg.MetadataValue.json(reports[-10:]),
                             "dagster/column_schema": schema})
    return run_totals(context, {
        "reports": len(reports), "messages_queued": totals["queued"],
        "messages_sent": totals["sent"], "messages_failed": totals["failed"],
        "messages_already_sent": totals["duplicate"],
        "resolves_delivered": resolves["queued"] + resolves["sent"],
    })
