"""`rollout`: simulate canary traffic, run windows through Dagster, manage flags, open the UI.

Exit code 0 on success; non-zero with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rollout_assets.home import InstanceOfAnotherHome, RolloutHome
from rollout_assets.startup import paused_gc

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def _policy(home: RolloutHome):
    from rollout_assets.policy import PolicyError, load_policy

    try:
        return load_policy(home.policy_path)
    except PolicyError as exc:
        raise CliError(str(exc)) from None


def _time(text: str, flag: str) -> datetime:
    from rollout_assets.partitions import parse_cli_time

    try:
        return parse_cli_time(text)
    except ValueError:
        raise CliError(f"{flag}: not an ISO-8601 time: {text!r}") from None
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first representable time
        raise CliError(f"{flag}: out of range: {text!r}") from None


# ---- simulate ---------------------------------------------------------------------------------
MAX_SIMULATE_HOURS = 24 * 366
MAX_SIMULATE_EVENTS = 5_000_000  # held in memory at once (benchmarks/generate.py: any volume)


def _check_volume(hours: float, rate: float) -> None:
    if not (math.isfinite(hours) and math.isfinite(rate)) or hours <= 0 or rate <= 0:
        raise CliError("--hours and --rate must be positive")
    if hours > MAX_SIMULATE_HOURS:
        raise CliError(f"--hours: at most {MAX_SIMULATE_HOURS} (a year) at a time")
    if hours * 60 * rate > MAX_SIMULATE_EVENTS:
        raise CliError(f"at most {MAX_SIMULATE_EVENTS:,} events at a time (--hours x 60 x "
                       "--rate): simulate in several steps, or use benchmarks/generate.py")


def cmd_simulate(args, home: RolloutHome) -> int:
    from rollout_assets.simulate import DrillRefused, simulate

    policy = _policy(home)
    _check_volume(args.hours, args.rate)
    if args.simulate_latency is not None and not (
            math.isfinite(args.simulate_latency) and args.simulate_latency >= 0):
        raise CliError("--simulate-latency must be a number of milliseconds >= 0")
    if args.phase and args.phase not in policy.phase_names:
        raise CliError(f"--phase: unknown phase {args.phase!r}")
    try:
        res = simulate(home, policy, _time(args.start, "--start"), args.hours, rate=args.rate,
                       seed=args.seed, breach_metric=args.simulate_breach,
                       breach_phase=args.breach_phase, latency_ms=args.simulate_latency or 0.0,
                       only_phase=args.phase, noise=not args.no_noise,
                       progress=lambda ph, s, e, n: print(
                           f"  {ph}: {s:%Y-%m-%d %H:%M}..{e:%H:%M} UTC, {n} events", flush=True))
    except DrillRefused as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OverflowError:
        raise CliError(f"--start {args.start} plus --hours {args.hours:g}: past the last time "
                       "Python can hold (year 9999)") from None
    for path, n in res.files.items():
        print(f"wrote {n} lines to {path}")
    print(f"{res.events} events, {res.duplicates} duplicate deliveries, {res.malformed} malformed "
          "lines")
    if res.breach:
        b = res.breach
        print(f"injected breach: {b['metric']} in {b['phase']} from {b['from']} to {b['to']}")
    return 0


def _publish_for_readers(con, home: RolloutHome) -> None:
    """A command that changed tables refreshes the SQL readers' copy as runs do."""
    from rollout_assets.warehouse import READERS_COPY_BY_CALLER_ENV, refresh_reader_copy

    if os.environ.get(READERS_COPY_BY_CALLER_ENV):  # the rollback job's command: it writes it
        return
    refresh_reader_copy(con, home.reader_db_path,
                        lambda msg: print(f"rollout: warning: {msg}", file=sys.stderr))


