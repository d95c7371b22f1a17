"""Reporter logic: gather a breached window's evidence, render the alert template, and derive the
Slack / PagerDuty messages the policy routes it to."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import jinja2

from rollout_assets.collect import (
    add_banner,
    atomic_write,
    exclusion_case_sql,
    now_utc,
    sql_literal,
)
from rollout_assets.flags import read_state
from rollout_assets.home import RolloutHome
from rollout_assets.incidents import incident_for
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import WINDOW, window_stamp
from rollout_assets.policy import Policy
from rollout_assets.resources.notifier import PAGERDUTY_PREFIX, Message, delivered_sql
from rollout_assets.scoring import max_level

PAGERDUTY_SEVERITY = {"P1": "critical", "P2": "error", "warning": "warning"}


def _env(templates_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown output; Slack text is escaped separately by the transport
        keep_trailing_newline=True,
        trim_blocks=True,
    )


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def value_text(value, threshold) -> str:
    """A value as the alert shows it next to its threshold: never rounded onto the threshold
    (0.99499 must not read "0.995" beside ">= 0.995 ... fail")."""
    text = _fmt(value)
    if (isinstance(value, float) and threshold is not None and value != threshold
            and text == _fmt(threshold)):
        return repr(value)
    return text


RETRY_SEP = ":retry-"


def rollback_run_key(window_start: datetime, phase: str, retry: int = 0) -> str:
    """One breach, one rollback: the sensor's run key for a (window, phase) breach, and the
    `rollbacks.rollback_id` of its attempt; the breach sensor's n-th retry of a failed one is
    `<window>:<phase>:retry-<n>`, a row of its own."""
    key = f"{window_stamp(window_start)}:{phase}"
    return f"{key}{RETRY_SEP}{retry}" if retry else key


def latest_attempts(con, keys: list[str]) -> dict[str, str]:
    """Breach run key (`rollback_run_key` without a retry) -> the status of its latest
    rollback attempt's `rollbacks` row: how its rollback ended, retries included."""
    if not keys:
        return {}
    return dict(con.execute(
        "select k, arg_max(status, started_at) from rollbacks, unnest(?::VARCHAR[]) t(k) "
        "where rollback_id = k or starts_with(rollback_id, k || ?) group by k",
        [keys, RETRY_SEP]).fetchall())


def slack_channels(policy: Policy, phase: str, level: str, step: str | None = None) -> list[str]:
    """The phase's channel, plus `incident_channel` at its levels, or for an incident runbook
    `step` the policy reports there whatever the level (`incident_channel_steps`)."""
    channels = [policy.phase(phase).slack_channel]
    n = policy.notifications
    if level in n.incident_channel_levels or step in n.incident_channel_steps:
        channels.append(n.incident_channel)
    return list(dict.fromkeys(channels))


def pagerduty_service(policy: Policy, phase: str) -> str:
    return policy.pagerduty_services[policy.phase(phase).pagerduty_service].name


def evidence_sql(policy: Policy, ws: datetime, phase: str, metrics: list[str],
                 baseline: float | None) -> str:
    """The exact DuckDB query that reproduces a window's judged metrics from stored events."""
    exprs = []
    for m in metrics:
        spec = METRICS.get(m)
        if spec is None or spec.sql.startswith("--"):
            # burn rates span several windows and the canary-vs-baseline statistics are computed
            # in Python (rollout_assets.compare): their inputs are the per-window metrics above
            continue
        sql = spec.sql
        if "{baseline}" in sql:
            sql = sql.replace("{baseline}", "NULL" if baseline is None else repr(float(baseline)))
        exprs.append(f"  {sql} as {m}")
    return (
        "select\n" + ",\n".join(exprs) + "\nfrom canary_events\n"
        f"where window_start = TIMESTAMP '{ws:%Y-%m-%d %H:%M:%S}' "
        f"and phase = {sql_literal(phase)}\n"
        f"  and {exclusion_case_sql(policy)} is null;"
    )


