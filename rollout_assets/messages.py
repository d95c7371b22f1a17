"""Slack Block Kit and PagerDuty Events v2 payloads for a notification `Message`.

Pure functions: the notifier decides where a message goes and how often it is tried; this module
only says what it looks like. Every piece of text that reaches Slack's mrkdwn goes through
`mrkdwn()` so that a phase, SLO name or summary carrying `<!channel>`, `<https://x|y>` or `&`
is shown literally instead of pinging a channel or turning into a link.
"""

from __future__ import annotations

import copy
from typing import Any

from rollout_assets.policy import LEVEL_ORDER

# Slack's control characters in mrkdwn (https://api.slack.com/reference/surfaces/formatting)
_MRKDWN_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))
STATUS_BLOCK_ID = "rollout_status"
PAGERDUTY_SOURCE = "rollout-assets"
PAGERDUTY_ACTIONS = {"alert": "trigger", "escalation": "trigger", "reopen": "trigger",
                     "acknowledge": "acknowledge", "resolve": "resolve"}
LEVEL_EMOJI = {"P1": ":rotating_light:", "P2": ":warning:", "warning": ":large_yellow_circle:"}
HEADER_MAX = 150  # Slack's limit for a header block's text
SECTION_MAX = 3000  # Slack's limit for a section's text
SUMMARY_MAX = 1024  # PagerDuty's limit for payload.summary


def mrkdwn(value: Any) -> str:
    """`value` as text that Slack shows literally: `&`, `<`, `>` become entities."""
    text = "" if value is None else str(value)
    for raw, entity in _MRKDWN_ESCAPES:
        text = text.replace(raw, entity)
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(text: str) -> dict:
    return {"type": "plain_text", "text": _clip(mrkdwn(text), HEADER_MAX), "emoji": True}


def _section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _clip(text, SECTION_MAX)}}