# ---- run --------------------------------------------------------------------------------------
def _verdict_summary(home: RolloutHome, start: datetime, end: datetime) -> list[str]:
    from rollout_assets.reporting import RETRY_SEP
    from rollout_assets.warehouse import connect

    con = connect(home.db_path, read_only=True)
    try:
        judged, breaches, levels = con.execute(
            "select count(*) filter (where status in ('pass', 'breach')), "
            "count(*) filter (where breach), "
            "string_agg(distinct level, ',') filter (where breach) "
            "from window_verdicts where window_start >= ? and window_start < ?", [start, end]
        ).fetchone()
        passed, failed, not_judged = con.execute(
            "select count(*) filter (where passed), count(*) filter (where not passed), "
            "count(*) filter (where passed is null) from slo_scores "
            "where window_start >= ? and window_start < ?", [start, end]
        ).fetchone()
        windows = con.execute(
            "select count(distinct window_start) from window_metrics "
            "where window_start >= ? and window_start < ?", [start, end]).fetchone()[0]
        lines = [
            f"windows with events: {windows}; (window, phase) verdicts judged: {judged}",
            f"SLO scores: {passed} passed, {failed} failed, {not_judged} not judged "
            "(sample below minimum or no data)",
            f"breaches: {breaches}" + (f" (levels {levels})" if breaches else ""),
        ]
        for ws, phase, failed_slos, level, to in con.execute(
            "select window_start, phase, failed_slos, level, rollback_to from window_verdicts "
            "where breach and window_start >= ? and window_start < ? order by 1, 2 limit 12",
            [start, end]
        ).fetchall():
            lines.append(f"  {ws:%Y-%m-%d %H:%M} {phase} {level} failed={','.join(failed_slos)}"
                         + (f" rollback_to={to}" if to else ""))
        for iid, level, status, n, due, owner in con.execute(
            "select incident_id, level, status, breach_windows, rca_due, owner from incidents "
            "where opened_window >= ? and opened_window < ? order by 1", [start, end]
        ).fetchall():
            lines.append(f"incident {iid}: {level}, {status}, {n} breached window(s); RCA draft "
                         f"reports/rca/{iid}.md owned by {owner}, due {due}")
        for rid, ws, phase, to, status, code in con.execute(
            "select rollback_id, window_start, phase, rollback_to, status, exit_code "
            "from rollbacks where window_start >= ? and window_start < ? "
            "order by window_start, phase, started_at", [start, end]
        ).fetchall():
            outcome = f"ExitCode={code}" if code is not None else "command not run again"
            retry = rid.partition(RETRY_SEP)[2]
            lines.append(f"rollback {ws:%Y-%m-%d %H:%M} {phase} -> {to}"
                         f"{f' (retry {retry})' if retry else ''}: {status}, {outcome}")
        return lines
    finally:
        con.close()


def _latest_attempts(home: RolloutHome, keys: list[str]) -> dict[str, str]:
    from rollout_assets.reporting import latest_attempts
    from rollout_assets.warehouse import connect

    if not keys or not home.db_path.exists():
        return {}
    con = connect(home.db_path, read_only=True)
    try:
        return latest_attempts(con, keys)
    finally:
        con.close()


def _failed_rollbacks(home: RolloutHome, rollbacks: list) -> list:
    """The rollback runs (`RollbackRun`s of one command) of the breaches whose rollback did not
    end well. A breach's outcome is its latest attempt's row (a retry may have succeeded, or
    been skipped once its incident closed, leaving the failed attempt the last word; `run`
    printed that retry's success and exited 0, then 1 on the same run again), else, when the
    attempt left no row, its run's."""
    from rollout_assets.reporting import RETRY_SEP

    latest = {}
    for rb in rollbacks:
        latest[rb.run_key.split(RETRY_SEP)[0]] = rb
    outcome = _latest_attempts(home, list(latest))
    return [rb for key, rb in latest.items()
            if outcome.get(key, "succeeded" if rb.success else "failed")
            not in ("succeeded", "skipped")]


