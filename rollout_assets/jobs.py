"""Jobs: the window pipeline (Collector → Analyzer → Reporter) and the rollback job."""


import json

import dagster as dg

from rollout_assets.assets.analyzer import slo_scores, window_verdicts
from rollout_assets.assets.collector import canary_events, window_metrics
from rollout_assets.assets.common import WAREHOUSE_POOL, publish_for_readers
from rollout_assets.assets.dashboard import dashboard, refresh_dashboard
from rollout_assets.assets.governance import incidents, sla_daily
from rollout_assets.assets.reporter import alert_reports, publish_window
from rollout_assets.collect import atomic_write, now_utc
from rollout_assets.flags import current_state, validate_phase
from rollout_assets.governance import (
    SLA_DAYS_KEY,
    days_of_changed_incidents,
    incident_facts,
    sla_days_text,
)
from rollout_assets.incidents import incident_for, refresh_incidents
from rollout_assets.partitions import daily_partitions, window_from_stamp, window_partitions
from rollout_assets.reporting import (
    RETRY_SEP,
    announced_as,
    pagerduty_service,
    resolve_messages,
    rollback_run_key,
    slack_channels,
)
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.resources.notifier import Message, Notifier
from rollout_assets.resources.rollback_runner import RollbackRunner

# `dashboard` is not partitioned: it renders once at the end of each window run or range.
WINDOW_ASSETS = [canary_events, window_metrics, slo_scores, window_verdicts, incidents,
                 alert_reports, dashboard]
DAILY_ASSETS = [sla_daily]

window_job = dg.define_asset_job(
    "rollout_window_job",
    # the SLO checks are evaluated by slo_scores itself (see checks/slo_checks.py)
    selection=dg.AssetSelection.assets(*WINDOW_ASSETS).without_checks(),
    partitions_def=window_partitions,
    description="Collector → Analyzer → Reporter for one window, or a range in a single run.",
)

daily_job = dg.define_asset_job(
    "rollout_daily_job",
    selection=dg.AssetSelection.assets(*DAILY_ASSETS),
    partitions_def=daily_partitions,
    description="Daily SLA rows, daily summaries and the GA gate check.",
)


class RollbackRequest(dg.Config):
    """What the breach sensor asks for: roll `phase` back to `rollback_to` for `window`."""

    window: str  # YYYYMMDDTHHMMZ
    phase: str
    rollback_to: str
    level: str
    failed_slos: list[str]
    retry: int = 0  # the how-manyth retry of a failed attempt (the breach sensor's)


def publish_after_rollback(context, con, home: HomeResource, notifier: Notifier, policy,
                           ws) -> None:
    """What a rollback outcome changes: the incident checklist, the window's alert report (its
    rollback section) and the dashboard. The incidents table is observed with the days whose
    `sla_daily` rows changed (the window's rollbacks, incidents escalated): see
    `sla_refresh_sensor`."""
    before = incident_facts(con)
    refresh_incidents(con, home.home, policy)
    touched = {ws.date()} | days_of_changed_incidents(before, incident_facts(con))
    context.log_event(dg.AssetObservation(
        asset_key=incidents.key, metadata={SLA_DAYS_KEY: sla_days_text(touched)}))
    publish_window(con, home, notifier, ws)
    refresh_dashboard(context, con, home.home, policy)


def send_resolves(con, notifier: Notifier, policy) -> None:
    """The closing notices that waited for this rollback (`reporting.resolve_messages`): after
    its result, as seed §8 orders them."""
    for msg in resolve_messages(con, policy):
        notifier.send(con, msg)


def _closed(con, incident: str | None) -> bool:
    return incident is not None and con.execute(
        "select status = 'closed' from incidents where incident_id = ?",
        [incident]).fetchone() == (True,)


def _not_live(con, policy, flags_phase: str, config: RollbackRequest, incident: str | None,
              ws) -> str | None:
    """Why the breach of `config.phase` at window `ws` is not a live one to roll back (see
    `execute_rollback`), or None when it is."""
    order = policy.phase_names
    if flags_phase not in order:
        return None  # the command says what is wrong with the flag store
    phase = config.phase
    if order.index(flags_phase) <= order.index(config.rollback_to):
        earlier = con.execute(
            "select r.rollback_id from rollbacks r join incidents i on i.incident_id = ? "
            "where r.status = 'succeeded' and r.phase = ? and r.window_start <> ? "
            "and r.window_start >= i.opened_window "
            "and (i.closed_window is null or r.window_start <= i.closed_window) "
            "order by r.window_start limit 1",
            [incident, phase, ws]).fetchone() if incident else None
        return (f"incident {incident} was already rolled back by {earlier[0]}" if earlier else
                f"the flags are at {flags_phase}, not past {config.rollback_to}")
    entered = con.execute(
        "select effective_window from flag_history where to_phase = ? "
        "order by changed_at desc limit 1", [phase]).fetchone()
    if entered and entered[0] is not None and ws <= entered[0]:
        return (f"window {ws:%Y-%m-%d %H:%M} was judged before the flags last moved to {phase} "
                f"(after window {entered[0]:%Y-%m-%d %H:%M}): a breach of an earlier stint")
    return None


