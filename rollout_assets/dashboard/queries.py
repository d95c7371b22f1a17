"""What the dashboard shows, gathered from DuckDB with named queries (no row loops in pandas).

`dashboard_data(con, home, policy)` returns one JSON-serialisable dict: the four seed §8 panels
(AutoSave, Restore, Merge, SLA/SLO) as chart specs whose threshold lines come from the policy, the
per-window metric rows, phase bands, breach / rollback markers, the incident and rollback tables
and the reviewer sign-off checks. Reads only; works on a read-only connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rollout_assets.flags import read_state
from rollout_assets.home import RolloutHome
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import WINDOW
from rollout_assets.policy import Policy
from rollout_assets.warehouse import records

ISO = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Chart:
    """One time-series chart: which window_metrics columns it plots and how."""

    id: str
    title: str
    metrics: tuple[str, ...]
    unit: str  # ms | rate | count | pct
    kind: str = "line"  # line | bar


@dataclass(frozen=True)
class Panel:
    id: str
    title: str
    seed_view: str  # the seed §8 view name
    charts: tuple[Chart, ...]
    approval: str  # the seed §8 approval condition, in English


# Seed §8 "dashboard views": which metrics each view shows. Vocabulary, not policy: every
# threshold drawn on these charts is read from governance/policy.yaml.
PANELS: tuple[Panel, ...] = (
    Panel("autosave", "AutoSave", "AutoSave パネル", (
        Chart("autosave_p95", "AutoSave p95 latency", ("autosave_p95_ms",), "ms"),
        Chart("autosave_errors", "AutoSave errors per window", ("autosave_error_count",),
              "count", "bar"),
    ), "The reviewer checks the SLO lines and thresholds and signs off."),
    Panel("restore", "Restore", "Restore パネル", (
        Chart("restore_success", "Restore success rate", ("restore_success_rate",), "rate"),
    ), "The incident response log matches reports/alerts/*.md."),
    Panel("merge", "Merge", "Merge パネル", (
        Chart("merge_rates", "Merge auto-success and conflict rates",
              ("merge_auto_success_rate", "merge_conflict_rate"), "rate"),
    ), "Matches the Phase B decision memo."),
    Panel("sla", "SLA / SLO", "SLA/SLO 集計", (
        Chart("slo_attainment", "Windows meeting every SLO, per phase (hourly)", ("attainment",),
              "pct"),
    ), "Approved in the governance review (minutes linked)."),
)

METRIC_COLUMNS = (
    "events", "autosave_count", "autosave_p95_ms", "autosave_error_count", "restore_count",
    "restore_success_rate", "merge_count", "merge_auto_success_rate", "merge_conflict_rate",
    "session_count", "crash_rate", "excluded_events",
)

# ---- named queries ------------------------------------------------------------------------
RANGE_SQL = "select min(window_start), max(window_start) from window_metrics"

METRIC_ROWS_SQL = f"""
select strftime(window_start, '{ISO}') as t, phase, {", ".join(METRIC_COLUMNS)}
from window_metrics
where window_start >= ? and window_start < ?
order by window_start, phase
"""

# Phase bands: per window, the furthest phase (in policy order) with traffic — the stage the
# rollout had reached; the baseline phase's traffic runs beside it. Then runs of equal phases
# (gaps and islands); a band spans its first window's start to its last window's end.
PHASE_BANDS_SQL = f"""
with dominant as (
    select window_start, arg_max(phase, list_position(?::VARCHAR[], phase)) as phase
    from window_metrics where window_start >= ? and window_start < ?
    group by window_start
), marked as (
    select *, case when phase is distinct from lag(phase) over (order by window_start)
                   then 1 else 0 end as starts_band
    from dominant
), grouped as (
    select *, sum(starts_band) over (order by window_start) as band from marked
)
select phase, strftime(min(window_start), '{ISO}') as t0,
       strftime(max(window_start) + interval 15 minute, '{ISO}') as t1, count(*) as windows
from grouped group by band, phase order by min(window_start)
"""

FAILED_SCORES_SQL = f"""
select strftime(window_start, '{ISO}') as t, phase, slo, metric, value, comparator, threshold,
       sample_size, severity