def cmd_run(args, home: RolloutHome) -> int:
    with paused_gc():  # Dagster's import: see rollout_assets/startup.py
        from rollout_assets.runner import BadRange, RunError, run_range

    _policy(home)
    start, end = _time(args.from_, "--from"), _time(args.to, "--to")
    if end <= start:
        raise CliError("--to must be after --from")
    try:
        summary = run_range(home, start, end, log=lambda m: print(m, flush=True), progress=True)
    except BadRange as exc:
        raise CliError(str(exc)) from None
    except RunError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    print(f"run {summary.run_id}: {len(summary.windows)} window(s) materialized")
    for rb in summary.rollbacks:
        state = ("succeeded" if rb.success else "FAILED") + (
            " (handled by an earlier run)" if rb.skipped else "")
        print(f"rollback_job run {rb.run_id[:8]} for {rb.run_key}: {state} (what it did: the "
              "rollback lines below)")
    for line in _verdict_summary(home, start, end):
        print(line)
    failed = _failed_rollbacks(home, summary.rollbacks)
    if failed:
        raise CliError("rollback failed for " + ", ".join(rb.run_key for rb in failed)
                       + ": see `rollbacks`, reports/rollbacks/ and the runs in the Dagster UI",
                       EXIT_FAILED)
    return 0


# ---- flags ------------------------------------------------------------------------------------
def cmd_flags(args, home: RolloutHome) -> int:
    from rollout_assets import flags
    from rollout_assets.governance import check_phase_history
    from rollout_assets.policy import PolicyError
    from rollout_assets.warehouse import connect

    policy = _policy(home)
    if getattr(args, "force", False) and not (args.reason or "").strip():
        raise CliError("--force needs --reason: an override of the gate is recorded with why")
    try:
        if args.flags_cmd in ("rollback", "promote"):
            flags.validate_phase(policy, args.phase)
        if args.flags_cmd == "rollback" and args.dry_run:
            flags.refuse_drill(policy)
    except flags.FlagError as exc:
        raise CliError(str(exc)) from None
    if args.flags_cmd != "promote" and not home.db_path.exists():
        # an on-call in the wrong directory must not be told "nothing to roll back"
        raise CliError(f"no warehouse at {home.db_path}: not a rollout home yet (check --home "
                       "/ ROLLOUT_HOME; `rollout run` or `rollout demo` starts one)")
    con = connect(home.db_path)
    try:
        check_phase_history(con, policy)
        if args.flags_cmd == "show":
            state = flags.current_state(con, policy)
            print(f"phase: {state.phase} ({policy.phase(state.phase).title})")
            for k, v in state.flags.items():
                print(f"{k}: {str(v).lower() if isinstance(v, bool) else v}")
            print(f"updated_at: {state.updated_at:%Y-%m-%dT%H:%M:%SZ}")
            for row in con.execute(
                "select changed_at, action, from_phase, to_phase, reason from flag_history "
                "order by changed_at desc limit 5").fetchall():
                print(f"  {row[0]:%Y-%m-%d %H:%M:%S} {row[1]}: {row[2] or '-'} -> {row[3]}"
                      + (f" ({row[4]})" if row[4] else ""))
            return 0
        if args.flags_cmd == "rollback":
            if args.dry_run:
                state = flags.current_state(con, policy)
                path = flags.write_rehearsal(home, policy, state, args.phase,
                                             reason=args.reason, actor=args.actor)
                nothing = flags.nothing_to_roll_back(policy, state, args.phase)
                outcome = (f"would change nothing ({nothing})" if nothing
                           else f"would move them to {args.phase}")
                print(f"dry run: flags unchanged at {state.phase}; the real rollback {outcome}; "
                      f"drill recorded in {path}")
                return 0
            _, _, msg = flags.rollback(con, policy, args.phase, reason=args.reason,
                                       actor=args.actor)
        else:
            _, _, msg = flags.promote(con, policy, args.phase, reason=args.reason,
                                      actor=args.actor, force=args.force)
        print(msg)
        _publish_for_readers(con, home)  # a rollback by hand is the on-call's usual one
        return 0
    except (flags.FlagError, PolicyError) as exc:
        raise CliError(str(exc)) from None
    finally:
        con.close()


