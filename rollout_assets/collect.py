"""Collector logic: canary JSONL → `canary_events` / `quarantine`, then `window_metrics`.

Ingestion is incremental: a byte-offset cursor per file (`ingest_files`) means a new window only
reads the bytes appended since the last run. Each file chunk is committed in one transaction with
its cursor, so a crash leaves either the chunk and its cursor or neither.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from rollout_assets.events import EVENT_COLUMNS, parse_chunk
from rollout_assets.home import RolloutHome
from rollout_assets.partitions import WINDOW, window_stamp
from rollout_assets.policy import Policy
from rollout_assets.warehouse import transaction

CHUNK_BYTES = 32 * 1024 * 1024
# A last line without its newline is still being written if the file changed this recently.
SETTLE_SECONDS = 30.0


class RetryableIOError(RuntimeError):
    """A canary file could not be read, but trying again may succeed (seed §7.4 retryable=true)."""


@dataclass
class FileIngest:
    source_file: str
    lines_read: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bytes_read: int = 0
    pending_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise PermissionError(f"canary file not readable: {path.name}: {exc.strerror}") from None
    except OSError as exc:
        raise RetryableIOError(f"reading {path.name} failed: {exc.strerror or exc}") from None


def _insert_chunk(con, parsed, rel: str, ingested_at: datetime) -> tuple[int, int]:
    """Insert valid events not yet stored (first occurrence of an event_id wins)."""
    valid = len(parsed.columns["event_id"])
    if parsed.quarantine:
        q = pd.DataFrame(parsed.quarantine, columns=["line_no", "raw", "reason"])
        q.insert(0, "source_file", rel)
        q["ingested_at"] = ingested_at
        con.register("q_batch", q)
        con.execute("insert into quarantine select * from q_batch")
        con.unregister("q_batch")
    if not valid:
        return 0, 0
    batch = pd.DataFrame(parsed.columns, columns=list(EVENT_COLUMNS))
    batch["ts"] = pd.to_datetime(batch["ts"])
    batch["window_start"] = pd.to_datetime(batch["window_start"])
    batch["latency_ms"] = batch["latency_ms"].astype("float64")
    batch["ok"] = batch["ok"].astype("boolean")
    con.register("ev_batch", batch)
    before = con.execute("select count(*) from canary_events").fetchone()[0]
    con.execute(
        f"""
        insert into canary_events
        select {", ".join("b." + c for c in EVENT_COLUMNS)}, ?::TIMESTAMP
        from (select *, row_number() over (partition by event_id order by line_no) as rn
              from ev_batch) b
        where b.rn = 1
          and not exists (select 1 from canary_events c where c.event_id = b.event_id)
        """,
        [ingested_at],
    )
    con.unregister("ev_batch")
    inserted = con.execute("select count(*) from canary_events").fetchone()[0] - before
    return inserted, valid - inserted


def ingest_file(con, home: RolloutHome, policy: Policy, path: Path, now: datetime) -> FileIngest:
    rel = home.relative(path)
    stats = FileIngest(rel)
    phases = frozenset(policy.phase_names)
    st = path.stat()
    row = con.execute(
        "select byte_offset, lines_read from ingest_files where source_file = ?", [rel]
    ).fetchone()
    offset, lines_before = row if row else (0, 0)
    totals = con.execute(
        "select loaded, duplicates, quarantined from ingest_files where source_file = ?", [rel]
    ).fetchone() or (0, 0, 0)
    if st.st_size < offset:
        # The file was truncated or replaced: read it again. Already-stored events dedup by
        # event_id; quarantine entries of the old content are replaced.
        with transaction(con):
            con.execute("delete from quarantine where source_file = ?", [rel])
            con.execute("delete from ingest_files where source_file = ?", [rel])
        offset, lines_before, totals = 0, 0, (0, 0, 0)
    if st.st_size == offset:
        return stats

    data = _read_from(path, offset)
    loaded_t, dup_t, quar_t = totals
    pos = 0
    line_no = lines_before + 1
    while pos < len(data):
        end = data.rfind(b"\n", pos, min(pos + CHUNK_BYTES, len(data)))
        if end == -1:  # a line longer than a chunk, or the unterminated tail
            end = data.find(b"\n", pos)
        if end == -1:
            # Only an unterminated tail is left.
            tail = data[pos:]
            parsed = parse_chunk(tail, line_no, rel, phases, now)
            recently_written = time.time() - st.st_mtime < SETTLE_SECONDS
            if parsed.quarantine and recently_written:
                stats.pending_bytes = len(tail)
                break
            if parsed.quarantine:
                parsed.quarantine = [
                    (n, raw, f"truncated last line: {reason}") for n, raw, reason in parsed.quarantine
                ]
            chunk_len = len(tail)
        else:
            chunk = data[pos : end + 1]
            parsed = parse_chunk(chunk, line_no, rel, phases, now)
            chunk_len = len(chunk)
        with transaction(con):
            inserted, dups = _insert_chunk(con, parsed, rel, now)
            loaded_t += inserted
            dup_t += dups
            quar_t += len(parsed.quarantine)
            lines_total = lines_before + stats.lines_read + parsed.lines_read
            con.execute(
                """
                insert or replace into ingest_files values (?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                [rel, offset + pos + chunk_len, lines_total, loaded_t, dup_t, quar_t,
                 st.st_size, st.st_mtime, now],
            )
        stats.lines_read += parsed.lines_read
        stats.loaded += inserted
        stats.duplicates += dups
        stats.quarantined += len(parsed.quarantine)
        stats.bytes_read += chunk_len
        line_no += parsed.lines_read
        pos += chunk_len
    return stats