def _context(*parts: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": p} for p in parts if p]}


def status_block(status: str) -> dict:
    """The block `chat.update` rewrites when the incident moves on (breach, rollback, resolve)."""
    return {"type": "context", "block_id": STATUS_BLOCK_ID,
            "elements": [{"type": "mrkdwn", "text": f"*Status:* {mrkdwn(status)}"}]}


def _failed_slo_lines(payload: dict) -> list[str]:
    lines = []
    for s in payload.get("failed") or []:
        lines.append(
            f"• *{mrkdwn(s.get('slo'))}*: `{mrkdwn(s.get('metric'))}` = "
            f"*{mrkdwn(s.get('value_text'))}* vs `{mrkdwn(s.get('comparator'))} "
            f"{mrkdwn(s.get('threshold_text'))}` (sample {mrkdwn(s.get('sample_size'))}, "
            f"min {mrkdwn(s.get('min_sample'))})"
        )
    return lines


def _rollback_line(payload: dict) -> str:
    rb = payload.get("rollback")
    if rb and rb.get("command"):
        return (f"*Rollback* to {mrkdwn(payload.get('rollback_to'))}: `{mrkdwn(rb['command'])}` "
                f"→ ExitCode={mrkdwn(rb.get('exit_code'))} ({mrkdwn(rb.get('status'))})")
    if payload.get("rollback_required"):
        return (f"*Rollback* to {mrkdwn(payload.get('rollback_to'))}: launched by the breach "
                f"sensor (run key `{mrkdwn(payload.get('run_key'))}`); ExitCode follows in the "
                "thread")
    return "*Rollback*: not required by the policy"


def _links(payload: dict, run_url: str | None) -> str:
    parts = []
    if payload.get("report"):
        parts.append(f"Alert report `{mrkdwn(payload['report'])}`")
    if run_url:
        # our own URL (Dagster UI base + run id); escaped like everything else
        parts.append(f"<{mrkdwn(run_url)}|Dagster run>")
    return " · ".join(parts)


def _evidence(payload: dict) -> str:
    """Counts kept out of judgement and the DuckDB query that reproduces the judged numbers."""
    parts = []
    excluded = payload.get("excluded") or {}
    if excluded:
        parts.append("*Excluded from judgement* " + ", ".join(
            f"{mrkdwn(k)}={mrkdwn(v)}" for k, v in sorted(excluded.items())))
    sql = payload.get("evidence_sql")
    if sql:
        parts.append("*Reproduce* (`duckdb data/rollout.duckdb`)\n```" + mrkdwn(sql) + "```")
    return "\n".join(parts)


def slack_message(msg, *, run_url: str | None = None, status: str | None = None) -> dict:
    """`text` (the notification fallback) and Block Kit `blocks` for `msg`."""
    p = msg.payload or {}
    level = msg.level
    title = p.get("phase_title")
    phase = f"{msg.phase} ({title})" if title else msg.phase
    emoji = LEVEL_EMOJI.get(level, ":information_source:")
    blocks: list[dict] = []
    if msg.kind == "alert":
        blocks.append({"type": "header",
                       "text": _plain(f"{emoji} {level} SLO breach: {phase}")})
        window = p.get("window") or ""
        when = f"*Window* {mrkdwn(window)}"
        start, end = p.get("window_start_text"), p.get("window_end_text")
        if start and end:
            if end[:10] == start[:10]:
                end = end[11:]  # same day: "09:00–09:15"
            when = f"*Window* {mrkdwn(start)}–{mrkdwn(end)} UTC ({mrkdwn(window)})"
        blocks.append(_section(f"{mrkdwn(msg.text)}\n{when}"))
        lines = _failed_slo_lines(p)
        if lines:
            blocks.append(_section("*Failed SLOs*\n" + "\n".join(lines)))
        blocks.append(_section(_rollback_line(p)))
        evidence = _evidence(p)
        if evidence:
            blocks.append(_section(evidence))
    elif msg.kind == "rollback":
        code = p.get("exit_code")
        ok = code == 0
        blocks.append({"type": "header", "text": _plain(
            f"{':leftwards_arrow_with_hook:' if ok else ':x:'} Rollback {msg.phase}"
            f"{' → ' + p['rollback_to'] if p.get('rollback_to') else ''}: ExitCode={code}")})
        blocks.append(_section(mrkdwn(msg.text)))
        if p.get("command"):
            blocks.append(_section(f"*Command* `{mrkdwn(p['command'])}` → ExitCode="
                                   f"{mrkdwn(code)} ({mrkdwn(p.get('status'))})"))
    elif msg.kind == "resolve":
        blocks.append({"type": "header", "text": _plain(f":white_check_mark: Resolved: {phase}")})
        blocks.append(_section(mrkdwn(msg.text)))
    elif msg.kind == "escalation":
        blocks.append({"type": "header",
                       "text": _plain(f":sos: {level} escalation: {phase}")})
        blocks.append(_section(mrkdwn(msg.text)))
    elif msg.kind == "rca":
        blocks.append({"type": "header", "text": _plain(f":memo: RCA draft: {phase}")})
        blocks.append(_section(mrkdwn(msg.text)))
    else:
        blocks.append(_section(mrkdwn(msg.text)))
    links = _links(p, run_url)
    ident = []
    if msg.incident_id:
        ident.append(f"Incident `{mrkdwn(msg.incident_id)}`")
    if links or ident:
        blocks.append(_context(*ident, links))
    if status:
        blocks.append(status_block(status))
    return {"text": _clip(mrkdwn(msg.text), SECTION_MAX), "blocks": blocks}


def with_status(body: dict, status: str, level: str | None = None) -> dict:
    """A copy of a posted message (`text` + `blocks`) whose status block says `status`; with
    `level`, an alert's header and text say the thread's worst level when it is worse than the
    one they were posted with (a P2 joined a warning's incident)."""
    out = copy.deepcopy(body)
    blocks = [b for b in out.get("blocks", []) if b.get("block_id") != STATUS_BLOCK_ID]
    blocks.append(status_block(status))
    out["blocks"] = blocks
    header = blocks[0] if blocks and blocks[0].get("type") == "header" else None
    posted = next((lvl for lvl in LEVEL_EMOJI if header and header["text"]["text"].startswith(
        f"{LEVEL_EMOJI[lvl]} {lvl} SLO breach")), None)
    if level in LEVEL_EMOJI and posted and LEVEL_ORDER.index(level) > LEVEL_ORDER.index(posted):
        rest = header["text"]["text"].split(" SLO breach", 1)[1]
        header["text"] = _plain(f"{LEVEL_EMOJI[level]} {level} SLO breach{rest} "
                                f"(was {posted})")
        if out.get("text", "").startswith(f"[{posted}]"):
            out["text"] = f"[{level}, was {posted}]" + out["text"][len(posted) + 2:]
    return out


def pagerduty_action(kind: str) -> str:
    return PAGERDUTY_ACTIONS.get(kind, "trigger")


def pagerduty_event(msg, *, routing_key: str, dedup_key: str, run_url: str | None = None,
                    severity: str | None = None) -> dict:
    """One Events API v2 event. `trigger` carries the summary and metrics; `acknowledge` and
    `resolve` need only the routing and dedup keys."""
    action = pagerduty_action(msg.kind)
    event: dict[str, Any] = {"routing_key": routing_key, "event_action": action,
                             "dedup_key": dedup_key}
    if action != "trigger":
        return event
    p = msg.payload or {}
    details = {
        "window": p.get("window"), "phase": msg.phase, "level": msg.level,
        "failed_slos": {
            s["slo"]: {"metric": s.get("metric"), "value": s.get("value"),
                       "rule": f"{s.get('metric')} {s.get('comparator')} "
                               f"{s.get('threshold_text')}",
                       "sample_size": s.get("sample_size")}
            for s in p.get("failed") or []
        },
        "rollback_required": p.get("rollback_required"), "rollback_to": p.get("rollback_to"),
        "report": p.get("report"), "excluded_events": p.get("excluded"),
        "evidence_sql": p.get("evidence_sql"),
        "incident_id": msg.incident_id,
    }
    if msg.kind == "escalation":
        details["escalation"] = msg.text
    event["payload"] = {
        "summary": _clip(msg.text, SUMMARY_MAX),
        "source": f"{PAGERDUTY_SOURCE}/{msg.phase}",
        "severity": severity or p.get("severity") or "error",
        "timestamp": msg.window_start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "component": msg.phase,
        "group": p.get("service") or "",
        "class": "slo_breach" if msg.kind == "alert" else msg.kind,
        "custom_details": {k: v for k, v in details.items() if v not in (None, {}, "")},
    }
    event["client"] = PAGERDUTY_SOURCE
    if run_url:
        event["client_url"] = run_url
        event["links"] = [{"href": run_url, "text": "Dagster run"}]
    return event


def redact(event: dict) -> dict:
    """The event as the ledger keeps it: everything but the routing key."""
    return {k: v for k, v in event.items() if k != "routing_key"}