# ---- files ------------------------------------------------------------------------------------
def cmd_files(args, home: RolloutHome) -> int:
    from rollout_assets.collect import now_utc
    from rollout_assets.collector_faults import ForgetError, forget_file
    from rollout_assets.warehouse import connect

    if not home.db_path.exists():
        raise CliError(f"no warehouse at {home.db_path}: run `rollout run` first")
    con = connect(home.db_path)
    try:
        if args.files_cmd == "forget":
            try:
                print(forget_file(con, home, args.path, args.reason or "", args.actor,
                                  now_utc()))
            except ForgetError as exc:
                raise CliError(str(exc)) from None
            _publish_for_readers(con, home)
            return 0
        rows = con.execute("select source_file, byte_offset, lines_read, loaded, duplicates, "
                           "quarantined, updated_at, rotated_from from ingest_files "
                           "order by 1").fetchall()
        print(f"{len(rows)} canary file(s) read")
        for rel, offset, lines, loaded, dups, quarantined, at, rotated_from in rows:
            path = home.root / rel
            if path.is_file():
                state = f"{offset} of {path.stat().st_size} bytes read"
            elif rotated_from:
                state = "gone (an archive: no fault)"
            else:
                state = ("GONE: a P1 collector fault until it is back (`rollout files forget "
                         f"{rel} --reason ...` if it was retired)")
            if rotated_from:
                state += f"; rotated from {rotated_from}"
            print(f"  {rel}: {state}\n    {lines} lines: {loaded} loaded, {dups} duplicates, "
                  f"{quarantined} quarantined; last read {at:%Y-%m-%d %H:%M:%S} UTC")
        for rel, reason, actor, at in con.execute(
                "select source_file, reason, actor, forgotten_at from forgotten_files "
                "order by forgotten_at").fetchall():
            print(f"  {rel}: forgotten {at:%Y-%m-%d %H:%M:%S} UTC by {actor} ({reason})")
        return 0
    finally:
        con.close()


# ---- replay -----------------------------------------------------------------------------------
def cmd_replay(args, home: RolloutHome) -> int:
    from rollout_assets.governance import check_phase_history
    from rollout_assets.policy import PolicyError, load_policy
    from rollout_assets.replay import describe, replay
    from rollout_assets.retention import kept_before
    from rollout_assets.warehouse import connect

    try:
        candidate = load_policy(Path(args.policy))
    except PolicyError as exc:
        raise CliError(str(exc)) from None
    start, end = _time(args.from_, "--from"), _time(args.to, "--to")
    if end <= start:
        raise CliError("--to must be after --from")
    if not home.db_path.exists():
        raise CliError(f"no warehouse at {home.db_path}: run `rollout run` first")
    con = connect(home.db_path)
    try:
        try:  # as `run` and `flags` refuse it: a candidate that drops a phase with verdicts
            check_phase_history(con, candidate)  # said "0 would change" for all of them
        except PolicyError as exc:
            raise CliError(f"candidate {args.policy}: {exc}") from None
        kept = kept_before(con, candidate)
        if kept is not None and end <= kept:
            raise CliError(f"every window in the range is kept as it was: the events of windows "
                           f"before {kept:%Y-%m-%dT%H:%MZ}, or the history their verdicts read, "
                           "were deleted by retention (retention.canary_events_days)")
        if kept is not None and start < kept:
            print(f"windows before {kept:%Y-%m-%dT%H:%MZ} are not replayed: their events were "
                  "deleted by retention")
            start = kept
        replay_id, diffs, compared = replay(con, candidate, start, end)
        if diffs:  # stored in replay_diffs
            _publish_for_readers(con, home)
    finally:
        con.close()
    print(f"{replay_id}: candidate policy {candidate.version} ({candidate.version_label}) over "
          f"{compared} (window, phase) verdicts; {len(diffs)} would change")
    for d in diffs:
        print("  " + describe(d))
    new = sum(1 for d in diffs if d.kind == "new breach")
    gone = sum(1 for d in diffs if d.kind == "no longer a breach")
    rollbacks = sum(1 for d in diffs if d.candidate.rollback_required
                    and not (d.production and d.production[2]))
    fewer = sum(1 for d in diffs if d.production and d.production[2]
                and not d.candidate.rollback_required)
    print(f"new breaches: {new}; breaches that would disappear: {gone}; extra rollbacks: "
          f"{rollbacks}; rollbacks that would not run: {fewer}. Stored in replay_diffs "
          f"(replay_id = '{replay_id}'); production tables unchanged, nothing sent.")
    return 0


