"""Drive Dagster from the CLI: the same definitions, instance, checks and sensor the UI uses.

`rollout run` materializes a range of windows as one single-run backfill on the home's Dagster
instance, then ticks the breach sensor and executes the runs it requests with the tags the daemon
would add (`dagster/run_key`, `dagster/sensor_name`), so a breach the CLI already rolled back is
never rolled back again by the daemon, and vice versa.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
)

from rollout_assets.home import RolloutHome
from rollout_assets.partitions import (
    WINDOW,
    ceil_window,
    partition_key,
    to_utc_naive,
    window_from_key,
    window_partitions,
    windows_between,
)
from rollout_assets.progress import PROGRESS_RUN_CONFIG
from rollout_assets.run_health import REAPED_TAG, instance_lock, reap_dead_runs
from rollout_assets.startup import frozen_heap, paused_gc

SENSOR_NAME = "breach_sensor"
CURSOR_KEY = "rollout/cli/breach_sensor_cursor"
INSTANCE_YAML = """\
# Written by rollout: the Dagster instance of this rollout home.
telemetry:
  enabled: false
run_monitoring:
  enabled: true
concurrency:
  pools:
    # one writer at a time on data/rollout.duckdb (DuckDB allows one writing process)
    default_limit: 1
    # enforced per run by the daemon's run queue (queued runs wait without a process); at op
    # granularity Dagster 1.13 busy-waits for a slot. CLI runs wait on the DuckDB lock itself.
    granularity: run
"""
# Also appended to a dagster.yaml that rollout wrote before it existed (`upgrade_instance_yaml`).
EVENT_LOG_STORAGE_YAML = """\
# Dagster's own event log files (history/runs, relative to this directory: the default layout, so
# the history stays), written one connection and commit per batch of events, not per event.
event_log_storage:
  module: rollout_assets.instance_storage
  class: BatchingSqliteEventLogStorage
  config:
    base_dir: history/runs
"""
INSTANCE_YAML += EVENT_LOG_STORAGE_YAML
ROLLOUT_YAML_HEADER = "# Written by rollout"


# The CLI prints its own summary; Dagster's step-by-step console log stays in the event log/UI.
# The runs the CLI starts log nothing to the terminal: their events are in the instance (the
# UI shows them), and a failure is said in one line by the CLI (Dagster's console logger
# printed 77-156 lines of ERROR records and stack traces before it).
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class RunError(RuntimeError):
    pass


class BadRange(RunError):
    """The requested range is bad input (no window in it, or not yet closed): exit code 2."""


@dataclass
class RollbackRun:
    run_key: str
    run_id: str
    success: bool
    skipped: bool = False


@dataclass
class RunSummary:
    windows: list[datetime]
    run_id: str | None
    success: bool
    rollbacks: list[RollbackRun] = field(default_factory=list)


def prepare_instance(home: RolloutHome) -> dg.DagsterInstance:
    """The home's persistent instance (`<home>/.dagster` unless DAGSTER_HOME is set)."""
    dagster_home = home.dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ["ROLLOUT_HOME"] = str(home.root)
    with instance_lock(dagster_home):  # a concurrent `rollout run` may be creating it too
        home.check_instance(claim=True)
        if not cfg.exists():
            cfg.write_text(INSTANCE_YAML)
        else:
            upgrade_instance_yaml(cfg)
        return dg.DagsterInstance.get()


def upgrade_instance_yaml(cfg: Path) -> bool:
    """Add the event log storage stanza to a dagster.yaml that rollout wrote before it had one.

    A file rollout did not write (no "# Written by rollout" first line) is never touched, nor one
    that already configures its storage. The rest of the file is kept as it is. Returns whether
    the file was changed. The caller holds the instance lock.
    """
    import yaml

    text = cfg.read_text()
    if not text.startswith(ROLLOUT_YAML_HEADER):
        return False
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False  # Dagster will say what is wrong with it
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or {"storage", "run_storage", "event_log_storage",
                                      "schedule_storage"} & doc.keys():
        return False
    tmp = cfg.with_name(cfg.name + ".rollout-upgrade")
    tmp.write_text(text + ("" if text.endswith("\n") else "\n") + EVENT_LOG_STORAGE_YAML)
    os.replace(tmp, cfg)
    return True


def _defs(home: RolloutHome) -> dg.Definitions:
    from rollout_assets.definitions import build_definitions

    return build_definitions(home)