from slo_scores
where window_start >= ? and window_start < ? and passed = false and not shadow
order by window_start, phase, slo
"""

BREACHES_SQL = f"""
select strftime(v.window_start, '{ISO}') as t, v.phase, v.level, v.failed_slos,
       v.rollback_required, v.rollback_to,
       (select string_agg(s.slo || ': ' || s.metric || '=' || round(s.value, 4) || ' '
                          || s.comparator || ' ' || s.threshold || ' (n=' || s.sample_size || ')',
                          '; ' order by s.slo)
        from slo_scores s
        where s.window_start = v.window_start and s.phase = v.phase and s.passed = false)
           as evidence,
       a.path as alert_report, r.status as rollback_status, r.exit_code as rollback_exit_code
from window_verdicts v
left join alert_reports a on a.window_start = v.window_start
left join (  -- a breach's latest rollback attempt (a failed one may have been retried)
    select * from rollbacks
    qualify row_number() over (partition by window_start, phase order by started_at desc) = 1
) r on r.window_start = v.window_start and r.phase = v.phase
where v.breach and v.window_start >= ? and v.window_start < ?
order by v.window_start, v.phase
"""

ROLLBACK_REQUIRED_SQL = f"""
select strftime(window_start, '{ISO}') as t, phase, rollback_to
from window_verdicts
where rollback_required and window_start >= ? and window_start < ?
order by window_start, phase
"""

ROLLBACKS_SQL = f"""
select rollback_id, strftime(window_start, '{ISO}') as t, phase, rollback_to, status, exit_code,
       command, log_path, flags_before, flags_after,
       strftime(started_at, '{ISO}') as started_at, strftime(finished_at, '{ISO}') as finished_at,
       dagster_run_id
from rollbacks
where window_start >= ? and window_start < ?
order by window_start, phase, started_at
"""

# Verdict status per phase: judged = pass or breach; attainment = passed / judged.
PHASE_SLA_SQL = """
select v.phase,
       count(*) as windows,
       count(*) filter (where v.status in ('pass', 'breach')) as judged,
       count(*) filter (where v.status = 'pass') as passed,
       count(*) filter (where v.breach) as breaches,
       count(*) filter (where v.status = 'insufficient_data') as insufficient,
       round(count(*) filter (where v.status = 'pass')
             / nullif(count(*) filter (where v.status in ('pass', 'breach')), 0), 4)
           as attainment,
       (select count(distinct r.window_start) from rollbacks r  -- a breach's, not attempts
        where r.phase = v.phase and r.window_start >= ? and r.window_start < ?
          and r.status <> 'skipped') as rollbacks
from window_verdicts v
where v.window_start >= ? and v.window_start < ?
group by v.phase
order by list_position(?, v.phase)
"""

# Window attainment per hour and phase (same definition as PHASE_SLA_SQL), for the SLA chart.
HOURLY_ATTAINMENT_SQL = f"""
select strftime(date_trunc('hour', window_start), '{ISO}') as t, phase,
       count(*) filter (where status in ('pass', 'breach')) as judged,
       count(*) filter (where status = 'pass') as passed,
       round(count(*) filter (where status = 'pass')
             / nullif(count(*) filter (where status in ('pass', 'breach')), 0), 4) as attainment
from window_verdicts
where window_start >= ? and window_start < ?
group by all
order by t, phase
"""

# One row per (phase, SLO): the check results a reviewer signs off on.
CHECK_RESULTS_SQL = """
select phase, slo, metric, comparator, threshold,
       count(*) filter (where passed) as passed,
       count(*) filter (where passed = false) as failed,
       count(*) filter (where passed is null) as not_judged,
       min(value) filter (where passed is not null) as min_value,
       max(value) filter (where passed is not null) as max_value,
       list(distinct policy_version order by policy_version) as policy_versions
from slo_scores
where window_start >= ? and window_start < ?
group by phase, slo, metric, comparator, threshold
order by list_position(?, phase), slo, threshold
"""

# Collector I/O faults (seed §7.4 retryable=true/false), where this warehouse records them.
FAULTS_SQL = f"""
select strftime(window_start, '{ISO}') as t, phase, retryable, reason, attempts, source_file
from collector_faults
where window_start >= ? and window_start < ?
order by window_start, phase, source_file
"""

QUARANTINE_SQL = """
select reason_kind, count(*) as lines from (
    select regexp_replace(reason, '[:(].*$', '') as reason_kind from quarantine)