# ---- demo -------------------------------------------------------------------------------------
DEMO_OUTPUTS = ("data/rollout.duckdb", "data/rollout.duckdb.wal", "data/rollout-read.duckdb",
                "data/rollout-read.duckdb.wal", "reports/canary",
                "reports/monitoring", "reports/alerts", "reports/outbox", "reports/rollbacks",
                "reports/rca", "docs/rehearsal")


DEMO_MARKER = "data/.rollout-demo"  # the home's data was made by `rollout demo`


def not_demo_outputs(home: RolloutHome) -> list[str]:
    """What the demo would remove that it did not make: a home with data but no demo marker
    (a real rollout's warehouse and canary files must never go to a mistyped `demo`)."""
    if (home.root / DEMO_MARKER).is_file():
        return []
    return [rel for rel in DEMO_OUTPUTS if (home.root / rel).is_file() or (
        (home.root / rel).is_dir() and any((home.root / rel).iterdir()))]


def reset_demo_home(home: RolloutHome) -> None:
    for rel in DEMO_OUTPUTS:
        p = home.inside(home.root / rel)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if home.dagster_home.resolve().parent == home.root:
        shutil.rmtree(home.dagster_home, ignore_errors=True)
    marker = home.inside(home.root / DEMO_MARKER)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by rollout demo: the next demo may reset this home\n")


def cmd_demo(args, home: RolloutHome) -> int:
    import time

    with paused_gc():
        from rollout_assets import flags
        from rollout_assets.runner import RunError, run_range
        from rollout_assets.simulate import DrillRefused, phase_schedule, plan, simulate
        from rollout_assets.warehouse import connect

    t0 = time.monotonic()
    policy = _policy(home)
    _check_volume(24, args.rate)
    if policy.effective_mode() == "production" or not args.breach:
        # a demo always injects a breach and rolls back: a drill, whatever `--breach` says
        raise CliError("rollout demo is a drill (it injects a breach and rolls back): refused "
                       "in production mode (policy mode or ROLLOUT_MODE=production)"
                       if policy.effective_mode() == "production" else
                       "--breach: name the metric the demo breaks (e.g. restore_success_rate)")
    start = (datetime.now(UTC).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
             - timedelta(days=1))
    if args.start:
        start = _time(args.start, "--start")
    if start > datetime(9999, 12, 30):  # its day and the windows after it must exist
        raise CliError(f"--start {args.start}: past the last day Python can hold (year 9999)")
    # everything that could refuse the demo is asked before it resets the home
    try:
        plan(policy, start, 24, args.breach, args.breach_phase)
    except DrillRefused:
        raise CliError("rollout demo is a drill (it injects a breach and rolls back): refused "
                       "in production mode (policy mode or ROLLOUT_MODE=production)") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    foreign = not_demo_outputs(home)
    if foreign:
        raise CliError(f"{home.root} holds data rollout demo did not make ({', '.join(foreign)}) "
                       "and the demo starts by removing it: run it in an empty directory "
                       "(--home DIR), or remove them first")
    instance = home.dagster_home
    if instance.resolve().parent != home.root and (instance / "history").exists():
        # the demo starts the warehouse afresh; runs an outside instance keeps would count its
        # new breaches as handled by their run keys (`<window>:<phase>`): no rollback at all
        raise CliError(f"the Dagster instance {instance} (DAGSTER_HOME) is outside the home and "
                       "holds earlier runs, whose run keys would count the demo's breaches as "
                       "handled: unset DAGSTER_HOME (the demo then starts <home>/.dagster "
                       "afresh too) or point it at an empty directory")
    print(f"rollout demo in {home.root}")
    reset_demo_home(home)
    sim = simulate(home, policy, start, 24, rate=args.rate, seed=args.seed,
                   breach_metric=args.breach, breach_phase=args.breach_phase)
    print(f"simulated {sim.events} events over 24 h from {start:%Y-%m-%d %H:%M} UTC "
          f"({sim.duplicates} duplicate deliveries, {sim.malformed} malformed lines); injected "
          f"{sim.breach['metric']} breach in {sim.breach['phase']} "
          f"{sim.breach['from']}..{sim.breach['to']}")
    rollbacks = []
    for phase, seg_start, seg_end in phase_schedule(policy, start, 24):
        # Walk the flags forward to the phase this segment's traffic runs under, one gate at a
        # time (after a rollback the rollout restarts from the canary phase, seed §5).
        con = connect(home.db_path)
        try:
            state = flags.current_state(con, policy)
            while policy.phase_index(state.phase) < policy.phase_index(phase):
                nxt = policy.next_phase(state.phase)
                # The demo's traffic was generated up front, so later segments run whether or
                # not the gate holds; the override is recorded as promote_forced with its reason.
                flags.promote(con, policy, nxt, actor="rollout demo", force=True,
                              reason=f"demo timeline: simulated {phase} traffic starts")
                state = flags.current_state(con, policy)
        finally:
            con.close()
        print(f"phase {phase}: windows {seg_start:%H:%M}..{seg_end:%H:%M} UTC (flags at "
              f"{state.phase})", flush=True)
        try:
            summary = run_range(home, seg_start, seg_end, log=lambda m: None)
        except RunError as exc:
            raise CliError(str(exc), EXIT_FAILED) from None
        rollbacks.extend(summary.rollbacks)
    print()
    print("summary")
    for line in _verdict_summary(home, start, start + timedelta(days=1)):
        print("  " + line)
    con = connect(home.db_path, read_only=True)
    try:
        q = con.execute("select count(*) from quarantine").fetchone()[0]
        ev = con.execute("select count(*) from canary_events").fetchone()[0]
        st = flags.read_state(con)
    finally:
        con.close()
    print(f"  events stored: {ev}; lines quarantined: {q}")
    print(f"  rollback runs launched by the breach sensor: {len(rollbacks)} "
          f"({sum(1 for r in rollbacks if r.success)} succeeded; a breach of an incident that was "
          "already rolled back is recorded as skipped)")
    print(f"  flags now: {st.describe() if st else 'unknown'}")
    counts = {d: len(list((home.root / d).glob('*'))) for d in
              ("reports/monitoring", "reports/alerts", "reports/outbox", "reports/rollbacks",
               "reports/rca", "reports/daily")}
    print("  files: " + ", ".join(f"{d}/ ({n})" for d, n in counts.items()))
    print(f"  finished in {time.monotonic() - t0:.1f}s")
    print()
    print("next:")
    print(f"  rollout --home {home.root} ui      # Dagster UI: lineage, check history, sensor, "
          "rollback runs")
    print(f"  duckdb -readonly {home.reader_db_path} "
          "\"select * from window_verdicts where breach\"   # the readers' copy")
    print(f"  open {home.root / 'reports' / 'dashboard' / 'index.html'}   # offline dashboard")
    failed = _failed_rollbacks(home, rollbacks)
    if failed:  # as `rollout run` says it (a demo whose rollback failed exited 0)
        raise CliError("rollback failed for " + ", ".join(rb.run_key for rb in failed)
                       + ": see `rollbacks` and reports/rollbacks/", EXIT_FAILED)
    return 0