def valid_window_keys(windows: list[datetime]) -> list[str]:
    """Keys of the windows Dagster knows: from the partitions start to the last closed window."""
    first = window_partitions.get_first_partition_key()
    last = window_partitions.get_last_partition_key()
    return [k for k in map(partition_key, windows) if first and last and first <= k <= last]


def run_range(home: RolloutHome, start: datetime, end: datetime,
              log: Callable[[str], None] = print, progress: bool = False) -> RunSummary:
    # the bounds first: a year's typo (`--to 3025-...`) would list millions of windows
    first, last = (window_from_key(window_partitions.get_first_partition_key()),
                   window_from_key(window_partitions.get_last_partition_key()))
    outside = ceil_window(start) < first or to_utc_naive(end) > last + WINDOW
    windows = [] if outside else windows_between(start, end)
    if not outside and not windows:
        raise BadRange(f"no 15-minute window starts in [{start:%Y-%m-%dT%H:%MZ}, "
                       f"{end:%Y-%m-%dT%H:%MZ})")
    keys = valid_window_keys(windows)
    if outside or len(keys) != len(windows):
        raise BadRange(
            f"windows must lie between {partition_key(first)} and the last closed window "
            f"{partition_key(last)} (UTC); a window that has not closed yet cannot be judged")
    kept = _preflight(home)
    if kept is not None and windows[-1] < kept:
        raise BadRange(f"every window in the range is kept as it was and cannot be re-run: the "
                       f"events of windows before {kept:%Y-%m-%dT%H:%MZ}, or the history their "
                       "verdicts read, were deleted by retention (retention.canary_events_days)")
    if kept is not None and windows[0] < kept:
        log(f"windows before {kept:%Y-%m-%dT%H:%MZ} are kept as they were (their events were "
            "deleted by retention): only the later ones are recomputed")
    with paused_gc():  # the lazy imports (storage, pandas, the assets) and the definitions
        instance = prepare_instance(home)
        reap_dead_runs(instance, log)  # a killed run must not hold the pool or a run key forever
        defs = _defs(home)
    try:
        with frozen_heap():
            return _run_windows(instance, defs, windows, keys, log, progress)
    finally:
        instance.dispose()  # closes the event log's kept connections: each shard's WAL merged


def _preflight(home: RolloutHome) -> datetime | None:
    """What the assets check too, said before the run starts: a policy that drops a phase with
    history is refused (`governance.check_phase_history`), and the windows retention keeps as
    they were start before the returned time (rollout_assets/retention.py)."""
    from rollout_assets.governance import check_phase_history
    from rollout_assets.policy import PolicyError, load_policy
    from rollout_assets.retention import kept_before

    policy = load_policy(home.policy_path)

    def read(con):
        check_phase_history(con, policy)
        return kept_before(con, policy)

    try:
        return _query_warehouse(home.db_path, read, None)
    except PolicyError as exc:
        raise BadRange(str(exc)) from None


def _query_warehouse(path: Path, read: Callable, default):
    """`read(con)` on a short-lived connection to the warehouse at `path` (`default` when there
    is none yet): the runner's own look between runs, which hold no connection then."""
    from rollout_assets import warehouse

    if not path.exists():
        return default
    con = warehouse.connect(path)
    try:
        return read(con)
    finally:
        con.close()


