"""The canary event contract: validate one JSONL line into a normalized event or a reason.

Every line read ends up either as an event or as a quarantine entry with a reason; nothing is
dropped. Validation is deliberately strict about JSON types (`"ok": "true"` is not a boolean).

This module is the *reference* semantics of a line. The Collector's fast path
(`collect._FAST_INSERT_SQL`) accepts in DuckDB only lines it can prove this validator accepts with
the same values, and hands every other line back to `validate_line`; `rollout_assets_tests/
test_ingest_paths.py` checks both paths give identical tables. Two choices keep that provable:

* a key repeated in one object keeps its FIRST value (what DuckDB's JSON reader does; RFC 8259
  leaves it open), and
* a string that cannot be stored as UTF-8 (an escaped lone surrogate such as `"\\ud800"`) is
  rejected with a reason instead of failing the insert.
"""

from __future__ import annotations

import json
import math
import re
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


def _first_wins(pairs: list[tuple[str, object]]) -> dict:
    """A repeated key keeps its first value, as DuckDB's JSON reader does."""
    return dict(reversed(pairs))


def _storable(v: str, key: str) -> str:
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise Reject(f"{key} is not valid Unicode (lone surrogate)") from None
    return v


def _opt_str(obj: dict, key: str, max_len: int = MAX_ID_LEN) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise Reject(f"{key} must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise Reject(f"{key} longer than {max_len} characters")
    return _storable(v, key)


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
    try:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        raise Reject("ts out of range in UTC") from None
    if dt < MIN_TS:
        raise Reject("ts before 2000-01-01")
    if dt > now + FUTURE_SLACK:
        raise Reject("ts more than a day in the future")
    return dt


_TS_KEY = re.compile(rb'"ts"\s*:\s*"([^"\\]{1,64})"')
_PHASE_KEY = re.compile(rb'"phase"\s*:\s*"([^"\\]{1,64})"')


def time_and_phase(line: bytes, now: datetime) -> tuple[datetime, str] | None:
    """The `ts` (UTC) and `phase` a line would be stored under, as the validator reads them
    (top-level keys, the first of a repeated one, escapes decoded), or None when it would not
    be stored for lack of either. Cheap for a plain line (one `"ts"`, one `"phase"`, no
    backslash: its key spellings are then the top-level ones, or the line is invalid anyway);
    any other line is parsed as JSON (a `"phase"` inside `tags`, `"A\u002d0"`)."""
    plain = b"\\" not in line and line.count(b'"ts"') == 1 and line.count(b'"phase"') == 1
    ts = _TS_KEY.search(line) if plain else None
    phase = _PHASE_KEY.search(line) if ts else None
    if ts and phase:
        ts_value, phase_value = ts.group(1).decode("utf-8", "replace"), phase.group(1).decode(
            "utf-8", "replace")
    else:  # (also a plain line the patterns miss: a `ts` of 65 characters and more)
        try:
            obj = json.loads(line, parse_constant=_reject_constant, object_pairs_hook=_first_wins)
        except (Reject, ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        ts_value, phase_value = obj.get("ts"), obj.get("phase")
        if not isinstance(phase_value, str):
            return None
    try:
        return parse_ts(ts_value, now), phase_value
    except Reject:
        return None  # quarantined by the Collector: it counts in no window


def validate_event(text: str, phases: frozenset[str] | set[str], now: datetime) -> tuple:
    """Return the stored columns (without source_file, line_no) for one line, or raise Reject."""
    if not text.strip():
        raise Reject("empty line")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_first_wins)
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
        raise Reject("missing field event_id" if event_id is None
                     else "event_id must be a non-empty string")
    if len(event_id) > MAX_ID_LEN:
        raise Reject(f"event_id longer than {MAX_ID_LEN} characters")
    _storable(event_id, "event_id")
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
        try:
            latency = float(latency)
        except OverflowError:  # an integer too large for a double
            raise Reject("latency_ms is not finite") from None
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


BOM = b"\xef\xbb\xbf"


def line_bytes(raw: bytes, line_no: int) -> bytes:
    """The content of line `line_no` (1-based, without its newline): one trailing CR dropped, and
    a UTF-8 byte order mark dropped from the first line of a file."""
    if line_no == 1 and raw.startswith(BOM):
        raw = raw[3:]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def split_lines(data: bytes, first_line_no: int) -> list[tuple[int, bytes]]:
    """Split a chunk that ends on a line boundary into numbered lines (CRLF and a BOM tolerated).
    Every newline ends a line, so a lone "\n" is one (empty) line read."""
    if first_line_no == 1 and data.startswith(BOM):
        data = data[3:]
    if not data:
        return []
    if data.endswith(b"\n"):
        data = data[:-1]
    return [(first_line_no + i, line[:-1] if line.endswith(b"\r") else line)
            for i, line in enumerate(data.split(b"\n"))]


def validate_line(raw: bytes, phases: frozenset[str] | set[str],
                  now: datetime) -> tuple[tuple | None, str, str]:
    """One line's bytes (as `line_bytes` returns them) → (stored columns, "", "") or
    (None, raw text kept in quarantine, reason)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _quarantined(raw[:RAW_KEEP].decode("utf-8", "replace"), "not UTF-8",
                            len(raw) > RAW_KEEP, "bytes", len(raw))
    try:
        return validate_event(text, phases, now), "", ""
    except Reject as exc:
        return _quarantined(text[:RAW_KEEP], str(exc), len(text) > RAW_KEEP, "characters",
                            len(raw))


def _quarantined(kept: str, reason: str, cut: bool, unit: str,
                 nbytes: int) -> tuple[None, str, str]:
    """A rejected line as quarantine keeps it: a line cut to RAW_KEEP says so in its reason."""
    if cut:
        reason += f" (raw keeps the first {RAW_KEEP} {unit} of {nbytes} bytes)"
    return None, kept, reason


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
        row, text, reason = validate_line(raw, phases, now)
        if row is None:
            out.quarantine.append((line_no, text, reason))
            continue
        for col, value in zip(cols, (*row, source_file, line_no), strict=True):
            col.append(value)
    return out