# ---- ui ---------------------------------------------------------------------------------------
def cmd_ui(args, home: RolloutHome) -> int:
    from rollout_assets.home import PROJECT_ROOT
    from rollout_assets.resources.notifier import DAGSTER_URL_ENV
    from rollout_assets.runner import prepare_instance

    if not 1 <= args.port <= 65535:
        raise CliError(f"--port: {args.port} is not a TCP port (1-65535)")
    try:  # `dagster dev` would start its daemon, then fail on the port and leave it running
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise CliError(f"--port: cannot listen on {args.host}:{args.port} ({exc.strerror})"
                       ) from None
    prepare_instance(home)  # sets DAGSTER_HOME and ROLLOUT_HOME for the child
    # the runs the daemon launches link their messages to this UI, not to port 3000 (an address
    # set already, e.g. the one a proxy publishes, is kept)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    os.environ.setdefault(DAGSTER_URL_ENV, f"http://{host}:{args.port}")
    dagster = shutil.which("dagster") or os.path.join(os.path.dirname(sys.executable), "dagster")
    argv = [dagster, "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "--host", args.host,
            "--port", str(args.port)]
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home.dagster_home}); "
          "Ctrl-C stops it", flush=True)
    # `dagster dev` replaces this process rather than running under it: Ctrl-C then reaches it
    # alone, and it stops the webserver and daemon it started (by a message, not a signal).
    # As a child of ours it was killed 0.25 s after Ctrl-C (`subprocess.call`), and a slow
    # shutdown left the webserver running without it.
    os.chdir(home.root)
    sys.stderr.flush()
    os.execv(dagster, argv)