def ingest_canary(con, home: RolloutHome, policy: Policy, now: datetime | None = None,
                  retries: int = 3, retry_delay: float = 0.5) -> list[FileIngest]:
    """Ingest every `reports/canary/phase-*.jsonl` from its cursor. Retryable I/O faults are
    retried; a file that vanished or cannot be read raises for the caller to escalate."""
    now = now or now_utc()
    results = []
    for path in home.canary_files():
        for attempt in range(retries + 1):
            try:
                results.append(ingest_file(con, home, policy, path, now))
                break
            except RetryableIOError:
                if attempt == retries:
                    raise
                time.sleep(retry_delay * (2**attempt))
    return results


# ---- window metrics ----------------------------------------------------------------------

_EXCLUSION_COLUMN = {
    "tags.dry_run": "dry_run",
    "tags.observed_only": "observed_only",
    "environment": "environment",
    "tenant": "tenant",
}


def sql_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def exclusion_case_sql(policy: Policy) -> str:
    """SQL expression naming the first exclusion rule an event matches (NULL = judged)."""
    whens = []
    for ex in policy.exclusions:
        cond = f"{_EXCLUSION_COLUMN[ex.field]} = {sql_literal(ex.equals)}"
        if ex.phases != "all":
            cond += f" and phase in ({', '.join(sql_literal(p) for p in ex.phases)})"
        whens.append(f"when {cond} then {sql_literal(ex.name)}")
    return f"(case {' '.join(whens)} end)" if whens else "(NULL::VARCHAR)"


WINDOW_METRICS_SQL = """
with ev as (
    select window_start, phase, kind, latency_ms, ok, conflict,
           {exclusion} as excluded_reason
    from canary_events
    where window_start >= ? and window_start < ?
), agg as (
    select window_start, phase,
        count(*) filter (where excluded_reason is null) as events,
        count(*) filter (where excluded_reason is null and kind = 'autosave') as autosave_count,
        quantile_cont(latency_ms, 0.95)
            filter (where excluded_reason is null and kind = 'autosave') as autosave_p95_ms,
        count(*) filter (where excluded_reason is null and kind = 'autosave' and not ok)
            as autosave_error_count,
        count(*) filter (where excluded_reason is null and kind = 'restore') as restore_count,
        count(*) filter (where excluded_reason is null and kind = 'restore' and ok) as restore_ok,
        count(*) filter (where excluded_reason is null and kind = 'merge') as merge_count,
        count(*) filter (where excluded_reason is null and kind = 'merge' and ok) as merge_ok,
        count(*) filter (where excluded_reason is null and kind = 'merge' and conflict)
            as merge_conflicts,
        count(*) filter (where excluded_reason is null and kind = 'session') as session_count,
        count(*) filter (where excluded_reason is null and kind = 'crash') as crash_count,
        count(*) filter (where excluded_reason is not null) as excluded_events
    from ev group by window_start, phase
)
select window_start, window_start + interval 15 minute as window_end, phase, events,
    autosave_count, autosave_p95_ms, autosave_error_count,
    restore_count, restore_ok / nullif(restore_count, 0)::DOUBLE as restore_success_rate,
    merge_count, merge_ok / nullif(merge_count, 0)::DOUBLE as merge_auto_success_rate,
    merge_conflicts / nullif(merge_count, 0)::DOUBLE as merge_conflict_rate,
    session_count, crash_count, crash_count / nullif(session_count, 0)::DOUBLE as crash_rate,
    excluded_events, ?::TIMESTAMP as computed_at, ?::VARCHAR as policy_version
from agg
order by window_start, phase
"""

