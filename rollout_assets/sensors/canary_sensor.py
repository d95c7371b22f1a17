"""Late-data sensor: events appended after their window was scored get that window re-scored.

It watches `reports/canary/phase-*.jsonl` and the files rotation leaves beside them
(`phase-*.jsonl.1`, `phase-*.jsonl-<date>`) with its own cursor (per file: size, mtime, the
byte offset of the last complete line it scanned and a fingerprint of the bytes before it), never
the DuckDB file a run may be writing. A rotated file new to the cursor that holds the bytes a
vanished or replaced file's mark scanned carries on from that mark: late lines written before or
after the rotation are scanned, the old ones are not scanned twice.
When a file grew, it scans only the appended complete lines for their `ts` and `phase` as the
Collector will read them (`events.time_and_phase`: a regex for a plain line, JSON for any other;
nothing else is validated), maps them to windows, adds the later windows
whose verdicts read those events too (`Policy.read_later`: a late event of the crash baseline's
phase moves the baseline of the next `lookback_hours` of windows; one of a phase with burn-rate
rules, that phase's burn over the next `long_minutes`), keeps the windows Dagster has already
scored (a `window_verdicts` materialization exists; the schedule handles the others), and
launches `rollout_window_job` once per contiguous range of them. The re-run ingests the new
lines, replaces the windows' rows and verdicts; the breach sensor then sees the corrected
verdicts, and its run key `<window>:<phase>` and the notification ledger make sure a breach
already handled is not rolled back or paged twice.

Run keys are derived from the scanned byte ranges, so the same appended bytes never launch two
runs, whether the daemon or `tick_canary_sensor` (CLI, tests) evaluated the sensor. A truncated
or replaced file is scanned again from the start. The first evaluation only records the files.

Each tick also reaps runs whose process died (`run_health.reap_dead_runs`): under the daemon a
killed run would otherwise hold the `rollout_warehouse` pool forever.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
)

from rollout_assets.events import time_and_phase
from rollout_assets.home import RolloutHome
from rollout_assets.ingest import RetryableIOError
from rollout_assets.jobs import window_job
from rollout_assets.partitions import (
    WINDOW,
    floor_window,
    partition_key,
    window_partitions,
    window_ranges,
)
from rollout_assets.policy import Policy, load_policy
from rollout_assets.resources.home import HomeResource
from rollout_assets.retention import KEPT_BEFORE_KEY
from rollout_assets.rotation import fingerprint, holds
from rollout_assets.run_health import reap_dead_runs

SENSOR_NAME = "canary_late_data_sensor"
CLI_CURSOR_KEY = "rollout/cli/canary_late_data_sensor_cursor"
VERDICTS_KEY = dg.AssetKey("window_verdicts")
COLLECTOR_KEY = dg.AssetKey("canary_events")
SCAN_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileMark:
    size: int
    mtime: float
    offset: int  # bytes scanned: everything before it ends on a newline
    tail: str | None = None  # fingerprint of the bytes before `offset` (`ingest.tail_hash`)

    def as_list(self) -> list:
        return [self.size, self.mtime, self.offset, self.tail]


def _mark(path: Path, size: int, mtime: float, offset: int) -> FileMark:
    return FileMark(size, mtime, offset, fingerprint(path, offset))


def _holds(path: Path, mark: FileMark) -> bool:
    """Whether `path` still holds the bytes `mark` scanned (a mark from before fingerprints:
    whether it is at least as long)."""
    if mark.tail is not None:
        return holds(path, mark.offset, mark.tail) is True
    try:
        return path.stat().st_size >= mark.offset
    except OSError:
        return False


def load_cursor(text: str | None) -> dict[str, FileMark] | None:
    if not text:
        return None
    raw = json.loads(text)
    return {rel: FileMark(*v) for rel, v in raw.get("files", {}).items()}


def dump_cursor(marks: dict[str, FileMark]) -> str:
    return json.dumps({"v": 1, "files": {k: v.as_list() for k, v in sorted(marks.items())}},
                      separators=(",", ":"))


def scan_appended(path: Path, start: int, end: int,
                  now: datetime | None = None) -> tuple[dict[datetime, set[str]], int]:
    """Windows of the complete lines in bytes [start, end), each with the phases of its lines,
    as the Collector will store them (`events.time_and_phase`: lines it would quarantine for
    their `ts` or `phase` count nowhere), and the offset after the last one."""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    windows: dict[datetime, set[str]] = {}
    offset = start
    carry = b""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            block = f.read(min(SCAN_CHUNK, end - pos))
            if not block:
                break
            pos += len(block)
            data = carry + block
            cut = data.rfind(b"\n")
            if cut == -1:
                carry = data
                continue
            complete, carry = data[: cut + 1], data[cut + 1:]
            offset = pos - len(carry)
            for line in complete.split(b"\n"):
                found = time_and_phase(line, now)
                if found is not None:
                    windows.setdefault(floor_window(found[0]), set()).add(found[1])
    return windows, offset


def _end_of_complete_lines(path: Path, size: int) -> int:
    """The offset after the last newline (what the first evaluation counts as seen)."""
    if size == 0:
        return 0
    with open(path, "rb") as f:
        back = min(size, 1024 * 1024)
        f.seek(size - back)
        tail = f.read(back)
    cut = tail.rfind(b"\n")
    return size - back + cut + 1 if cut != -1 else (0 if back == size else size)


def appended_windows(home: RolloutHome, marks: dict[str, FileMark] | None
                     ) -> tuple[dict[datetime, set[str]], dict[str, FileMark], list[tuple]]:
    """(windows touched by appended lines with the phases they name, the new marks, the
    scanned byte ranges)."""
    new: dict[str, FileMark] = {}
    windows: dict[datetime, set[str]] = {}
    scanned: list[tuple] = []
    files = [*home.canary_files(), *home.rotated_canary_files()]
    # marks whose file no longer holds what they scanned: rotated away (renamed, copied and
    # truncated) or replaced; a rotated file new to the sensor carries on from its mark
    donors = {rel: m for rel, m in (marks or {}).items()
              if m.tail is not None and not _holds(home.root / rel, m)}
    for path in files:
        rel = str(path.relative_to(home.root))
        try:
            st = path.stat()
            if not path.is_file():
                continue
            old = (marks or {}).get(rel)
            if marks is None:  # first evaluation: remember, launch nothing
                new[rel] = _mark(path, st.st_size, st.st_mtime,
                                 _end_of_complete_lines(path, st.st_size))
                continue
            if old is not None and (st.st_size, st.st_mtime) == (old.size, old.mtime):
                new[rel] = old
                continue
            start = old.offset if old is not None and _holds(path, old) else 0
            if start == 0:  # new to the sensor, or its own mark's bytes are gone: rotated here?
                donor = next((d for d, m in donors.items() if d != rel and _holds(path, m)),
                             None)
                if donor is not None:  # its lines up to the donor's mark were scanned
                    start = donors.pop(donor).offset
            found, offset = scan_appended(path, start, st.st_size)
        except (OSError, RetryableIOError):
            # unreadable now: the Collector records the fault; look again next tick
            if rel in (marks or {}):
                new[rel] = marks[rel]
            continue
        new[rel] = _mark(path, st.st_size, st.st_mtime, offset)
        if offset > start:
            scanned.append((rel, start, offset))
            for w, phases in found.items():
                windows.setdefault(w, set()).update(phases)
    return windows, new, scanned


def affected_windows(policy: Policy, touched: dict[datetime, set[str]],
                     until: datetime) -> set[datetime]:
    """The windows whose verdicts read events in `touched` (window -> phases of its new
    events): each of them, and the later windows judged against them (`Policy.read_later`),
    up to `until` (no window after it has been judged)."""
    out = set(touched)
    reach = {p: policy.read_later(p) for p in policy.phase_names}
    for w, phases in touched.items():
        later = min(max((reach[p] for p in phases if p in reach), default=timedelta(0)),
                    max(until - w, timedelta(0)))
        out.update(w + i * WINDOW for i in range(1, later // WINDOW + 1))
    return out


def scored(instance: dg.DagsterInstance, windows: set[datetime]) -> list[datetime]:
    """The windows Dagster has already judged (others wait for the schedule), in order, but for
    those retention keeps as they are: a re-run would change nothing (`retention.py`)."""
    if not windows:
        return []
    done = instance.get_materialized_partitions(VERDICTS_KEY)
    first = window_partitions.get_first_partition_key()
    last = window_partitions.get_last_partition_key()
    keys = {w: partition_key(w) for w in windows}
    judged = sorted(w for w, k in keys.items()
                    if k in done and first is not None and last is not None
                    and first <= k <= last)
    kept = kept_by_retention(instance) if judged else None
    return [w for w in judged if kept is None or w >= kept]


def kept_by_retention(instance: dg.DagsterInstance) -> datetime | None:
    """Windows before this are kept as they are, as the Collector's latest run recorded it (the
    horizon only moves forward, and only in a Collector run); None when nothing was purged."""
    records = instance.fetch_materializations(COLLECTOR_KEY, limit=1).records
    if not records:
        return None
    value = records[0].asset_materialization.metadata.get(KEPT_BEFORE_KEY)
    return datetime.fromisoformat(value.value) if value is not None else None


def late_data_requests(instance: dg.DagsterInstance, home: RolloutHome, cursor: str | None
                       ) -> tuple[list[dg.RunRequest], str]:
    """Run requests re-scoring the already-scored windows that got new lines or are judged
    against them, and the cursor. A policy that does not load fails the tick (the cursor stays:
    the same lines are looked at again once it is fixed; runs refuse it too)."""
    marks = load_cursor(cursor)
    touched, new_marks, scanned = appended_windows(home, marks)
    now = datetime.now(UTC).replace(tzinfo=None)
    todo = scored(instance, affected_windows(load_policy(home.policy_path), touched,
                                             floor_window(now)) if touched else set())
    digest = hashlib.sha256(json.dumps(sorted(scanned)).encode()).hexdigest()[:16]
    requests = []
    for first, last in window_ranges(todo):
        start_key, end_key = partition_key(first), partition_key(last)
        requests.append(dg.RunRequest(
            run_key=f"late:{start_key}..{end_key}:{digest}",
            tags={ASSET_PARTITION_RANGE_START_TAG: start_key,
                  ASSET_PARTITION_RANGE_END_TAG: end_key,
                  "rollout/launched_by": SENSOR_NAME, "rollout/late_data": "true"},
        ))
    return requests, dump_cursor(new_marks)


@dg.sensor(
    name=SENSOR_NAME,
    job=window_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-scores windows that were already judged when events for them are appended to "
                "reports/canary/phase-*.jsonl, and the later windows judged against those events "
                "(the crash baseline's lookback, burn-rate windows); cursor: size, mtime and "
                "scanned offset per file.",
)
def canary_late_data_sensor(context: dg.SensorEvaluationContext, home: HomeResource):
    reap_dead_runs(context.instance, context.log.warning)
    requests, cursor = late_data_requests(context.instance, home.home, context.cursor)
    if not requests:
        return dg.SensorResult(skip_reason="no late events for an already-scored window",
                               cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def tick_canary_sensor(instance: dg.DagsterInstance, defs: dg.Definitions,
                       log: Callable[[str], None] = print) -> list[str]:
    """One evaluation outside the daemon (CLI, tests): its runs executed in-process with the tags
    the daemon adds, the cursor kept in the instance; then the breach sensor is ticked so a
    corrected verdict gets its rollback. Returns the run ids of the re-score runs."""
    from rollout_assets.runner import QUIET, tick_breach_sensor

    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    cursor = instance.run_storage.get_cursor_values({CLI_CURSOR_KEY}).get(CLI_CURSOR_KEY)
    data = sensor.evaluate_tick(
        dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                resources={"home": defs.resources["home"]}))
    job = defs.resolve_job_def(window_job.name)
    run_ids = []
    for rr in data.run_requests or []:
        if instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: rr.run_key})):
            continue
        log(f"late data: re-scoring {rr.tags[ASSET_PARTITION_RANGE_START_TAG]} .. "
            f"{rr.tags[ASSET_PARTITION_RANGE_END_TAG]}")
        res = job.execute_in_process(
            instance=instance, raise_on_error=False, run_config=QUIET,
            tags={**rr.tags, RUN_KEY_TAG: rr.run_key, SENSOR_NAME_TAG: SENSOR_NAME})
        run_ids.append(res.run_id)
    if data.cursor is not None:
        instance.run_storage.set_cursor_values({CLI_CURSOR_KEY: data.cursor})
    tick_breach_sensor(instance, defs, log)
    return run_ids
