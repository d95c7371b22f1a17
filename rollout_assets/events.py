"""The canary event contract: validate one JSONL line into a normalized event or a reason.

Every line read ends up either as an event or as a quarantine entry with a reason; nothing is
dropped. Validation is deliberately strict about JSON types (`"ok": "true"` is not a boolean).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from rollout_assets.partitions import floor_window

KINDS = ("autosave", "restore", "merge", "session", "crash")
NEEDS_OK = frozenset({"autosave", "restore", "merge"})
MAX_LATENCY_MS = 3_600_000.0  # an hour: anything slower is a broken clock, not a slow save
MIN_TS = datetime(2000, 1, 1)
FUTURE_SLACK = timedelta(days=1)
MAX_ID_LEN = 256
RAW_KEEP = 64 * 1024  # quarantine keeps the first 64 KiB of a line

EVENT_COLUMNS = (
    "event_id", "ts", "window_start", "phase", "kind", "latency_ms", "ok", "conflict",
    "session_id", "tenant", "environment", "observed_only", "dry_run", "source_file", "line_no",
)


class Reject(Exception):
    """A contract violation; the message is the quarantine reason."""


def _reject_constant(name: str):
    raise Reject(f"non-finite number {name}")


def _opt_str(obj: dict, key: str, max_len: int = MAX_ID_LEN) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise Reject(f"{key} must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise Reject(f"{key} longer than {max_len} characters")
    return v


def _opt_bool(obj: dict, key: str) -> bool | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise Reject(f"{key} must be a boolean, got {type(v).__name__}")
    return v


def parse_ts(value: object, now: datetime) -> datetime:
    if not isinstance(value, str):
        raise Reject("ts must be an ISO-8601 string")
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise Reject(f"ts is not ISO-8601: {value[:40]!r}") from None
    if dt.tzinfo is None:
        raise Reject("ts has no time zone")
    dt = dt.astimezone(UTC).replace(tzinfo=None)
    if dt < MIN_TS:
        raise Reject("ts before 2000-01-01")
    if dt > now + FUTURE_SLACK:
        raise Reject("ts more than a day in the future")
    return dt


def validate_event(text: str, phases: frozenset[str] | set[str], now: datetime) -> tuple:
    """Return the stored columns (without source_file, line_no) for one line, or raise Reject."""
    if not text.strip():
        raise Reject("empty line")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except Reject:
        raise
    except RecursionError:
        raise Reject("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise Reject(f"invalid JSON: {exc.args[0] if exc.args else exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise Reject(f"a line must be a JSON object, got {type(obj).__name__}")

    event_id = obj.get("event_id")
    if not isinstance(event_id, str) or not event_id.strip():
        raise Reject("missing field event_id" if event_id is None else "event_id must be a non-empty string")
    if len(event_id) > MAX_ID_LEN:
        raise Reject(f"event_id longer than {MAX_ID_LEN} characters")
    if "ts" not in obj:
        raise Reject("missing field ts")
    ts = parse_ts(obj["ts"], now)

    phase = obj.get("phase")
    if phase is None:
        raise Reject("missing field phase")
    if not isinstance(phase, str) or phase not in phases:
        raise Reject(f"unknown phase {str(phase)[:20]!r}")
    kind = obj.get("kind")
    if kind is None:
        raise Reject("missing field kind")
    if kind not in KINDS:
        raise Reject(f"unknown kind {str(kind)[:20]!r}")

    latency = obj.get("latency_ms")
    if latency is not None:
        if isinstance(latency, bool) or not isinstance(latency, (int, float)):
            raise Reject("latency_ms must be a number")
        latency = float(latency)
        if not math.isfinite(latency):
            raise Reject("latency_ms is not finite")
        if latency < 0:
            raise Reject("latency_ms is negative")
        if latency > MAX_LATENCY_MS:
            raise Reject("latency_ms above one hour")
    elif kind == "autosave":
        raise Reject("autosave event without latency_ms")

    ok = _opt_bool(obj, "ok")
    if ok is None and kind in NEEDS_OK:
        raise Reject(f"{kind} event without ok")
    conflict = _opt_bool(obj, "conflict")

    tags = obj.get("tags")
    if tags is None:
        tags = {}
    elif not isinstance(tags, dict):
        raise Reject("tags must be an object")
    observed_only = _opt_bool(tags, "observed_only") or False
    dry_run = _opt_bool(tags, "dry_run") or False

    return (
        event_id,
        ts,
        floor_window(ts),
        phase,
        kind,
        latency,
        ok,
        bool(conflict) if conflict is not None else False,
        _opt_str(obj, "session_id"),
        _opt_str(obj, "tenant"),
        _opt_str(obj, "environment"),
        observed_only,
        dry_run,
    )


@dataclass
class ParsedChunk:
    """Columnar result of validating a chunk of one file."""

    columns: dict[str, list] = field(default_factory=lambda: {c: [] for c in EVENT_COLUMNS})
    quarantine: list[tuple[int, str, str]] = field(default_factory=list)  # line_no, raw, reason
    lines_read: int = 0


def split_lines(data: bytes, first_line_no: int) -> list[tuple[int, bytes]]:
    """Split a chunk that ends on a line boundary into numbered lines (CRLF and a BOM tolerated)."""
    if data.startswith(b"\xef\xbb\xbf") and first_line_no == 1:
        data = data[3:]
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return []
    out = []
    for i, line in enumerate(data.split(b"\n")):
        if line.endswith(b"\r"):
            line = line[:-1]
        out.append((first_line_no + i, line))
    return out


def parse_chunk(
    data: bytes,
    first_line_no: int,
    source_file: str,
    phases: frozenset[str],
    now: datetime | None = None,
) -> ParsedChunk:
    now = now or datetime.now(UTC).replace(tzinfo=None)
    out = ParsedChunk()
    cols = [out.columns[c] for c in EVENT_COLUMNS]
    for line_no, raw in split_lines(data, first_line_no):
        out.lines_read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.quarantine.append((line_no, raw[:RAW_KEEP].decode("utf-8", "replace"), "not UTF-8"))
            continue
        try:
            row = validate_event(text, phases, now)
        except Reject as exc:
            out.quarantine.append((line_no, text[:RAW_KEEP], str(exc)))
            continue
        for col, value in zip(cols, (*row, source_file, line_no), strict=True):
            col.append(value)
    return out