WINDOW_EXCLUSIONS_SQL = """
select window_start, phase, excluded_reason as reason, count(*) as events
from (select window_start, phase, {exclusion} as excluded_reason from canary_events
      where window_start >= ? and window_start < ?)
where excluded_reason is not null
group by all
"""

METRIC_COLUMNS = (
    "window_start", "window_end", "phase", "events", "autosave_count", "autosave_p95_ms",
    "autosave_error_count", "restore_count", "restore_success_rate", "merge_count",
    "merge_auto_success_rate", "merge_conflict_rate", "session_count", "crash_count",
    "crash_rate", "excluded_events",
)


def compute_window_metrics(con, policy: Policy, first: datetime, last: datetime,
                           now: datetime | None = None) -> pd.DataFrame:
    """Replace `window_metrics` (and per-reason exclusions) for windows in [first, last]."""
    now = now or now_utc()
    end = last + WINDOW
    excl = exclusion_case_sql(policy)
    with transaction(con):
        con.execute("delete from window_metrics where window_start >= ? and window_start < ?",
                    [first, end])
        con.execute("delete from window_exclusions where window_start >= ? and window_start < ?",
                    [first, end])
        con.execute("insert into window_metrics " + WINDOW_METRICS_SQL.format(exclusion=excl),
                    [first, end, now, policy.version])
        con.execute("insert into window_exclusions "
                    + WINDOW_EXCLUSIONS_SQL.format(exclusion=excl), [first, end])
    return con.execute(
        "select * from window_metrics where window_start >= ? and window_start < ? "
        "order by window_start, phase", [first, end]
    ).df()


def exclusions_by_window(con, first: datetime, last: datetime) -> dict[tuple, dict[str, int]]:
    out: dict[tuple, dict[str, int]] = {}
    for ws, phase, reason, n in con.execute(
        "select window_start, phase, reason, events from window_exclusions "
        "where window_start >= ? and window_start < ?", [first, last + WINDOW]
    ).fetchall():
        out.setdefault((ws, phase), {})[reason] = n
    return out


def _json_value(v):
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, (pd.Timestamp, datetime)):
        return pd.Timestamp(v).strftime("%Y-%m-%dT%H:%M:%SZ")
    if hasattr(v, "item"):
        return v.item()
    return v


def export_monitoring(home: RolloutHome, metrics: pd.DataFrame, exclusions: dict,
                      windows: list[datetime], policy: Policy) -> list[Path]:
    """Write `reports/monitoring/<window>.jsonl`: one line per phase, a fixed schema."""
    home.monitoring_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_window: dict[datetime, list[dict]] = {}
    for rec in metrics.to_dict("records"):
        ws = pd.Timestamp(rec["window_start"]).to_pydatetime()
        line = {c: _json_value(rec[c]) for c in METRIC_COLUMNS}
        line["excluded_by_reason"] = exclusions.get((ws, rec["phase"]), {})
        line["policy_version"] = policy.version
        line["schema_version"] = 1
        by_window.setdefault(ws, []).append(line)
    for ws in windows:
        path = home.inside(home.monitoring_dir / f"{window_stamp(ws)}.jsonl")
        lines = by_window.get(ws)
        if not lines:
            if path.exists():
                path.unlink()
            continue
        atomic_write(path, "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
        written.append(path)
    return written


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def window_range(windows: list[datetime]) -> tuple[datetime, datetime]:
    return min(windows), max(windows)


def lookback_start(ws: datetime, hours: int) -> datetime:
    return ws - timedelta(hours=hours)