def alert_context(con, policy: Policy, ws: datetime) -> dict | None:
    """Everything the template needs for one window, or None if nothing in it breached."""
    verdicts = con.execute(
        "select phase, status, level, rollback_required, rollback_to, failed_slos, policy_version "
        "from window_verdicts where window_start = ? and breach order by phase", [ws]
    ).fetchall()
    if not verdicts:
        return None
    phases = []
    for phase, status, level, rb_req, rb_to, failed, pver in verdicts:
        scores = con.execute(
            "select slo, metric, value, comparator, threshold, sample_size, min_sample, status, "
            "shadow, baseline from slo_scores where window_start = ? and phase = ? order by slo",
            [ws, phase],
        ).fetchall()
        excluded = dict(con.execute(
            "select reason, events from window_exclusions where window_start = ? and phase = ? "
            "order by reason", [ws, phase]).fetchall())
        attempts = con.execute(
            "select command, status, exit_code, log_tail, flags_before, flags_after, "
            "rollback_id, log_path from rollbacks where window_start = ? and phase = ? "
            "order by started_at", [ws, phase],
        ).fetchall()
        rb = attempts[-1] if attempts else None  # the latest attempt: how it ended
        score_dicts = [
            dict(slo=s[0], metric=s[1], value=s[2], value_text=value_text(s[2], s[4]),
                 comparator=s[3],
                 threshold=s[4], threshold_text=_fmt(s[4]), sample_size=s[5], min_sample=s[6],
                 status=s[7], shadow=s[8], baseline=s[9])
            for s in scores
        ]
        baseline = next((s["baseline"] for s in score_dicts if s["baseline"] is not None), None)
        incident = incident_for(con, phase, ws)
        continues = announced_as(con, incident) if incident else {}
        page = level in policy.notifications.page_levels
        phases.append(dict(
            phase=phase, title=policy.phase(phase).title if phase in policy.phase_names else "",
            status=status, level=level, rollback_required=rb_req, rollback_to=rb_to,
            failed_slos=list(failed), policy_version=pver, scores=score_dicts, excluded=excluded,
            slack_channels=slack_channels(policy, phase, level), page=page,
            pagerduty_service=pagerduty_service(policy, phase),
            pagerduty_severity=PAGERDUTY_SEVERITY[level] if page else None,
            incident_id=incident, continues=continues,
            dedup_key=incident or f"rollout-{phase}-{window_stamp(ws)}",
            run_key=rollback_run_key(ws, phase),
            rollback=dict(command=rb[0], status=rb[1], exit_code=rb[2], log_tail=rb[3] or "",
                          flags_before=rb[4], flags_after=rb[5]) if rb else None,
            earlier_attempts=[dict(rollback_id=a[6], status=a[1], exit_code=a[2], log=a[7])
                              for a in attempts[:-1] if a[1] != "skipped"],
            evidence_sql=evidence_sql(policy, ws, phase, sorted({s["metric"] for s in score_dicts}),
                                      baseline),
        ))
    state = read_state(con)
    return dict(
        window_start=f"{ws:%Y-%m-%d %H:%M}", window_end=f"{ws + WINDOW:%Y-%m-%d %H:%M}",
        window_stamp=window_stamp(ws), level=max_level([p["level"] for p in phases]),
        # a rollback that failed left the breach live: it was escalated to P1 (#incident and a
        # critical PagerDuty escalation, `jobs.execute_rollback`), as its incident says
        escalated=any((p["rollback"] and p["rollback"]["exit_code"] not in (None, 0))
                      or any(a["exit_code"] not in (None, 0) for a in p["earlier_attempts"])
                      for p in phases),
        policy_label=policy.version_label, policy_version=policy.version,
        flags=dict(phase=state.phase if state else "unknown", flags=state.flags if state else {}),
        phases=phases,
    )