group by all order by lines desc, reason_kind limit 8
"""

INGEST_SQL = """
select count(*) as files, coalesce(sum(lines_read), 0) as lines_read,
       coalesce(sum(loaded), 0) as loaded, coalesce(sum(duplicates), 0) as duplicates,
       coalesce(sum(quarantined), 0) as quarantined
from ingest_files
"""

TABLE_EXISTS_SQL = """
select column_name from information_schema.columns where table_name = ?
order by ordinal_position
"""

# Incidents (table added by the governance work): the columns shown when present.
INCIDENT_COLUMNS = (
    "incident_id", "phase", "level", "status", "opened_window", "last_breach_window",
    "breach_windows", "failed_slos", "rollback_exit_code", "owner", "rca_path", "rca_due",
    "closed_window", "closed_at",
)


def _columns(con, sql: str, params: list | tuple = ()) -> dict[str, list]:
    """A result as columns (what the chart script wants), not rows."""
    cur = con.execute(sql, list(params))
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    return {c: [r[i] for r in rows] for i, c in enumerate(cols)}


def _jsonable(v):
    if isinstance(v, datetime):
        return v.strftime(ISO)
    if isinstance(v, float) and v != v:
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def table_columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(TABLE_EXISTS_SQL, [table]).fetchall()]


def data_range(con, days: float) -> tuple[datetime, datetime] | None:
    """[start, end): at most `days` up to the end of the latest window with data."""
    first, last = con.execute(RANGE_SQL).fetchone()
    if last is None:
        return None
    end = last + WINDOW
    return max(first, end - timedelta(days=days)), end


def thresholds(policy: Policy, metric: str, bands: list[dict]) -> list[dict]:
    """Every policy rule on `metric`, with the phase bands it is drawn over."""
    out = []
    for phase, rule in policy.all_slos():
        if rule.metric != metric:
            continue
        out.append({
            "phase": phase.name, "slo": rule.name, "comparator": rule.comparator,
            "value": rule.threshold, "severity": rule.severity, "shadow": rule.shadow,
            "label": f"{phase.name} {rule.comparator} {rule.threshold:g}",
            "segments": [[b["t0"], b["t1"]] for b in bands if b["phase"] == phase.name],
        })
    return out


def panel_specs(policy: Policy, bands: list[dict]) -> list[dict]:
    return [{
        "id": p.id, "title": p.title, "seed_view": p.seed_view, "approval": p.approval,
        "charts": [{
            "id": c.id, "title": c.title, "unit": c.unit, "kind": c.kind,
            "series": [{"key": m, "label": m,
                        "description": METRICS[m].description if m in METRICS else m}
                       for m in c.metrics],
            "thresholds": [t for m in c.metrics for t in thresholds(policy, m, bands)],
        } for c in p.charts],
        "channels": panel_channels(policy, p),
    } for p in PANELS]


def panel_channels(policy: Policy, panel: Panel) -> dict:
    """Slack channels and PagerDuty services of the phases that judge this panel's metrics."""
    metrics = {m for c in panel.charts for m in c.metrics}
    phases = [ph for ph, rule in policy.all_slos() if rule.metric in metrics]
    if not phases:  # the SLA panel covers every judged phase
        phases = [ph for ph in policy.phases if ph.slos]
    slack = list(dict.fromkeys(ph.slack_channel for ph in phases))
    pd = list(dict.fromkeys(policy.pagerduty_services[ph.pagerduty_service].name for ph in phases))
    return {"slack": slack, "pagerduty": pd}


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "fail")