@dg.op(pool=WAREHOUSE_POOL, tags={"kind": "rollback"})
def execute_rollback(
    context: dg.OpExecutionContext, config: RollbackRequest, home: HomeResource,
    warehouse: DuckDBWarehouse, rollback_runner: RollbackRunner, notifier: Notifier,
) -> dg.Output:
    """Run the policy's rollback command (argv, no shell, timeout), record it in `rollbacks`,
    attach its exit code and log to the window's alert report, and tell the phase's channel."""
    policy = home.policy()
    validate_phase(policy, config.phase)
    validate_phase(policy, config.rollback_to)
    ws = window_from_stamp(config.window)
    # each attempt is a row of its own (and a log of its own): a retry that succeeds leaves
    # the failed attempts, their exit codes and the P1 they caused on record
    rollback_id = rollback_run_key(ws, config.phase, config.retry)
    # The DuckDB file is closed while the command runs: it opens the flag store itself
    # (released below, after this block).
    with warehouse.connect() as con:
        before = current_state(con, policy)
        incident = incident_for(con, config.phase, ws)
        if con.execute("select 1 from rollbacks where rollback_id = ? and status = 'succeeded'",
                       [rollback_id]).fetchone():
            # Relaunched after its process died once the command had succeeded: the flags have
            # moved and the row is written; only the publishing may be unfinished.
            publish_after_rollback(context, con, home, notifier, policy, ws)
            send_resolves(con, notifier, policy)
            publish_for_readers(context, con, home.home)
            msg = f"rollback {rollback_id} already succeeded; its report and messages are current"
            context.log.info(msg)
            return dg.Output(json.dumps({"already_done": rollback_id}),
                             metadata={"status": "already succeeded"})
        # One breach, one move back, and only of a live breach: the flags must be past the
        # breach's target, and the window judged after they last moved into the breached phase
        # (the newest judged window then, `flag_history.effective_window`). Otherwise it is
        # history: breaches of an incident already rolled back (in any order: windows run out
        # of order, a late file, a backfill) find the flags no further than the target; one
        # from before the phase was promoted again belongs to an earlier stint. A breach after
        # someone promoted the phase again rolls it back again, incident or not (the cooldown
        # holds the promotion back instead, `promotion_gate`). The target is the policy's for
        # the breached phase (seed §3), also when the flags have moved past that phase.
        # A retry after the incident closed, and an attempt interrupted before it recorded its
        # outcome, are handled first.
        # an attempt of this breach (this one relaunched, or an earlier retry) whose run died
        # while its command ran: its row still says 'running', and the flags may have moved
        breach = rollback_run_key(ws, config.phase)
        interrupted = con.execute(
            "select rollback_id, flags_before, dagster_run_id, started_at from rollbacks "
            "where (rollback_id = ? or starts_with(rollback_id, ?)) and status = 'running' "
            "order by started_at limit 1", [breach, breach + RETRY_SEP]).fetchone()
        if config.retry and _closed(con, incident) and not interrupted:
            # the failed attempt's row (exit code, log) stays as it is
            msg = (f"retry {config.retry} of {rollback_id}: incident {incident} closed after "
                   "the failed attempt; the rollback is not run again")
            context.log.info(msg)
            return dg.Output(json.dumps({"skipped": msg}), metadata={"status": "skipped",
                                                                     "incident": incident})
        why = None if interrupted else _not_live(con, policy, before.phase, config, incident,
                                                  ws)
        if why:
            msg = f"{why}; nothing to do"
            con.execute(
                "insert or replace into rollbacks values "
                "(?, ?, ?, ?, 'skipped', '', NULL, ?, NULL, ?, ?, ?, ?, ?, ?)",
                [rollback_id, ws, config.phase, config.rollback_to, msg, before.describe(),
                 before.describe(), context.run_id, policy.version, now_utc(), now_utc()])
            publish_after_rollback(context, con, home, notifier, policy, ws)
            send_resolves(con, notifier, policy)
            publish_for_readers(context, con, home.home)
            context.log.info(msg)
            return dg.Output(json.dumps({"skipped": msg}), metadata={"status": "skipped",
                                                                     "incident": incident})
        # The attempt is on record before the command runs. The command runs in its own
        # session, so it outlives a run killed meanwhile and may move the flags; the next
        # attempt then finds the flags already moved, and this row says from where.
        flags_before = interrupted[1] if interrupted else before.describe()
        started = now_utc()
        if interrupted and interrupted[0] != rollback_id:  # this attempt takes over from it
            con.execute(
                "update rollbacks set status = 'interrupted', finished_at = ?, log_tail = ? "
                "where rollback_id = ?",
                [started, f"its run died while the command ran; {rollback_id} took over",
                 interrupted[0]])
        con.execute(
            "insert or replace into rollbacks values "
            "(?, ?, ?, ?, 'running', ?, NULL, NULL, NULL, ?, NULL, ?, ?, ?, NULL)",
            [rollback_id, ws, config.phase, config.rollback_to,
             " ".join(rollback_runner.argv(policy, config.rollback_to)), flags_before,
             context.run_id, policy.version, started])
    warehouse.release()  # the command opens the file itself
    outcome = rollback_runner.run(policy, config.rollback_to)
    status = "succeeded" if outcome.exit_code == 0 else (
        "timed_out" if outcome.timed_out else "failed")
    attempt = f"retry-{config.retry}" if config.retry else ""
    log_name = "-".join(filter(None, (config.window, config.phase, attempt))) + ".log"
    log_path = home.home.inside(home.home.rollback_log_dir / log_name)
    earlier = (f"# an earlier attempt ({interrupted[0]}, run {interrupted[2]}, started "
               f"{interrupted[3]:%Y-%m-%d %H:%M:%S} UTC) was interrupted before it recorded its "
               f"outcome; the flags were {flags_before} then, {before.describe()} when this "
               "attempt began\n" if interrupted else "")
    atomic_write(log_path, f"{earlier}$ {outcome.command}\n{outcome.output}\n"
                           f"ExitCode={outcome.exit_code}\n")
    with warehouse.connect() as con:
        after = current_state(con, policy)
        con.execute(
            "insert or replace into rollbacks values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [rollback_id, ws, config.phase, config.rollback_to, status, outcome.command,
             outcome.exit_code, (earlier + outcome.log_tail()).strip(),
             home.home.relative(log_path), flags_before, after.describe(), context.run_id,
             policy.version, started, now_utc()],
        )
        publish_after_rollback(context, con, home, notifier, policy, ws)
        text = (f"Rollback {config.phase} → {config.rollback_to} for window {config.window}: "
                f"ExitCode={outcome.exit_code} ({status}); flags now {after.describe()}")
        # a rollback that failed or timed out leaves the breach live: escalate it to P1
        level = config.level if outcome.exit_code == 0 else "P1"
        payload = {"exit_code": outcome.exit_code, "status": status,
                   "rollback_to": config.rollback_to, "command": outcome.command}
        # a retry's outcome is news of its own (the failed attempt's message is in the ledger)
        for ch in slack_channels(policy, config.phase, level, step="rollback"):
            notifier.send(con, Message(ws, config.phase, ch, "rollback", level, text, payload,
                                       incident, about=attempt))
        if outcome.exit_code != 0 and not _closed(con, incident):
            # (a closed incident's page is resolved: #incident is told above, and a trigger now
            # would reopen the page with no resolve to follow)
            pd_channel = f"pagerduty:{pagerduty_service(policy, config.phase)}"
            # an incident renamed by late data is paged under the id it was announced with
            paged_as = announced_as(con, incident).get(pd_channel, incident) if incident else None
            notifier.send(con, Message(
                ws, config.phase, pd_channel, "escalation", "P1", text,
                {**payload, "severity": "critical"}, paged_as,
                about=f"rollback{':' + attempt if attempt else ''}"))
        send_resolves(con, notifier, policy)  # an incident closed before its rollback ran
        publish_for_readers(context, con, home.home)
    context.log.info(text)
    metadata = {
        "command": outcome.command, "exit_code": outcome.exit_code, "status": status,
        "flags_before": flags_before, "flags_after": after.describe(),
        "log": dg.MetadataValue.md(f"```\n{outcome.log_tail(40)}\n```"),
        "seconds": round(outcome.seconds, 3),
    }
    if outcome.exit_code != 0:
        raise dg.Failure(
            description=f"rollback to {config.rollback_to} failed: ExitCode={outcome.exit_code}",
            metadata=metadata,
        )
    notifier.raise_for_failures()  # the rollback ran; an undelivered message still fails
    return dg.Output(json.dumps({"exit_code": outcome.exit_code}), metadata=metadata)


@dg.job(
    description="Rolls the flags back one phase for a breached window (launched by the breach "
                "sensor, run key <window>:<phase>).",
    tags={"team": "release-engineering"},
)
def rollback_job():
    execute_rollback()