def _run_windows(instance: dg.DagsterInstance, defs: dg.Definitions,
                 windows: list[datetime], keys: list[str], log: Callable[[str], None],
                 progress: bool) -> RunSummary:
    """The window run, the breach sensor's rollbacks, then the daily SLA run of its days and of
    the days whose incidents they changed (as the `incidents` events of those runs name them,
    the ones `sla_refresh_sensor` reads under the daemon)."""
    from rollout_assets.sensors.sla_sensor import latest_storage_ids, stale_days

    events_before = latest_storage_ids(instance)
    job = defs.resolve_job_def("rollout_window_job")
    log(f"materializing {len(keys)} window(s) {keys[0]} .. {keys[-1]} in one Dagster run")
    result = job.execute_in_process(
        instance=instance, raise_on_error=False,
        run_config=PROGRESS_RUN_CONFIG if progress else QUIET,
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1],
              "rollout/launched_by": "cli"},
    )
    summary = RunSummary(windows, result.run_id, result.success)
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None) or next(
            (e for e in result.all_events if e.is_failure), None)
        msg = failure.message if failure is not None else "see the run in the Dagster UI"
        error = failure.step_failure_data.error if failure is not None and (
            failure.is_step_failure) else None
        while error is not None and error.cause is not None:  # Dagster wraps the user error
            error = error.cause
        if error is not None:  # the exception's own words, e.g. which notification failed
            words = error.message.strip()
            if error.cls_name and ": " in words and words.split(": ", 1)[0].endswith(
                    error.cls_name):  # "rollout_assets.resources.notifier.DeliveryError: ..."
                words = words.split(": ", 1)[1]
            msg = f"step {failure.step_key} failed: {words}"
        # Verdicts that did materialize still get their rollbacks, as the daemon's sensor would
        # launch them: a Slack outage in the Reporter must not hold back a rollback.
        tick_breach_sensor(instance, defs, log)
        raise RunError(f"window run {result.run_id} failed: {msg}")
    summary.rollbacks = tick_breach_sensor(instance, defs, log)
    touched, _ = stale_days(instance, events_before, skip_cli=False)
    days = sorted({w.date() for w in windows} | set(touched))
    daily = defs.resolve_job_def("rollout_daily_job").execute_in_process(
        instance=instance, raise_on_error=False, run_config=QUIET,
        tags={ASSET_PARTITION_RANGE_START_TAG: days[0].isoformat(),
              ASSET_PARTITION_RANGE_END_TAG: days[-1].isoformat(), "rollout/launched_by": "cli"},
    )
    if not daily.success:
        raise RunError(f"daily SLA run {daily.run_id} failed; see the run in the Dagster UI")
    return summary


def tick_breach_sensor(instance: dg.DagsterInstance, defs: dg.Definitions,
                       log: Callable[[str], None] = print) -> list[RollbackRun]:
    """One evaluation of the breach sensor, then its run requests executed in-process."""
    # Check-then-launch must not interleave with another `rollout run` of the same home, or both
    # could launch the same run key. (The daemon dedups against the runs this creates.)
    with instance_lock(Path(instance.root_directory), ".rollout-breach-sensor.lock"):
        return _tick_breach_sensor(instance, defs, log)


def _tick_breach_sensor(instance: dg.DagsterInstance, defs: dg.Definitions,
                        log: Callable[[str], None]) -> list[RollbackRun]:
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    cursor = instance.run_storage.get_cursor_values({CURSOR_KEY}).get(CURSOR_KEY)
    out: list[RollbackRun] = []
    while True:
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                      resources={"home": defs.resources["home"]})
        data = sensor.evaluate_tick(ctx)
        job = defs.resolve_job_def("rollback_job")
        for rr in data.run_requests or []:
            existing = [
                r for r in instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: rr.run_key}))
                if r.tags.get(SENSOR_NAME_TAG) == SENSOR_NAME and REAPED_TAG not in r.tags
            ]  # a rollback whose process was killed (reaped) is launched again
            if existing:
                # handled before: report how that rollback ended (its latest attempt).
                # Its run may have failed only on a message it could not deliver, which the
                # window's re-run has delivered since: the command's outcome is what counts.
                ok = (existing[0].status == dg.DagsterRunStatus.SUCCESS
                      or _rollback_status(defs, rr.run_key) in ("succeeded", "skipped"))
                out.append(RollbackRun(rr.run_key, existing[0].run_id, ok, skipped=True))
                continue
            log(f"breach sensor: launching rollback_job for {rr.run_key}")
            res = job.execute_in_process(
                run_config={**_as_dict(rr.run_config), **QUIET}, instance=instance,
                raise_on_error=False,
                tags={**rr.tags, RUN_KEY_TAG: rr.run_key, SENSOR_NAME_TAG: SENSOR_NAME},
            )
            out.append(RollbackRun(rr.run_key, res.run_id, res.success))
        new_cursor = data.cursor
        if new_cursor is not None and new_cursor != cursor:
            instance.run_storage.set_cursor_values({CURSOR_KEY: new_cursor})
        if new_cursor == cursor or new_cursor is None:
            break
        cursor = new_cursor  # keep paging until the sensor has seen every new verdict
    return out


def _rollback_status(defs: dg.Definitions, run_key: str) -> str | None:
    """How the rollback of a breach ended: the status of its latest attempt's `rollbacks` row
    (a failed first attempt may have been retried since; ids are the run keys), None without
    one."""
    from rollout_assets.reporting import RETRY_SEP, latest_attempts

    base = run_key.split(RETRY_SEP)[0]
    return _query_warehouse(Path(defs.resources["warehouse"].path),
                            lambda con: latest_attempts(con, [base]).get(base), None)


def _as_dict(run_config) -> dict:
    return run_config if isinstance(run_config, dict) else run_config.to_config_dict()