def signoff(home: RolloutHome, policy: Policy, checks: list[dict], breaches: list[dict],
            rollbacks: list[dict], required: list[dict], phase_sla: list[dict],
            incidents: dict | None) -> list[dict]:
    """The check results seed §8's approval conditions ask a reviewer to confirm, per panel."""
    def rule_items(metrics: set[str]) -> list[dict]:
        items = []
        for c in checks:
            # burn-rate rules score as "<metric>:burn_<long>m_<short>m": same panel as the metric
            if c["metric"].split(":")[0] not in metrics:
                continue
            judged = c["passed"] + c["failed"]
            items.append({
                "check": f"{c['phase']} {c['slo']}: {c['metric']} {c['comparator']} "
                         f"{c['threshold']:g}",
                "status": _status(None if judged == 0 else c["failed"] == 0),
                "detail": f"{c['passed']} passed, {c['failed']} failed, {c['not_judged']} not "
                          f"judged; policy {', '.join(c['policy_versions'])}",
            })
        return items

    current = {(ph.name, r.name): r.threshold for ph, r in policy.all_slos()}
    drift = [c for c in checks if current.get((c["phase"], c["slo"])) not in (None, c["threshold"])]
    autosave = rule_items({"autosave_p95_ms", "autosave_error_count"})
    autosave.append({
        "check": "threshold lines drawn from governance/policy.yaml "
                 f"{policy.version_label} (version {policy.version})",
        "status": _status(not drift),
        "detail": "every window judged under the thresholds in force now" if not drift else
                  "judged under other thresholds: " + ", ".join(
                      f"{c['phase']} {c['slo']} {c['threshold']:g}" for c in drift),
    })

    missing_reports = [b for b in breaches if not b["alert_report"]
                       or not (home.root / b["alert_report"]).is_file()]
    by_key = {(r["t"], r["phase"]): r for r in rollbacks}  # each breach's latest attempt
    not_rolled = [q for q in required if (q["t"], q["phase"]) not in by_key]
    bad_exit = [r for r in by_key.values() if r["status"] != "skipped" and r["exit_code"] != 0]
    unlogged = []
    for b in breaches:
        rb = by_key.get((b["t"], b["phase"]))
        if rb and rb["status"] != "skipped" and b["alert_report"]:
            path = home.root / b["alert_report"]
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            if f"ExitCode={rb['exit_code']}" not in text:
                unlogged.append(b)
    restore = rule_items({"restore_success_rate"}) + [
        {"check": "every breached window has its alert report in reports/alerts/",
         "status": _status(None if not breaches else not missing_reports),
         "detail": f"{len(breaches) - len(missing_reports)} of {len(breaches)} breached "
                   "(window, phase) have a report on disk"},
        {"check": "every rollback_required verdict has a rollback run",
         "status": _status(None if not required else not not_rolled),
         "detail": f"{len(required) - len(not_rolled)} of {len(required)} handled"
                   + (": missing " + ", ".join(f"{q['t']} {q['phase']}" for q in not_rolled)
                      if not_rolled else "")},
        {"check": "rollback logs record ExitCode=0 (seed §8 step 3)",
         "status": _status(None if not rollbacks else not bad_exit),
         "detail": f"{len(bad_exit)} rollback(s) with a non-zero exit code" if bad_exit else
                   f"{len(rollbacks)} rollback run(s), all ExitCode=0 or attached to an earlier "
                   "one"},
        {"check": "alert reports carry the rollback exit code",
         "status": _status(None if not rollbacks else not unlogged),
         "detail": f"{len(unlogged)} report(s) without their rollback's ExitCode" if unlogged
                   else "each report's rollback section matches the rollbacks table"},
    ]
    merge = rule_items({"merge_auto_success_rate", "merge_conflict_rate"})
    sla = [{
        "check": f"{r['phase']} attainment: {r['passed']} of {r['judged']} judged windows passed",
        "status": _status(None if not r["judged"] else r["breaches"] == 0),
        "detail": f"{r['breaches']} breach(es), {r['rollbacks']} rollback(s), "
                  f"{r['insufficient']} window(s) with too small a sample",
    } for r in phase_sla]
    sla += rule_items({"crash_rate_delta", "crash_rate"})
    if incidents is not None:
        open_n = sum(1 for r in incidents["rows"] if r.get("status") == "open")
        sla.append({"check": "no incident left open", "status": _status(open_n == 0),
                    "detail": f"{len(incidents['rows'])} incident(s), {open_n} open"})
    return [
        {"panel": "AutoSave", "condition": PANELS[0].approval, "items": autosave},
        {"panel": "Restore", "condition": PANELS[1].approval, "items": restore},
        {"panel": "Merge", "condition": PANELS[2].approval, "items": merge},
        {"panel": "SLA / SLO", "condition": PANELS[3].approval, "items": sla},
    ]


