"""Governance: daily SLA rows, the GA gate (seed §3: 5 clean UTC days, 0 major incidents), the
promotion gate of the phase state machine (seed §5), and the record of policy versions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from rollout_assets.collect import atomic_write, now_utc
from rollout_assets.home import RolloutHome
from rollout_assets.policy import Policy, PolicyError
from rollout_assets.warehouse import transaction


def record_policy_version(con, policy: Policy, source: str) -> bool:
    """Record the policy in force the first time it is seen; returns True for a new version."""
    exists = con.execute("select 1 from policy_versions where policy_version = ?",
                         [policy.version]).fetchone()
    if exists:
        return False
    con.execute("insert into policy_versions values (?, ?, ?, ?, ?, ?)",
                [policy.version, policy.content_hash, policy.version_label, now_utc(), source,
                 policy.source_text])
    return True


_PHASE_HISTORY = ("flag_state", "window_verdicts", "incidents", "window_metrics")


def check_phase_history(con, policy: Policy) -> None:
    """Refuse a policy without a phase the warehouse's history uses (the flag store, verdicts,
    incidents, metrics): re-run under it, that phase's stored events were measured but never
    judged, its verdicts and incidents deleted and its SLA rows rewritten, without a word, and
    the flag store pointed at a phase that no longer exists."""
    missing: dict[str, list[str]] = {}
    for table in _PHASE_HISTORY:
        for phase, n in con.execute(f"select phase::VARCHAR, count(*) from {table} "
                                    "group by 1 order by 1").fetchall():
            if phase not in policy.phase_names:
                missing.setdefault(phase, []).append(
                    f"{n} row{'s' * (n != 1)} of {table}" if table != "flag_state"
                    else "the flag store is at it")
    if missing:
        uses = "; ".join(f"{phase!r} ({', '.join(w)})" for phase, w in sorted(missing.items()))
        raise PolicyError(
            f"the policy has no phase {uses}, which the warehouse's history uses: a phase with "
            "history cannot be renamed or removed (its verdicts, incidents and SLA rows would "
            "be lost); put it back, with `slos: []` if it is retired")


# ---- sla_daily -------------------------------------------------------------------------------

SLA_DAILY_SQL = """
with v as (
    select phase, window_start::DATE as day,
        count(*) filter (where status in ('pass', 'breach')) as windows_judged,
        count(*) filter (where status = 'pass') as windows_passed,
        count(*) filter (where breach) as breaches
    from window_verdicts where window_start >= ? and window_start < ? group by all
), m as (
    select phase, window_start::DATE as day, sum(excluded_events) as excluded_events
    from window_metrics where window_start >= ? and window_start < ? group by all
), d as (
    select phase, window_start::DATE as day, sum(events) as drill_events
    from window_exclusions where window_start >= ? and window_start < ?
      and reason in (select unnest(?::VARCHAR[])) group by all
), r as (
    -- breaches rolled back (a failed attempt and its retries are one)
    select phase, window_start::DATE as day, count(distinct window_start) as rollbacks
    from rollbacks where status <> 'skipped' and window_start >= ? and window_start < ?
    group by all
), i as (
    select phase, opened_window::DATE as day, count(*) as incidents,
        count(*) filter (where level = 'P1') as major_incidents
    from incidents where opened_window >= ? and opened_window < ? group by all
), t as (
    select phase, closed_window::DATE as day,
        avg(epoch(closed_window + interval 15 minute - opened_window) / 60) as mttr
    from incidents where closed_window >= ? and closed_window < ? group by all
), s as (
    select phase, window_start::DATE as day, count(*) as shadow_failures
    from slo_scores where shadow and passed = false and window_start >= ? and window_start < ?
    group by all
), k as (  -- a day of a phase with any of these: a rolled-back phase gets no more windows, yet
            -- its incident closes (on another phase's green windows) on a later day
    select phase, day from v union select phase, day from m union select phase, day from r
    union select phase, day from i union select phase, day from t
)
select k.phase, k.day, coalesce(v.windows_judged, 0), coalesce(v.windows_passed, 0),
    v.windows_passed / nullif(v.windows_judged, 0)::DOUBLE as attainment,
    coalesce(v.breaches, 0), coalesce(r.rollbacks, 0), coalesce(i.incidents, 0),
    coalesce(i.major_incidents, 0), t.mttr, coalesce(m.excluded_events, 0),
    coalesce(d.drill_events, 0), coalesce(s.shadow_failures, 0), ?::VARCHAR, ?::TIMESTAMP
from k left join v using (phase, day)
left join m using (phase, day) left join d using (phase, day) left join r using (phase, day)
left join i using (phase, day) left join t using (phase, day) left join s using (phase, day)
order by k.day, k.phase
"""


def incident_facts(con) -> set[tuple]:
    """What `sla_daily` reads of each incident (its phase, level, opening and closing window)."""
    return set(con.execute("select incident_id, phase, level, opened_window, closed_window "
                           "from incidents").fetchall())


def days_of_changed_incidents(before: set[tuple], after: set[tuple]) -> set[date]:
    """The UTC days whose `sla_daily` rows an incident change moves: the days an incident that
    appeared, changed or went away opened or closed on. Windows run out of order (a late file,
    a backfill) regroup incidents that other days' rows count."""
    return {w.date() for row in before ^ after for w in row[3:] if w is not None}


SLA_DAYS_KEY = "sla_days"  # metadata: the UTC days whose `sla_daily` rows a change touched


def sla_days_text(days) -> str:
    """`SLA_DAYS_KEY`'s value: ISO days, sorted, comma-separated."""
    return ",".join(sorted({d.isoformat() for d in days}))


def drill_exclusions(policy: Policy) -> list[str]:
    return [ex.name for ex in policy.exclusions if ex.field == "tags.dry_run"]


def compute_sla_daily(con, policy: Policy, first_day: date, last_day: date,
                      now: datetime | None = None) -> int:
    """Replace `sla_daily` rows for days in [first_day, last_day]."""
    now = now or now_utc()
    lo = datetime.combine(first_day, datetime.min.time())
    hi = datetime.combine(last_day + timedelta(days=1), datetime.min.time())
    params = [lo, hi, lo, hi, lo, hi, drill_exclusions(policy), lo, hi, lo, hi, lo, hi, lo, hi,
              policy.version, now]
    with transaction(con):
        con.execute("delete from sla_daily where day >= ? and day <= ?", [first_day, last_day])
        con.execute("insert into sla_daily " + SLA_DAILY_SQL, params)
    return con.execute("select count(*) from sla_daily where day >= ? and day <= ?",
                       [first_day, last_day]).fetchone()[0]


# ---- GA gate ---------------------------------------------------------------------------------

@dataclass
class GateResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def gate_span(policy: Policy) -> int:
    """How many days one day's gate looks back over (1 without a gate)."""
    gated = next((p for p in policy.phases if p.gate is not None), None)
    return gated.gate.consecutive_days if gated is not None else 1


def days_with_gates(con, policy: Policy, days: list[date]) -> list[date]:
    """`days` and the later days whose gate reads any of them: a day's `sla_daily` rows change
    the gate (and daily summary) of the `consecutive_days - 1` days after it. Later days count
    only when they have rows (a gate is not evaluated ahead of the data)."""
    span = gate_span(policy)
    later = {d + timedelta(days=k) for d in days for k in range(1, span)} - set(days)
    if not later:
        return sorted(days)
    have = {r[0] for r in con.execute(
        "select distinct day from sla_daily where day >= ? and day <= ?",
        [min(later), max(later)]).fetchall()}
    return sorted(set(days) | (later & have))


def ga_gate(con, policy: Policy, day: date) -> GateResult:
    """The gate of the first phase that declares one (B-1): the `consecutive_days` UTC days
    ending at `day` each had every judged window pass, and no major (P1) incident."""
    gated = next((p for p in policy.phases if p.gate is not None), None)
    if gated is None:
        return GateResult(True, [], {"gate": "none"})
    need = gated.gate.consecutive_days
    rows = dict(
        (d, (judged, passed, major)) for d, judged, passed, major in con.execute(
            "select day, sum(windows_judged), sum(windows_passed), sum(major_incidents) "
            "from sla_daily where day > ? and day <= ? group by day",
            [day - timedelta(days=need), day]).fetchall()
    )
    streak = 0
    reasons = []
    for i in range(need):
        d = day - timedelta(days=i)
        judged, passed, major = rows.get(d, (0, 0, 0))
        clean = judged > 0 and passed == judged and major <= gated.gate.max_major_incidents
        if not clean:
            why = ("no judged windows" if judged == 0 else
                   f"{judged - passed} window(s) missed an SLO" if passed != judged else
                   f"{major} major incident(s)")
            reasons.append(f"{d}: {why}")
            break
        streak += 1
    ok = streak >= need
    return GateResult(ok, [] if ok else [f"{gated.name} gate needs {need} clean UTC days; "
                                          f"{streak} so far"] + reasons,
                      {"phase": gated.name, "clean_days": streak, "required_days": need,
                       "day": str(day)})


# ---- promotion gate (phase state machine) ----------------------------------------------------

def promotion_gate(con, policy: Policy, current: str, target: str) -> GateResult:
    """Whether the flags may move from `current` to `target` now, and why not."""
    reasons: list[str] = []
    expected = policy.next_phase(current)
    if target != expected:
        reasons.append(f"the next phase after {current} is {expected or 'none'}, not {target}")
        return GateResult(False, reasons)
    # An open incident blocks promotion, except one of the target phase or a later one that
    # was rolled back: with the flags behind its phase that phase gets no traffic, so it can
    # never see its green cycles (A-0, where an A-1 rollback lands, is not judged at all).
    # Seed §5 restarts from the canary: it stays open and closes on the re-promoted phase's
    # green windows.
    order = {name: i for i, name in enumerate(policy.phase_names)}
    open_inc = con.execute(
        "select incident_id, phase, exists (select 1 from rollbacks r where r.phase = i.phase "
        "and r.status = 'succeeded' "
        "and r.window_start >= coalesce(i.began_window, i.opened_window)) "
        "from incidents i where status = 'open' order by 1").fetchall()
    restarting = [iid for iid, phase, rolled_back in open_inc
                  if rolled_back and order.get(phase, -1) >= order[target]]
    blocking = [iid for iid, _, _ in open_inc if iid not in restarting]
    if blocking:
        reasons.append("open incident(s): " + ", ".join(blocking))
    # No flapping: a phase rolled back is not promoted again until the cooldown has passed in
    # window time (the newest judged window that long after the rolled-back one; a backfill
    # judges hours of windows in minutes). A breach of it while promoted is always rolled
    # back: the rollback job never skips a live breach.
    cooldown = policy.rollback.cooldown_minutes
    rolled_back, newest = con.execute(
        "select (select max(window_start) from rollbacks where status = 'succeeded' "
        "and phase = ?), (select max(window_start) from window_verdicts)",
        [target]).fetchone() if cooldown else (None, None)
    if rolled_back is not None and newest is not None and (
            newest - rolled_back < timedelta(minutes=cooldown)):
        reasons.append(
            f"{target} was rolled back for window {rolled_back:%Y-%m-%d %H:%M} and the newest "
            f"judged window is {newest:%Y-%m-%d %H:%M}: rollback.cooldown_minutes holds its "
            f"promotion back until a window {cooldown} minutes after it is judged")
    last_change = con.execute(
        "select effective_window from flag_history order by changed_at desc limit 1").fetchone()
    # NULL: the change came before any judged window (every window of the phase is after it)
    changed_in = last_change[0] if last_change else None
    since = changed_in or datetime(1970, 1, 1)
    need = policy.promotion.min_green_windows
    details: dict = {"since_window": str(since), "required_green_windows": need}
    if restarting:
        details["restarting_from_the_canary"] = restarting
    if policy.phase(current).slos and need:
        statuses = [r[0] for r in con.execute(
            "select status from window_verdicts where phase = ? and window_start > ? "
            "and status in ('pass', 'breach') order by window_start desc", [current, since]
        ).fetchall()]
        green = 0
        for st in statuses:
            if st != "pass":
                break
            green += 1
        details["green_windows"] = green
        if green < need:
            when = (f"{changed_in:%Y-%m-%d %H:%M}" if changed_in
                    else "made before any judged window")
            reasons.append(
                f"{current} needs {need} consecutive green judged windows since the last flag "
                f"change ({when}); it has {green}")
    gated = policy.phase(target).gate
    if gated is not None:
        day = con.execute("select max(day) from sla_daily").fetchone()[0]
        if day is None:
            reasons.append(f"{target} gate: no sla_daily rows yet")
        else:
            g = ga_gate(con, policy, day)
            details["ga_gate"] = g.details
            details["ga_gate_day"] = day  # the last day with data: say which evidence held
            reasons.extend(g.reasons)
    return GateResult(not reasons, reasons, details)


# ---- daily summary (seed §4 footnotes) -------------------------------------------------------

def write_daily_summary(con, home: RolloutHome, policy: Policy, day: date) -> str | None:
    rows = con.execute(
        "select phase, windows_judged, windows_passed, attainment, breaches, rollbacks, incidents, "
        "mean_time_to_restore_minutes, excluded_events, drill_events, shadow_failures "
        "from sla_daily where day = ? order by phase", [day]).fetchall()
    if not rows:
        return None
    excl = con.execute(
        "select reason, sum(events) from window_exclusions where window_start::DATE = ? "
        "group by reason order by reason", [day]).fetchall()
    lines = [f"# Daily SLA summary {day} (UTC)", "",
             f"Policy version `{policy.version}` ({policy.version_label}).", "",
             "| phase | judged | passed | attainment | breaches | rollbacks | incidents | MTTR min "
             "| excluded¹ | shadow fails |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ph, j, p, att, b, rb, inc, mttr, ex, _drill, sh in rows:
        lines.append(
            f"| {ph} | {j} | {p} | {'-' if att is None else f'{att:.1%}'} | {b} | {rb} | {inc} | "
            f"{'-' if mttr is None else f'{mttr:.0f}'} | {ex} | {sh} |")
    lines += ["", "¹ Stored and counted, never judged (seed §4): "
              + (", ".join(f"{r}={n}" for r, n in excl) if excl else "none") + "."]
    drills = sum(r[9] for r in rows)
    if drills:
        lines.append(f"² Drill traffic (`dry_run=true`): {drills} events, excluded from judgement.")
    g = ga_gate(con, policy, day)
    lines += ["", f"GA gate on {day}: {'OPEN' if g.ok else 'closed'}"
              + ("" if g.ok else " (" + "; ".join(g.reasons) + ")")]
    path = home.inside(home.root / "reports" / "daily" / f"{day:%Y%m%d}.md")
    atomic_write(path, "\n".join(lines) + "\n")
    return home.relative(path)
