"""Incident lifecycle (seed §8): open on a phase's first breach, attach later breaches, close after
N consecutive green cycles; the checklist timestamps; RCA drafts due one business day later.

The lifecycle is a pure fold over the window verdicts in time order (`fold_incidents`), so it is
recomputed from `window_verdicts` on every run: re-scoring a late window corrects the incidents
instead of leaving a stale state behind. First-recorded facts (RCA created, closed at) are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import get_args

import jinja2

from rollout_assets.collect import add_banner, atomic_write, now_utc, remove_banner
from rollout_assets.home import RolloutHome
from rollout_assets.partitions import window_stamp
from rollout_assets.policy import Policy, Severity
from rollout_assets.scoring import max_level
from rollout_assets.warehouse import transaction

AUTO_START, AUTO_END = "<!-- auto:start -->", "<!-- auto:end -->"
WITHDRAWN_DRAFT = ("> **Withdrawn**: late data re-scored this incident's windows and no breach "
                   "remains; there is no incident to analyse unless a rollback ran.")


@dataclass(frozen=True)
class WindowOutcome:
    """What the verdicts of one window say, across phases."""

    window_start: datetime
    judged: bool  # at least one phase judged (pass or breach)
    breaches: dict[str, tuple[str, tuple[str, ...], bool]] = field(default_factory=dict)
    # phase -> (level, failed_slos, rollback_required)


@dataclass
class Incident:
    incident_id: str
    phase: str
    level: str
    opened_window: datetime
    last_breach_window: datetime
    breach_windows: int = 1
    failed_slos: list[str] = field(default_factory=list)
    rollback_required: bool = False
    green_cycles: int = 0
    closed_window: datetime | None = None
    timeline: list[tuple[datetime, str, str]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "closed" if self.closed_window else "open"


def incident_id(phase: str, window_start: datetime) -> str:
    """Stable and readable: the phase and the first breached window."""
    return f"INC-{window_stamp(window_start)}-{phase}"


def fold_incidents(outcomes: Iterable[WindowOutcome], close_after: int) -> list[Incident]:
    """Replay windows in order. A green cycle is a window with at least one judged verdict and
    no breach in any phase; `close_after` consecutive green cycles close every open incident."""
    incidents: list[Incident] = []
    open_by_phase: dict[str, Incident] = {}
    for w in sorted(outcomes, key=lambda o: o.window_start):
        if w.breaches:
            for phase, (level, failed, rb) in sorted(w.breaches.items()):
                inc = open_by_phase.get(phase)
                if inc is None:
                    inc = Incident(incident_id(phase, w.window_start), phase, level,
                                   w.window_start, w.window_start)
                    incidents.append(inc)
                    open_by_phase[phase] = inc
                    inc.timeline.append((w.window_start, "opened",
                                         f"{level}: {', '.join(failed)}"))
                else:
                    inc.breach_windows += 1
                    inc.last_breach_window = w.window_start
                    inc.level = max_level([inc.level, level])
                    inc.timeline.append((w.window_start, "breach attached",
                                         f"{level}: {', '.join(failed)}"))
                inc.failed_slos = sorted(set(inc.failed_slos) | set(failed))
                inc.rollback_required = inc.rollback_required or rb
            for inc in open_by_phase.values():
                inc.green_cycles = 0
        elif w.judged:
            for phase, inc in list(open_by_phase.items()):
                inc.green_cycles += 1
                inc.timeline.append((w.window_start, "green cycle", f"{inc.green_cycles}"))
                if inc.green_cycles >= close_after:
                    inc.closed_window = w.window_start
                    inc.timeline.append((w.window_start, "closed",
                                         f"after {close_after} green cycles"))
                    del open_by_phase[phase]
    return incidents


def add_business_days(start: date, days: int) -> date:
    d = start
    added = 0
    while added < days:
        d += timedelta(days=1)
        if d.weekday() < 5:
            added += 1
    if days == 0:
        while d.weekday() >= 5:
            d += timedelta(days=1)
    return d


def rca_owner(policy: Policy, phase: str) -> str:
    service = policy.phase(phase).pagerduty_service
    people = policy.incidents.oncall.get(service) or ("unassigned",)
    return people[0]


# ---- storage -----------------------------------------------------------------------------------

def load_outcomes(con, policy: Policy) -> list[WindowOutcome]:
    rows = con.execute(
        "select window_start, phase, status, breach, level, failed_slos, rollback_required "
        "from window_verdicts order by window_start, phase"
    ).fetchall()
    by_window: dict[datetime, WindowOutcome] = {}
    for ws, phase, status, breach, level, failed, rb in rows:
        if phase not in policy.phase_names:
            continue
        o = by_window.setdefault(ws, WindowOutcome(ws, False, {}))
        if status in ("pass", "breach"):
            o = WindowOutcome(ws, True, o.breaches)
            by_window[ws] = o
        if breach:
            o.breaches[phase] = (level, tuple(failed), bool(rb))
    return list(by_window.values())


def _checklist(con, policy: Policy, inc: Incident, since: datetime) -> dict:
    """Seed §8 steps 1–3 from the ledger: alert received, escalation decided, rollback run
    (`since`: the incident's first window, or its predecessor's when it was renamed)."""
    # the first alert of any of its breached windows: a late breach that moved the incident's
    # first window earlier was announced after the windows it now precedes
    alert = con.execute(
        "select min(created_at) from notifications where kind = 'alert' and phase = ? "
        "and window_start >= ? and window_start <= ?",
        [inc.phase, since, inc.last_breach_window]).fetchone()[0]
    if alert is None:
        alert = con.execute(
            "select judged_at from window_verdicts where phase = ? and window_start = ?",
            [inc.phase, inc.opened_window]).fetchone()
        alert = alert[0] if alert else None
    # every attempt (a failed one and its retries): the first says when it was decided and
    # run, the latest how it ended; any failure escalated the incident (seed §8 step 3)
    first, exit_code, failed = con.execute(
        "select min(started_at), arg_max_null(exit_code, started_at), "
        "coalesce(bool_or(exit_code <> 0), false) from rollbacks where phase = ? "
        "and window_start >= ? and window_start <= ? and status <> 'skipped'",
        [inc.phase, since, inc.last_breach_window]).fetchone()
    decided = first if first else (alert if not inc.rollback_required else None)
    late = None
    if alert is not None and decided is not None:
        late = (decided - alert) > timedelta(minutes=policy.incidents.escalation_deadline_minutes)
    return dict(alert_received_at=alert, escalation_decided_at=decided, escalation_late=late,
                rollback_executed_at=first, rollback_exit_code=exit_code,
                rollback_failed=failed)


def _closed_at(recorded: datetime, alert: datetime | None) -> datetime:
    """When the close was recorded, but never before the alert: a range run closes an incident
    in its incidents step, before its Reporter sends the alert of the same incident."""
    return max(recorded, alert) if alert is not None else recorded


INCIDENT_COLUMNS = (
    "incident_id", "phase", "level", "status", "opened_window", "last_breach_window",
    "breach_windows", "failed_slos", "rollback_required", "alert_received_at",
    "escalation_decided_at", "escalation_late", "rollback_executed_at", "rollback_exit_code",
    "rca_path", "rca_created_at", "rca_due", "owner", "green_cycles", "closed_window", "closed_at",
    "policy_version", "updated_at", "began_window",
)


def refresh_incidents(con, home: RolloutHome, policy: Policy,
                      now: datetime | None = None) -> list[dict]:
    """Recompute `incidents` and `incident_timeline` from the verdicts, keep first-recorded
    facts, and write or update each RCA draft. Returns the incident rows."""
    now = now or now_utc()
    incidents = fold_incidents(load_outcomes(con, policy),
                               policy.incidents.close_after_green_cycles)
    previous = {
        r[0]: dict(zip(("phase", "opened_window", "last_breach_window", "rca_due",
                        "rca_created_at", "closed_at", "policy_version", "began_window"),
                       r[1:], strict=True))
        for r in con.execute(
            "select incident_id, phase, opened_window, last_breach_window, rca_due, "
            "rca_created_at, closed_at, policy_version, began_window from incidents"
        ).fetchall()
    }
    renamed = _renamed(previous, incidents)
    rows = []
    for inc in incidents:
        prev = previous.get(inc.incident_id) or previous.get(renamed.get(inc.incident_id), {})
        # a renamed incident's rollback may have run for a window now outside it (its first
        # breach withdrawn by late data): its checklist looks from where it began, kept
        began = min(inc.opened_window, prev.get("began_window") or inc.opened_window,
                    prev.get("opened_window") or inc.opened_window)
        check = _checklist(con, policy, inc, began)
        level = inc.level
        if check.pop("rollback_failed"):
            level = "P1"  # a failed rollback escalates (seed §8 step 3), retried or not
        rca_rel = home.relative(home.rca_dir / f"{inc.incident_id}.md")
        first_seen = prev.get("rca_created_at") or now
        row = dict(
            incident_id=inc.incident_id, phase=inc.phase, level=level, status=inc.status,
            opened_window=inc.opened_window, last_breach_window=inc.last_breach_window,
            breach_windows=inc.breach_windows, failed_slos=inc.failed_slos,
            rollback_required=inc.rollback_required, **check, rca_path=rca_rel,
            rca_created_at=first_seen,
            # one business day after it opened, or after it was first seen when that was
            # later: a backfill finds last week's incidents today, not overdue
            rca_due=add_business_days(max(inc.opened_window.date(), first_seen.date()),
                                      policy.incidents.rca_business_days),
            owner=rca_owner(policy, inc.phase), green_cycles=inc.green_cycles,
            closed_window=inc.closed_window,
            closed_at=_closed_at(prev.get("closed_at") or now, check["alert_received_at"])
            if inc.closed_window else None,
            policy_version=prev.get("policy_version") or policy.version, updated_at=now,
            began_window=began,
        )
        rows.append(row)
    with transaction(con):
        con.execute("delete from incidents")
        con.execute("delete from incident_timeline")
        if rows:
            con.executemany(
                f"insert into incidents ({', '.join(INCIDENT_COLUMNS)}) values "
                f"({', '.join('?' for _ in INCIDENT_COLUMNS)})",
                [[r[c] for c in INCIDENT_COLUMNS] for r in rows],
            )
            con.executemany(
                "insert into incident_timeline values (?, ?, ?, ?)",
                [[inc.incident_id, ws, step, detail]
                 for inc in incidents for ws, step, detail in inc.timeline],
            )
    for gone in sorted(set(previous) - {inc.incident_id for inc in incidents}
                       - set(renamed.values())):
        draft = home.rca_dir / f"{gone}.md"
        if draft.is_file():  # what people wrote stays; the draft says the incident is gone
            add_banner(home.inside(draft), WITHDRAWN_DRAFT)
    for inc, row in zip(incidents, rows, strict=True):
        remove_banner(home.rca_dir / f"{inc.incident_id}.md", WITHDRAWN_DRAFT)  # it is back
        old = renamed.get(inc.incident_id)
        if old is not None:
            was = previous[old]
            _carry_draft(home, old, inc.incident_id, [
                (f"- Due: {was['rca_due']} ", f"- Due: {row['rca_due']} "),
                (f"- Opened by window: {_fmt_ts(was['opened_window'])}",
                 f"- Opened by window: {_fmt_ts(inc.opened_window)}")])
        write_rca(con, home, policy, inc, row)
    return rows


def _renamed(previous: dict[str, dict], incidents: list[Incident]) -> dict[str, str]:
    """{new id: the id it had}: an incident whose id is gone because late data moved its first
    window lives on in the incident of its phase that now holds its windows: earlier (a late
    breach just before it, or joining an earlier one) or later (its first breach withdrawn,
    the next one now first); the earliest such, when several merged."""
    current = {inc.incident_id for inc in incidents}
    out: dict[str, str] = {}
    for old_id, old in sorted(previous.items(), key=lambda kv: kv[1]["opened_window"]):
        if old_id in current:
            continue
        for inc in incidents:
            end = inc.closed_window or inc.last_breach_window
            if (inc.phase == old["phase"] and inc.incident_id not in previous
                    and inc.opened_window <= (old["last_breach_window"] or old["opened_window"])
                    and old["opened_window"] <= end):
                out.setdefault(inc.incident_id, old_id)
                break
    return out


def _carry_draft(home: RolloutHome, old_id: str, new_id: str,
                 head: list[tuple[str, str]]) -> None:
    """The renamed incident keeps its RCA draft, and what people wrote in it, under its new id
    (the generated part is refreshed next, `head` lines written once are updated); a draft
    already under the new id is left alone."""
    old, new = home.rca_dir / f"{old_id}.md", home.rca_dir / f"{new_id}.md"
    if not old.exists() or new.exists():
        return
    text = old.read_text(encoding="utf-8").replace(old_id, new_id)
    for was, now in head:
        text = text.replace(was, now, 1)
    heading = f"# RCA draft: {new_id}\n"
    note = (f"\n> Renamed from {old_id}: its first breached window moved (late data, or "
            "windows re-judged under another policy).\n")
    text = text.replace(heading, heading + note, 1) if heading in text else note + text
    atomic_write(home.inside(new), text)
    old.unlink()


def incident_for(con, phase: str, window_start: datetime) -> str | None:
    """The incident a breached (window, phase) belongs to."""
    row = con.execute(
        "select incident_id from incidents where phase = ? and opened_window <= ? "
        "and last_breach_window >= ? limit 1", [phase, window_start, window_start]).fetchone()
    return row[0] if row else None


# ---- RCA drafts -------------------------------------------------------------------------------

def _rca_env(home: RolloutHome) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(home.templates_dir)),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              keep_trailing_newline=True)


def _rca_auto_section(con, home: RolloutHome, inc: Incident, row: dict) -> str:
    scores = con.execute(
        "select window_start, slo, value, comparator, threshold, sample_size from slo_scores "
        "where phase = ? and window_start >= ? and window_start <= ? and passed = false "
        "order by window_start, slo", [inc.phase, inc.opened_window, inc.last_breach_window]
    ).fetchall()
    rollbacks = con.execute(
        "select window_start, rollback_to, status, exit_code, command, log_tail from rollbacks "
        "where phase = ? and window_start >= ? and window_start <= ? and status <> 'skipped' "
        "order by started_at",
        [inc.phase, inc.opened_window, inc.last_breach_window]).fetchall()
    return _rca_env(home).get_template("rca/auto.md").render(
        inc=inc, row=row, scores=scores, rollbacks=rollbacks, fmt=_fmt_ts)


def _fmt_ts(v) -> str:
    return "-" if v is None else f"{v:%Y-%m-%d %H:%M} UTC" if isinstance(v, datetime) else str(v)


# the header's level line as templates/rca/draft.md writes it
_GENERATED_LEVEL = re.compile(
    "^- Level: (" + "|".join(map(re.escape, get_args(Severity))) + ")$", re.MULTILINE)


def write_rca(con, home: RolloutHome, policy: Policy, inc: Incident, row: dict) -> Path:
    """Create the draft from templates/rca/draft.md; later runs only refresh the generated part
    between the auto markers, so what people wrote in the draft is kept."""
    path = home.inside(home.rca_dir / f"{inc.incident_id}.md")
    auto = f"{AUTO_START}\n{_rca_auto_section(con, home, inc, row)}{AUTO_END}"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if AUTO_START in text and AUTO_END in text:
            head, rest = text.split(AUTO_START, 1)
            _, tail = rest.split(AUTO_END, 1)
            # the header's level as generated follows an escalation; a line a person
            # rewrote ("- Level: P1 (IC call)") no longer matches and is left alone
            head = _GENERATED_LEVEL.sub(f"- Level: {row['level']}", head, count=1)
            new = head + auto + tail
            if new != text:
                atomic_write(path, new)
            return path
    text = _rca_env(home).get_template("rca/draft.md").render(inc=inc, row=row, auto=auto,
                                                              fmt=_fmt_ts)
    atomic_write(path, text)
    return path