def incidents_table(con, start: datetime, end: datetime) -> dict | None:
    """Incidents in range, or None when this warehouse has no `incidents` table."""
    cols = table_columns(con, "incidents")
    if not cols:
        return None
    shown = [c for c in INCIDENT_COLUMNS if c in cols] or cols
    where, params = "", []
    if "opened_window" in cols:
        where, params = "where opened_window >= ? and opened_window < ?", [start, end]
    order = "order by opened_window" if "opened_window" in cols else ""
    rows = records(con, f"select {', '.join(shown)} from incidents {where} {order} limit 200",
                   params)
    return {"columns": shown, "rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}


def dashboard_data(con, home: RolloutHome, policy: Policy, days: float = 7.0,
                   now: datetime | None = None) -> dict:
    """Everything `templates/dashboard/index.html.j2` renders, as plain JSON values."""
    state = read_state(con)
    base = {
        "generated_at": (now or datetime.utcnow()).strftime(ISO),
        "policy": {"version": policy.version, "label": policy.version_label,
                   "mode": policy.effective_mode(), "document_id": policy.document_id},
        "phases": [{"name": p.name, "title": p.title} for p in policy.phases],
        "current": None if state is None else {
            "phase": state.phase, "title": policy.phase(state.phase).title
            if state.phase in policy.phase_names else "", "flags": state.flags,
            "updated_at": state.updated_at.strftime(ISO)},
    }
    rng = data_range(con, days)
    if rng is None:
        return {**base, "range": None, "panels": panel_specs(policy, []), "rows": {},
                "bands": [], "failed_scores": [], "breaches": [], "rollback_required": [],
                "rollbacks": [], "phase_sla": [], "hourly": {}, "checks": [],
                "quarantine": {"by_reason": [], "ingest": None}, "faults": None,
                "incidents": incidents_table(con, datetime.min, datetime.max),
                "signoff": [], "latest": None}
    start, end = rng
    span = [start, end]
    phase_order = list(policy.phase_names)
    bands = records(con, PHASE_BANDS_SQL, [phase_order, *span])
    rows = {k: [_jsonable(x) for x in v]
            for k, v in _columns(con, METRIC_ROWS_SQL, span).items()}
    breaches = [{k: _jsonable(v) for k, v in r.items()}
                for r in records(con, BREACHES_SQL, span)]
    rollbacks = [{k: _jsonable(v) for k, v in r.items()}
                 for r in records(con, ROLLBACKS_SQL, span)]
    required = records(con, ROLLBACK_REQUIRED_SQL, span)
    checks = [{k: _jsonable(v) for k, v in r.items()}
              for r in records(con, CHECK_RESULTS_SQL, [*span, phase_order])]
    phase_sla = records(con, PHASE_SLA_SQL, [*span, *span, phase_order])
    faults = (records(con, FAULTS_SQL, span) if table_columns(con, "collector_faults")
              else None)
    incidents = incidents_table(con, start, end)
    latest = None
    if rows.get("t"):
        last_t = rows["t"][-1]
        latest = {"t": last_t, "phases": [p for t, p in zip(rows["t"], rows["phase"], strict=True)
                                          if t == last_t]}
    return {
        **base,
        "range": {"from": start.strftime(ISO), "to": end.strftime(ISO), "days": days},
        "panels": panel_specs(policy, bands),
        "rows": rows,
        "bands": bands,
        "failed_scores": [{k: _jsonable(v) for k, v in r.items()}
                          for r in records(con, FAILED_SCORES_SQL, span)],
        "breaches": breaches,
        "rollback_required": required,
        "rollbacks": rollbacks,
        "phase_sla": phase_sla,
        "hourly": _columns(con, HOURLY_ATTAINMENT_SQL, span),
        "checks": checks,
        "quarantine": {"by_reason": records(con, QUARANTINE_SQL),
                       "ingest": records(con, INGEST_SQL)[0]},
        "faults": faults,
        "incidents": incidents,
        "signoff": signoff(home, policy, checks, breaches, rollbacks, required, phase_sla,
                           incidents),
        "latest": latest,
    }