def announced_as(con, incident: str) -> dict[str, str]:
    """Channel -> the id an incident's alert (or RCA draft, in `#incident`) was delivered under
    there before late data renamed it (a breach before its first window moved the start, so
    the id changed): that page and thread stand for it (`withdrawn_messages` resolves it when
    this incident closes)."""
    return dict(con.execute(f"""
        select n.channel, arg_min(n.incident_id, n.window_start)
        from notifications n join incidents i on i.incident_id = $incident
        where n.kind in ('alert', 'rca') and n.phase = i.phase and n.incident_id is not null
            and n.incident_id <> i.incident_id
            and n.incident_id not in (select incident_id from incidents)
            and n.window_start >= i.opened_window
            and n.window_start <= coalesce(i.closed_window, i.last_breach_window)
            and {delivered_sql('n')}
        group by n.channel
    """, {"incident": incident}).fetchall())


def render_alert(home: RolloutHome, ctx: dict) -> Path:
    text = _env(home.templates_dir).get_template("alerts/rollback.md").render(**ctx)
    path = home.inside(home.alerts_dir / f"{ctx['window_stamp']}.md")
    atomic_write(path, text)
    return path


def alert_messages(ctx: dict, ws: datetime, report_rel: str) -> list[Message]:
    """Slack to each routed channel; PagerDuty when the level pages.

    The payload carries what `rollout_assets.messages` renders (Block Kit, Events v2
    `custom_details`): each failed SLO with value vs threshold and sample size, the rollback
    (command and exit code once it ran), the report path, and the PagerDuty dedup key (the
    incident id when the window belongs to an incident)."""
    out = []
    for p in ctx["phases"]:
        failed = [
            {k: s[k] for k in ("slo", "metric", "value", "value_text", "comparator", "threshold",
                               "threshold_text", "sample_size", "min_sample")}
            for s in p["scores"] if s["status"] == "fail" and not s["shadow"]
        ]
        summary = (
            f"[{p['level']}] {p['phase']} breached {', '.join(p['failed_slos'])} in window "
            f"{ctx['window_stamp']}"
            + (f"; rolling back to {p['rollback_to']}" if p["rollback_required"] else "")
        )
        rb = p.get("rollback")
        incident = p.get("incident_id")
        continues = p.get("continues") or {}
        if continues:
            summary += (f" ({incident}, announced as {', '.join(sorted(set(continues.values())))}"
                        " before its first window moved)")
        payload = {
            "window": ctx["window_stamp"], "window_start_text": ctx["window_start"],
            "window_end_text": ctx["window_end"], "phase_title": p.get("title") or "",
            "report": report_rel, "failed": failed, "excluded": p["excluded"],
            "rollback_required": p["rollback_required"], "rollback_to": p["rollback_to"],
            "rollback": {k: rb[k] for k in ("command", "status", "exit_code")} if rb else None,
            "run_key": p["run_key"], "evidence_sql": p["evidence_sql"],
            "service": p["pagerduty_service"], "dedup_key": incident or p["dedup_key"],
        }
        for ch in p["slack_channels"]:
            # an incident announced under the id it had before late data renamed it is told in
            # that thread, not as a new one
            thread_of = {"thread_of": continues[ch]} if ch in continues else {}
            out.append(Message(ws, p["phase"], ch, "alert", p["level"], summary,
                               {**payload, **thread_of}, incident))
        pd_channel = f"{PAGERDUTY_PREFIX}{p['pagerduty_service']}"
        if p["page"] and pd_channel not in continues:  # else the page under the old id stands
            out.append(Message(
                ws, p["phase"], pd_channel, "alert", p["level"], summary,
                {**payload, "severity": p["pagerduty_severity"]}, incident,
            ))
    return out


def _not_delivered(window: str, phase: str, channel: str, kind: str) -> str:
    """SQL: no message of this ledger key has been delivered (the notifier's duplicate test), so
    a Reporter run offers only what is still owed, however many incidents history holds."""
    return (f"not exists (select 1 from notifications d where d.window_start = {window} "
            f"and d.phase = {phase} and d.channel = {channel} and d.kind = '{kind}' "
            f"and {delivered_sql('d')})")