# ---- parser -----------------------------------------------------------------------------------
HOME_HELP = "rollout home (default: $ROLLOUT_HOME, else the current dir)"
TIME_HELP = ("start of the range: an ISO-8601 time, UTC unless it has an offset "
             "(2025-01-18T09:00Z, 2025-01-18T18:00+09:00)")


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr and exit 2, like every other refusal (argparse
    prints its usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"rollout: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rollout", description=__doc__.splitlines()[0])
    p.add_argument("--home", help=HOME_HELP)
    # every command takes --home too, before or after its name (`rollout run --home H ...`)
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("simulate", help="write canary JSONL under the home", parents=[home])
    s.add_argument("--start", required=True, help="ISO time of the first window (UTC if no zone)")
    s.add_argument("--hours", type=float, required=True)
    s.add_argument("--rate", type=float, default=60.0, help="events per minute (default 60)")
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--simulate-breach", metavar="METRIC",
                   help="degrade METRIC for one hour (drill; refused in production mode)")
    s.add_argument("--breach-phase", metavar="PHASE", help="phase to inject the breach into")
    s.add_argument("--simulate-latency", metavar="MS", type=float,
                   help="add MS to every AutoSave latency (drill; refused in production mode)")
    s.add_argument("--phase", help="simulate only this phase for the whole span")
    s.add_argument("--no-noise", action="store_true",
                   help="no observed-only traffic, duplicates or malformed lines")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("run", parents=[home],
                       help="materialize every window starting in [from, to) via Dagster")
    r.add_argument("--from", dest="from_", metavar="ISO", required=True, help=TIME_HELP)
    r.add_argument("--to", metavar="ISO", required=True,
                   help="end of the range (exclusive): windows starting in [from, to)")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("flags", help="show or change the feature-flag phase", parents=[home])
    fs = f.add_subparsers(dest="flags_cmd", required=True)
    fs.add_parser("show", parents=[home], help="the current phase, its flags, the last changes")
    for name, text in (("rollback", "move the flags back to PHASE (flags:rollback)"),
                       ("promote", "move the flags one phase forward to PHASE")):
        fr = fs.add_parser(name, help=text, parents=[home])
        fr.add_argument("--phase", required=True)
        fr.add_argument("--reason")
        fr.add_argument("--actor", default=os.environ.get("USER", "rollout"))
        if name == "rollback":
            fr.add_argument("--dry-run", action="store_true",
                            help="drill: write docs/rehearsal/<time>.md, change nothing "
                                 "(refused in production mode)")
        else:
            fr.add_argument("--force", action="store_true",
                            help="promote although the gate does not hold (needs --reason; "
                                 "recorded as promote_forced)")
    f.set_defaults(func=cmd_flags)

    fl = sub.add_parser("files", parents=[home],
                        help="the canary files the Collector reads, and retiring one")
    fls = fl.add_subparsers(dest="files_cmd", required=True)
    fls.add_parser("list", parents=[home],
                   help="every canary file read: cursor, counts, whether it is gone")
    ff = fls.add_parser("forget", parents=[home],
                        help="a file read before that is gone for good: stop raising "
                             "it as a P1 collector fault (its events stay stored)")
    ff.add_argument("path", help="path under the home, absolute path, or file name")
    ff.add_argument("--reason", required=True)
    ff.add_argument("--actor", default=os.environ.get("USER", "rollout"))
    fl.set_defaults(func=cmd_files)

    rp = sub.add_parser("replay", parents=[home],
                        help="what-if: re-score stored windows under another policy")
    rp.add_argument("--policy", required=True, help="candidate policy YAML")
    rp.add_argument("--from", dest="from_", metavar="ISO", required=True, help=TIME_HELP)
    rp.add_argument("--to", metavar="ISO", required=True,
                    help="end of the range (exclusive): windows starting in [from, to)")
    rp.set_defaults(func=cmd_replay)

    d = sub.add_parser("demo", parents=[home],
                       help="simulate a day with a breach, run it, say where to look (it "
                            "resets the home first: refused for data it did not make)")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--rate", type=float, default=40.0)
    d.add_argument("--start", help="first window (default: yesterday 00:00 UTC)")
    d.add_argument("--breach", default="restore_success_rate", help="metric to break")
    d.add_argument("--breach-phase", default="A-2")
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("ui", parents=[home],
                       help="the Dagster UI (dagster dev) over this home's instance")
    u.add_argument("--port", type=int, default=3000)
    u.add_argument("--host", default="127.0.0.1")
    u.set_defaults(func=cmd_ui)
    return p


