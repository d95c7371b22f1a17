"""Collector (seed §6, minutes 0–7): canary JSONL → `canary_events` → `window_metrics`."""


import dagster as dg

from rollout_assets.assets.common import (
    WINDOW_ASSET_KWARGS,
    column_schema,
    log_events,
    on_last_window,
    run_totals,
    run_windows,
    windows_to_compute,
)
from rollout_assets.checks.etl_slots import slot_evaluations
from rollout_assets.collect import (
    compute_window_metrics,
    exclusions_by_window,
    export_monitoring,
    ingest_canary,
    now_utc,
)
from rollout_assets.collector_faults import (
    check_canary_files,
    describe,
    ingest_isolated,
    record_faults,
)
from rollout_assets.governance import check_phase_history
from rollout_assets.partitions import WINDOW, partition_key
from rollout_assets.policy import PolicyError
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.retention import KEPT_BEFORE_KEY, kept_before, purge_events
from rollout_assets.rotation import archive_paths, follow_rotations
from rollout_assets.rotation import describe as describe_rotations


@dg.asset(group_name="collector", **WINDOW_ASSET_KWARGS)
def canary_events(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """Validated, de-duplicated canary events from `reports/canary/phase-*.jsonl`.

    Reads every canary file from its byte-offset cursor (`ingest_files`), so a run only reads what
    was appended since the last one. Each line is either stored in `canary_events` or quarantined
    in `quarantine` with its file, line number and reason; lines read = loaded + duplicates +
    quarantined, per file. Duplicate `event_id`s count once (the first occurrence wins).

    A canary file that cannot be read (seed §7.4) does not stop the others: a retryable error is
    retried with back-off, and what still fails is recorded in `collector_faults` for this run's
    windows, where the Analyzer escalates it (missing/unreadable: P1 + rollback_required;
    retryable: P2).

    With `retention.canary_events_days` in the policy, events older than that many days before
    the newest stored window are deleted first (`event_retention`; rollout_assets/retention.py).
    """
    policy = home.policy()
    windows = run_windows(context)
    end = windows[-1] + WINDOW
    now = now_utc()
    with warehouse.connect() as con:
        try:
            check_phase_history(con, policy)
        except PolicyError as exc:
            raise dg.Failure(description=str(exc)) from None
        purge = purge_events(con, policy, now, judging=windows[0])
        kept = kept_before(con, policy)
        if purge:
            context.log.info(
                f"retention: deleted {purge.deleted_events} event(s) of windows before "
                f"{purge.purged_before:%Y-%m-%d %H:%M} UTC ({policy.retention.canary_events_days} "
                f"day(s) before the newest stored window, {purge.newest_window:%Y-%m-%d %H:%M})")
        if purge and purge.unjudged_windows:
            context.log.warning(
                f"retention: {purge.unjudged_windows} of those windows had never been judged "
                "(their events arrived after newer ones: run them before newer windows, or "
                "raise retention.canary_events_days, to judge such backfills)")
        for text in describe_rotations(follow_rotations(con, home.home)):
            context.log.warning(text)
        faults, skip = check_canary_files(
            con, home.home,
            on_retry=lambda rel, n, exc: context.log.warning(
                f"canary file {rel}: attempt {n} failed ({describe(exc)}); retrying"))
        stats, late_faults = ingest_isolated(con, home.home, policy, skip, ingest_canary,
                                             archive_paths(con, home.home))
        faults += late_faults
        record_faults(con, policy, windows, end, faults, now)
        counts = dict(con.execute(
            "select window_start, count(*) from canary_events where window_start >= ? "
            "and window_start < ? group by 1", [windows[0], end]
        ).fetchall())
        totals = con.execute(
            "select count(*), (select count(*) from quarantine) from canary_events"
        ).fetchone()
        schema = column_schema(con, "canary_events")
    for f in faults:
        escalation = ("retryable: escalated as P2" if f.retryable
                      else "not retryable: escalated as P1 with rollback_required")
        context.log.error(
            f"collector fault: {f.source_file}: {f.reason} after {f.attempts} attempt(s); "
            f"{escalation} for {len(windows)} window(s)")
    for w in windows:
        context.add_asset_metadata({"events": counts.get(w, 0), "collector_faults": len(faults)},
                                   partition_key=partition_key(w))
    read = sum(s.lines_read for s in stats)
    loaded = sum(s.loaded for s in stats)
    dups = sum(s.duplicates for s in stats)
    quarantined = sum(s.quarantined for s in stats)
    context.log.info(
        f"ingested {len(stats)} file(s): {read} lines read = {loaded} loaded + {dups} duplicates "
        f"+ {quarantined} quarantined"
    )
    on_last_window(context, {
        **({KEPT_BEFORE_KEY: kept.isoformat()} if kept is not None else {}),
        "files": dg.MetadataValue.json([s.as_dict() for s in stats]),
        "collector_fault_details": dg.MetadataValue.json([f.__dict__ for f in faults]),
        "dagster/column_schema": schema,
    })
    return run_totals(context, {
        "lines_read": read, "loaded": loaded, "duplicates": dups, "quarantined": quarantined,
        "stored_events_total": totals[0], "quarantine_total": totals[1],
        "deleted_by_retention": purge.deleted_events if purge else 0,
    })


METADATA_COLUMNS = ("events", "autosave_p95_ms", "autosave_error_count", "restore_success_rate",
                    "merge_auto_success_rate", "merge_conflict_rate", "crash_rate",
                    "excluded_events")
COUNT_COLUMNS = frozenset({"events", "autosave_error_count", "excluded_events"})


def _number(column: str, value) -> int | float:
    return int(value) if column in COUNT_COLUMNS else float(value)


@dg.asset(group_name="collector", deps=[canary_events], **WINDOW_ASSET_KWARGS)
def window_metrics(
    context: dg.AssetExecutionContext, home: HomeResource, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    """Per (window, phase) metrics of judged events: `autosave_p95_ms`, error count, restore,
    merge and crash rates, plus `excluded_events` (seed §4 observed-only traffic, never judged).

    A rate with an empty denominator is NULL, not 100 %. Also exports
    `reports/monitoring/<window>.jsonl`, one line per phase with a fixed schema.
    """
    policy = home.policy()
    with warehouse.connect() as con:
        windows = windows_to_compute(context, con, policy)
        metrics, excl = [], {}
        if windows:
            metrics = compute_window_metrics(con, policy, windows[0], windows[-1], now_utc())
            excl = exclusions_by_window(con, windows[0], windows[-1])
        schema = column_schema(con, "window_metrics")
    files = export_monitoring(home.home, metrics, excl, windows, policy)
    by_window: dict = {}
    for rec in metrics:
        by_window.setdefault(rec["window_start"], []).append(rec)
    for w in windows:
        rows = by_window.get(w, [])
        md: dict = {"phases": ", ".join(r["phase"] for r in rows) or "none"}
        # policy order: the furthest phase (the rollout's stage) writes the unprefixed keys last,
        # so the UI's plots of e.g. `autosave_p95_ms` run across phase changes
        ordered = sorted(rows, key=lambda r: policy.phase_names.index(
            r["phase"]) if r["phase"] in policy.phase_names else -1)
        for rec in ordered:
            for col in METADATA_COLUMNS:
                if rec[col] is not None:
                    md[f"{rec['phase']}/{col}"] = _number(col, rec[col])
        for col in METADATA_COLUMNS:  # the furthest phase's own values only (NULL: no key)
            if ordered and ordered[-1][col] is not None:
                md[col] = _number(col, ordered[-1][col])
        md["dagster/row_count"] = len(rows)  # this window's rows, one per phase with events
        context.add_asset_metadata(md, partition_key=partition_key(w))
    log_events(context, slot_evaluations(policy, "collector", windows, now_utc()))
    on_last_window(context, {"dagster/column_schema": schema})
    return run_totals(context, {
        "rows": len(metrics), "windows": len(windows), "monitoring_files": len(files),
    }, policy_version=policy.version)