def _cycles() -> str:
    """SQL: per incident and channel, the resolves and reopens delivered. An incident's page
    goes trigger (its alerts), resolve, reopen, resolve, ...: a resolve is owed while it has
    had no more resolves than reopens there, a reopen while it has had fewer."""
    return f"""cycles as (
            select incident_id, channel, count(*) filter (where kind = 'resolve') as resolves,
                count(*) filter (where kind = 'reopen') as reopens
            from notifications d
            where kind in ('resolve', 'reopen') and incident_id is not null
                and {delivered_sql('d')}
            group by all
        )"""


def rca_messages(con, policy: Policy) -> list[Message]:
    """Seed §8 step 4: every incident's RCA draft, owner and due date shared once in
    `incident_channel` (when the policy lists the `rca` step)."""
    if "rca" not in policy.notifications.incident_channel_steps:
        return []
    channel = policy.notifications.incident_channel
    out = []
    for iid, phase, level, opened, path, owner, due in con.execute(
        "select incident_id, phase, level, opened_window, rca_path, owner, rca_due "
        "from incidents i where " + _not_delivered("i.opened_window", "i.phase", "$channel", "rca")
        + " order by opened_window, incident_id", {"channel": channel}
    ).fetchall():
        text = (f"[RCA] {iid} ({level}, {phase}): draft {path}, owner {owner}, due {due} "
                "(one business day)")
        # a renamed incident's draft is told in the thread of the id it was announced under
        was = announced_as(con, iid).get(channel)
        if was:
            text += f"; announced as {was} before its first window moved"
        out.append(Message(opened, phase, channel, "rca", level, text,
                           {"dedup_key": iid, "report": path, **({"thread_of": was} if was
                                                                  else {})},
                           incident_id=iid))
    return out


ROLLBACK_WAIT = timedelta(hours=1)


def resolve_messages(con, policy: Policy, now: datetime | None = None) -> list[Message]:
    """One resolve per channel an incident's alerts went to (Slack threads, the PagerDuty
    service), and `incident_channel` last when the policy lists the `close` step, for every
    closed incident whose resolve there is still owed.

    Seed §8's order is alert, rollback, RCA, close. A range run (a backfill, a catch-up) can
    close an incident before the breach sensor has run its rollback: its resolve waits until the
    rollback is recorded (the rollback run sends it after its result), or `ROLLBACK_WAIT` after
    the close, should no rollback ever come (the breach sensor stopped)."""
    close_step = "close" in policy.notifications.incident_channel_steps
    text = f"[resolved] {{}} closed after {policy.incidents.close_after_green_cycles} green cycles"
    rows = con.execute(f"""
        with ready as (
            select * from incidents i
            where i.status = 'closed' and not (
                i.rollback_required and i.closed_at > $waited
                and not exists (select 1 from rollbacks r where r.phase = i.phase
                    and r.window_start >= coalesce(i.began_window, i.opened_window)
                    and r.window_start <= i.last_breach_window and r.status <> 'running'))
        ), channels as (
            select i.incident_id, i.phase, i.level, i.closed_window, n.channel
            from ready i join notifications n
                on n.incident_id = i.incident_id and (n.kind = 'alert' or (
                    n.kind = 'escalation' and starts_with(n.channel, '{PAGERDUTY_PREFIX}')))
            union
            select incident_id, phase, level, closed_window, $channel
            from ready where $close_step
        ), {_cycles()}
        select c.incident_id, phase, level, closed_window, c.channel,
            coalesce(resolves, 0) + 1 as cycle
        from channels c left join cycles using (incident_id, channel)
        where coalesce(resolves, 0) <= coalesce(reopens, 0)
        order by closed_window, c.incident_id, c.channel = $channel, c.channel
    """, {"channel": policy.notifications.incident_channel, "close_step": close_step,
          "waited": (now or now_utc()) - ROLLBACK_WAIT}).fetchall()
    return [Message(closed, phase, ch, "resolve", level, text.format(iid), {"dedup_key": iid},
                    incident_id=iid, cycle=cycle)
            for iid, phase, level, closed, ch, cycle in rows] + withdrawn_messages(
        con, policy.notifications.incident_channel if close_step else None)