DISK_FULL = ("No space left on device", "database or disk is full")


def _disk_full(exc: BaseException) -> str | None:
    """The first error in `exc`'s chain that says the disk is full (an OSError, or a message of
    SQLite or DuckDB wrapped by Dagster's storage), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc.strerror or DISK_FULL[0]
        text = str(exc)
        for marker in DISK_FULL:
            if marker in text:
                return marker
        exc = exc.__cause__ or exc.__context__
    return None


STARTS_A_HOME = ("simulate", "demo")  # the commands that may create the home directory
USES_THE_INSTANCE = ("run", "demo", "ui")  # the commands that open the Dagster instance


def _check_home(cmd: str, home: RolloutHome) -> None:
    """A home that is not a writable directory is bad input; one that does not exist is a typo
    (a new, empty flag store and a run over nothing would say all is well), except for the
    commands that start a home."""
    root = home.root
    try:
        os.fsencode(root).decode("utf-8")
    except UnicodeDecodeError:  # bytes that are not UTF-8: DuckDB takes UTF-8 file names only
        raise CliError(f"rollout home {ascii(str(root))} is not a UTF-8 path: the warehouse "
                       "(DuckDB) needs one; rename the directory") from None
    if root.exists() and not root.is_dir():
        raise CliError(f"rollout home {root} is not a directory")
    if cmd in USES_THE_INSTANCE:  # (`flags` never does: the on-call's rollback is not refused)
        try:
            home.check_instance()
        except InstanceOfAnotherHome as exc:
            raise CliError(str(exc)) from None
    if not root.exists():
        if cmd in STARTS_A_HOME:
            return
        raise CliError(f"no rollout home at {root}: check --home / ROLLOUT_HOME (`rollout "
                       "simulate` or `rollout demo` start a new one)")
    try:  # os.access says yes to root, also in a read-only or immutable directory
        fd, probe = tempfile.mkstemp(dir=root, prefix=".rollout-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CliError(f"rollout home {root} is not writable ({exc.strerror})") from None


def _check_environment() -> None:
    from rollout_assets.partitions import check_partitions_start

    try:
        check_partitions_start()
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _reexec_in_utf8_mode() -> None:
    """Run the command again in Python's UTF-8 mode when the locale's encoding is not UTF-8
    (`LC_ALL=C` with `PYTHONUTF8=0`): Python would then spell a non-ASCII path such as
    "/srv/rollout-é" with surrogate escapes, which DuckDB cannot take as a file name or store in
    a table (the rollback's command line names the home). The children (`dagster dev`, the
    rollback command) inherit the mode."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    os.environ["PYTHONUTF8"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-X", "utf8", "-m", "rollout_assets.cli",
                              *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `rollout` command itself, not a caller in Python
        _reexec_in_utf8_mode()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or bad arguments, said in one line (`_Parser`)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    home = RolloutHome.resolve(args.home)
    try:
        _check_home(args.cmd, home)
        _check_environment()
        return args.func(args, home)
    except CliError as exc:
        print(f"rollout: {exc}", file=sys.stderr)
        return exc.code
    except InstanceOfAnotherHome as exc:  # found past `_check_home` (a home made meanwhile)
        print(f"rollout: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `rollout ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE
    except Exception as exc:
        full = _disk_full(exc)
        if full is None:
            raise
        print(f"rollout: no space left on the device ({full}); free some and run the command "
              "again (every window's rows are written whole or not at all)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