WITHDRAWN = ("> **Withdrawn**: late data re-scored this window and it no longer breaches. The "
             "rollback below ran and stays in force until the phase is promoted again.")


def mark_withdrawn(path: Path) -> None:
    """An alert report whose window no longer breaches but whose rollback ran."""
    add_banner(path, WITHDRAWN)


def withdrawn_messages(con, incident_channel: str | None = None) -> list[Message]:
    """A resolve for every incident that was announced (an alert delivered under its id) and no
    longer exists, on each channel its alerts went to, and on `incident_channel` (the runbook's
    close step) when its RCA or rollback was told there, so its page does not stay open for good:
    at once when late data left no breach of it (`[withdrawn]`); when the incident it became
    closes, if late data moved its first window (a late breach before it, or its first breach
    withdrawn): its page stands for that incident until then."""
    rows = con.execute(f"""
        with {_cycles()}, gone as (
            select n.incident_id, n.phase, n.channel,
                arg_max(n.level, case n.level when 'P1' then 3 when 'P2' then 2 else 1 end)
                    as level,
                min(n.window_start) as first, max(n.window_start) as last,
                coalesce(any_value(c.resolves), 0) + 1 as cycle
            from notifications n left join cycles c using (incident_id, channel)
            where (n.kind = 'alert' or n.channel = $incident_channel)
                and n.incident_id is not null and {delivered_sql('n')}
                and n.incident_id not in (select incident_id from incidents)
                and coalesce(c.resolves, 0) <= coalesce(c.reopens, 0)
            group by n.incident_id, n.phase, n.channel
        )
        select g.incident_id, g.phase, g.level, g.first, g.channel, g.cycle,
            arg_min(i.incident_id, i.opened_window), bool_or(i.status = 'open')
        from gone g left join incidents i on i.phase = g.phase
            and i.opened_window <= g.last
            and coalesce(i.closed_window, i.last_breach_window) >= g.first
        group by all
        order by g.first, g.incident_id, g.channel
    """, {"incident_channel": incident_channel}).fetchall()
    out = []
    for iid, phase, level, first, channel, cycle, successor, still_open in rows:
        if still_open:
            continue  # the page stands for the incident it became, until that one closes
        if successor and channel == incident_channel:
            continue  # its successor's own close notice is there
        text = (f"[resolved] {iid} (continued as {successor}) closed" if successor else
                f"[withdrawn] {iid}: late data re-scored its windows and no breach remains; a "
                "rollback it triggered stays in force until the phase is promoted again")
        out.append(Message(first, phase, channel, "resolve", level, text, {"dedup_key": iid},
                           incident_id=iid, cycle=cycle))
    return out


def reopened_messages(con) -> list[Message]:
    """An incident whose page was resolved (withdrawn, or closed) and whose breach came back
    (more late data): its alerts are already in the ledger, so it is triggered again on each
    channel the resolve went to, once per time it came back."""
    rows = con.execute(f"""
        with {_cycles()}
        select i.incident_id, i.phase, i.level, i.opened_window, c.channel, c.reopens + 1
        from incidents i join cycles c using (incident_id)
        where i.status = 'open' and c.reopens < c.resolves
        order by i.opened_window, i.incident_id, c.channel
    """).fetchall()
    return [Message(opened, phase, channel, "reopen", level,
                    f"[reopened] {iid}: late data made its windows breach again",
                    {"dedup_key": iid}, incident_id=iid, cycle=cycle)
            for iid, phase, level, opened, channel, cycle in rows]
