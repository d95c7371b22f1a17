"""Collector ingest: canary JSONL → `canary_events`, `quarantine` and `ingest_files`.

Incremental: a byte-offset cursor per file (`ingest_files`) means a run reads only the bytes
appended since the last one, and the rows of a range are committed in one transaction with the
cursor, so a crash leaves either both or neither.

Two paths with one meaning (`events.validate_line` is the reference):

* **fast** (the default): DuckDB reads the range and decides in SQL whether each line is
  *provably* accepted by the Python validator with the same values (`_stage_sql`). Minified
  ranges are proven at once from `read_json`'s typed fields and a length sum (the canonical
  path); any other range line by line from its text (`read_ndjson_objects`, the general
  path). Those rows are staged straight from the scan; every other line ("suspect": not JSON,
  a wrong type, an odd time stamp, a JSON extension DuckDB tolerates such as `NaN` or a
  trailing comma...) is fetched by its line number and validated in Python, so quarantine
  reasons and line numbers are exactly the strict path's. Blank lines are the only lines
  DuckDB skips; the line count of the range (counted with numpy) says whether there are any,
  and only then are they located.
* **strict**: every line through `events.validate_line` in Python, 32 MiB per transaction.
  `ROLLOUT_INGEST_MODE=strict` selects it; the fast path also falls back to it for a range
  DuckDB cannot read consistently. `rollout_assets_tests/test_ingest_paths.py` feeds both paths
  the same messy files and compares the three tables row for row.

Duplicates: `event_key = hash(event_id)`, a 64-bit hash, is the dedup key (joins on a UBIGINT
instead of strings). A range's rows whose key is already stored, or that repeat a key earlier
in the range, are left out of its insert: the first occurrence wins. Two distinct ids
share a key with probability ~n²/2^65 for n stored ids (10^8 ids: 3·10^-4; 10^9: 3 %): such an
event would be counted as a duplicate. Only the key is stored, not the id, so the keys must stay
comparable across runs: DuckDB is pinned, and every ingest first checks that `hash` still gives
EVENT_KEY_PROBE (a DuckDB whose `hash` changed refuses to ingest rather than miss duplicates).

Each committed range is one row of `ingest_batches` (file, first line, byte range, time); its
events carry its `batch_id` and their line number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from rollout_assets.events import (
    EVENT_COLUMNS,
    FUTURE_SLACK,
    KINDS,
    MAX_ID_LEN,
    MAX_LATENCY_MS,
    MIN_TS,
    NEEDS_OK,
    ParsedChunk,
    line_bytes,
    parse_chunk,
    validate_line,
)
from rollout_assets.home import RolloutHome
from rollout_assets.policy import Policy
from rollout_assets.warehouse import (
    LABEL_COLUMNS,
    duckdb_path,
    grow_labels,
    sql_string,
    transaction,
)

MODE_ENV = "ROLLOUT_INGEST_MODE"
# DuckDB's memory limit while the fast path stages files (restored afterwards): above it the
# staged rows spill to the database's temp directory instead of growing the process. A staged
# 2M-line file holds ~156 MB and three are in flight; on the 10M-event benchmark day, 448 MB
# kept the backfill's peak RSS at 780-940 MB (560 MB: 910-1,060 MB; 640 MB: up to 1,046 MB).
# Spilling costs time (the 10M ingest alone: 13.1-14.4 s at 448 MB, 12.5-13.3 s at 2 GB), so
# staged rows are kept narrow (`flags`). Lower limits also held (320 MB: 689 MB), but leave
# less room for the store's joins on machines with more threads; past the limit the files
# are read one at a time.
MEMORY_LIMIT_ENV = "ROLLOUT_INGEST_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "448MB"
STAGING_AHEAD = 2  # files parsed while one is stored
MODES = ("fast", "strict")
CHUNK_BYTES = 32 * 1024 * 1024  # strict path: bytes validated per transaction
# A last line without its newline is still being written if the file changed this recently.
SETTLE_SECONDS = 30.0
# Newline counts are kept per block: a suspect line is found by reading one. The benchmark's
# 2M-line files have ~8,000 suspects each, ~250 lines apart (most are valid lines SQL cannot
# prove: a latency written "...0.0" might have been spelled shorter as an exponent). With 64 KiB
# blocks, fetching them read most of the file again: 0.18 s a file; 0.08 s with 4 KiB blocks,
# whose counting costs 0.02 s more. A block's count fits the uint16 it is kept in.
BLOCK = 4 * 1024
assert BLOCK <= np.iinfo(np.uint16).max
READ_BUF = 16 * 1024 * 1024  # bytes read per call when counting lines
# DuckDB's maximum_object_size: each JSON scan holds buffers of twice this size, so two scans
# at 64 MiB ran out of the ingest's memory limit and fell back to slower paths. Longer lines
# are still read (test_ingest_paths.py: a 4 MiB event is stored as the strict path stores it).
MAX_OBJECT_BYTES = 1024 * 1024
# Lines DuckDB skips without a row: only these bytes (JSON whitespace plus VT and FF).
SKIPPED_WS = b" \t\r\x0b\x0c"
# Of those, the ones Python's json does not take as whitespace (nor raw inside a string): DuckDB
# reads `\x0b{...}` or `{...}\x0c` as the object, the validator refuses the line. A line with
# one is a suspect on both fast paths.
NOT_JSON_WS = (b"\x0b", b"\x0c")
# A suspect by length: more bytes than this may nest deeper than Python's json can parse.
DEEP_LINE_BYTES = 800
TAIL_BYTES = 256  # the cursor's fingerprint (`tail_hash`)
SUSPECT_CACHE_BYTES = 64 * 1024 * 1024  # suspects' bytes kept between proof and validation
ORDER_PROBES = 32  # rows of a canonical stage checked against their lines
MAX_RANGE_LINES = 2**31 - 1  # a staged row's `range_line` is an INTEGER; longer: strict path
# the `ts` spelling SQL decides (the JSON string's value): digits pinned, every field in
# its range, 1-6 fraction digits (longer ones are suspects; both readers truncate them), Z or
# an offset within +-23:59. test_ingest_paths.py holds it to the validator over a grid.
TS_PATTERN = (r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
              r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
              r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
# What `canary_events` keeps of a validated event (warehouse.py): `event_id` as `event_key`;
# `session_id` is validated but not stored (no metric, exclusion or report reads it); the file
# is the batch's. A staged row holds these plus whether it is `clean` (and `known_len` on the
# canonical path until the range is proven), narrowed while it waits in memory: `kind` and the
# small fields in one INTEGER (`flags`, below), `tenant` and `environment` as their JSON text
# (`_staged_label`), `line_no` as `range_line`, the line's number in its range (INTEGER,
# 1-based); `window_start` is computed from `ts` by the insert, which adds `batch_id`.
_STAGE_COLUMNS = ("ts", "phase", "kind", "latency_ms", "ok", "conflict", "tenant",
                  "environment", "observed_only", "dry_run", "line_no")
EVENT_TABLE_COLUMNS = ("event_key", "ts", "window_start", *_STAGE_COLUMNS[1:-1], "batch_id",
                       "line_no")
# hash() of this string in the DuckDB the stored event keys were made with (1.5.6)
EVENT_KEY_PROBE = ("rollout-assets", 16095674715432161642)

# `flags` of a staged row: bit 0 `clean`; bits 1-2 `ok` (0 NULL, 1 false, 2 true); bit 3
# `conflict`; 4 `observed_only`; 5 `dry_run`; bits 6-8 the kind's number in KINDS (1-based: a
# list lookup, cheaper than a cast to the `event_kind` ENUM); from bit 16 the phase's number
# in `_phase_order`.
# DuckDB's in-memory temp table gives every column a 256 KB block per 122,880-row group for its
# values and another for its validity mask, however narrow the column: those six took 12 blocks
# a row group (53 MB of a staged 2M-line file's 217), one INTEGER takes 3. With `range_line` an
# INTEGER, and `known_len` dropped once the range is proven, a file waits in 156 MB.
_PHASE_SHIFT = 16
_KIND_SHIFT = 6
assert len(KINDS) < 8  # 3 bits, 0 for none
_FROM_FLAGS = {  # a staged field's value, from `flags`
    "phase": f"flags >> {_PHASE_SHIFT}",
    "kind": f"(flags >> {_KIND_SHIFT}) & 7",
    "ok": "case (flags >> 1) & 3 when 2 then true when 1 then false end",
    "conflict": "flags & 8 <> 0",
    "observed_only": "flags & 16 <> 0",
    "dry_run": "flags & 32 <> 0",
}


def _clean(table: str = "") -> str:
    """SQL: the staged row (of `table`, e.g. "s.") is clean."""
    return f"{table}flags & 1 = 1"


def _flags(clean: str, ok_code: str, conflict: str, observed_only: str, dry_run: str,
           kind: str, phase: str) -> str:
    """SQL for `flags` from SQL for its fields: booleans, `ok_code` 0/1/2 (NULL/false/true)
    and `kind` and `phase` numbers (NULL counts as 0: only unclean rows have none)."""
    return (f"(({clean})::INTEGER | (({ok_code}) << 1) | (({conflict})::INTEGER << 3)"
            f" | (({observed_only})::INTEGER << 4) | (({dry_run})::INTEGER << 5)"
            f" | (coalesce({kind}, 0)::INTEGER << {_KIND_SHIFT})"
            f" | (coalesce({phase}, 0)::INTEGER << {_PHASE_SHIFT}))")


# The stage holds `tenant` and `environment` as the stage query reads a string, its JSON text
# (between quotes, with no escape in a clean row; NULL for null, an absent key or any other
# value), and rows the validator accepted as the value between quotes (unescaped). The store
# turns a range's few distinct texts into values (`_label_from_stage`) and picks each row's
# from a list: cutting the quotes row by row in the stage query cost ~0.1 s a 2M-line file.
# With the kind looked up in a list (`flags`), a 10M-event ingest went from 12.6-13.1 s to
# 11.7-12.1 s (22.1-22.9 to 20.5-21.5 CPU-s).
_STAGED_LABELS = ("tenant", "environment")
assert set(_STAGED_LABELS) == set(LABEL_COLUMNS) - {"phase"}
_LABEL_LOOKUP_MAX = 64  # more distinct texts in a range: the insert cuts the quotes row by row


def _staged_label(value: str | None) -> str | None:
    """How the stage holds a validated `tenant` / `environment` value."""
    return None if value is None else f'"{value}"'


def _label_from_stage(text: str | None) -> str | None:
    """The value a staged `tenant` / `environment` text stands for."""
    return None if text is None else text[1:-1]


class RetryableIOError(RuntimeError):
    """A canary file could not be read, but trying again may succeed (seed §7.4 retryable=true)."""


class _Inconsistent(Exception):
    """DuckDB's view of a range disagrees with the bytes: the strict path takes the range."""


@dataclass
class FileIngest:
    source_file: str
    lines_read: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    bytes_read: int = 0
    pending_bytes: int = 0
    # lines decided in SQL / validated in Python ("suspects" on the fast path, all on strict)
    fast_lines: int = 0
    python_lines: int = 0
    canonical_lines: int = 0  # of fast_lines: decided by the canonical path's whole-range proof
    fallbacks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def ingest_mode(mode: str | None = None) -> str:
    m = mode or os.environ.get(MODE_ENV) or "fast"
    if m not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {m!r}")
    return m


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# ---- file access ---------------------------------------------------------------------------

def _io_error(path: Path, exc: OSError) -> Exception:
    if isinstance(exc, FileNotFoundError):
        return exc
    if isinstance(exc, PermissionError):
        return PermissionError(exc.errno, f"canary file not readable: {path.name}: {exc.strerror}")
    return RetryableIOError(f"reading {path.name} failed: {exc.strerror or exc}")


def _pread(fd: int, n: int, offset: int, path: Path) -> bytes:
    try:
        return os.pread(fd, n, offset)
    except OSError as exc:
        raise _io_error(path, exc) from None


def _complete_end(fd: int, path: Path, start: int, size: int) -> int:
    """End of the last complete line in [start, size): just after its newline (start if none)."""
    pos = size
    while pos > start:
        n = min(BLOCK, pos - start)
        block = _pread(fd, n, pos - n, path)
        i = block.rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return start


@dataclass
class _Range:
    """A run of complete lines of one file, as the fast path sees it."""

    path: Path  # what DuckDB reads: the canary file itself, or a snapshot of the range
    fd: int  # an open descriptor of `path`
    base: int  # offset of the range's first byte in `path`
    size: int
    counts: np.ndarray  # newlines per BLOCK of the range
    odd_lines: list[int]  # range line numbers (1-based) holding a NOT_JSON_WS byte

    @property
    def lines(self) -> int:
        return int(self.counts.sum(dtype=np.int64))


def _scan_range(src_fd: int, path: Path, start: int, end: int,
                copy_to: int | None) -> tuple[np.ndarray, list[int]]:
    """Count newlines per BLOCK of [start, end) (numpy, ~GB/s) and find the lines holding a
    NOT_JSON_WS byte (`find` first: ~1 ms per buffer without one); optionally copy the bytes."""
    counts = np.zeros((end - start + BLOCK - 1) // BLOCK, np.uint16)
    odd: list[int] = []
    lines_before = 0
    buf = bytearray(READ_BUF)  # a multiple of BLOCK: every read starts a block
    view = memoryview(buf)
    pos, j = start, 0
    while pos < end:
        want = min(READ_BUF, end - pos)
        try:
            got = os.preadv(src_fd, [view[:want]], pos)
        except OSError as exc:
            raise _io_error(path, exc) from None
        if got != want:
            raise _Inconsistent(f"{path.name} shrank while it was read")
        if copy_to is not None:
            os.write(copy_to, view[:got])
        a = np.frombuffer(buf, np.uint8, count=got)
        eq = (a == 10).view(np.uint8)
        full = got // BLOCK
        first = j
        counts[j:j + full] = eq[:full * BLOCK].reshape(full, BLOCK).sum(axis=1, dtype=np.uint16)
        j += full
        if full * BLOCK < got:  # the range's last, partial block
            counts[j] = np.count_nonzero(eq[full * BLOCK:])
            j += 1
        if any(buf.find(b, 0, got) >= 0 for b in NOT_JSON_WS):
            at = np.flatnonzero(np.isin(a, np.frombuffer(b"".join(NOT_JSON_WS), np.uint8)))
            nl = np.flatnonzero(eq)  # a byte's line: the newlines before it, plus one
            odd.extend(np.unique(lines_before + np.searchsorted(nl, at) + 1).tolist())
        lines_before += int(counts[first:j].sum(dtype=np.int64))
        pos += got
    return counts, odd


class _LineFinder:
    """Fetch lines of a range by number without keeping the range in memory."""

    def __init__(self, rng: _Range):
        self.rng = rng
        # newlines before block j
        self.cum = np.concatenate(([0], np.cumsum(rng.counts, dtype=np.int64)))
        self._nl: dict[int, np.ndarray] = {}

    def _newline(self, m: int) -> int:
        """Offset (in the range) of its m-th newline, 1-based."""
        j = int(np.searchsorted(self.cum, m, "left")) - 1
        pos = self._nl.get(j)
        if pos is None:
            block = _pread(self.rng.fd, min(BLOCK, self.rng.size - j * BLOCK),
                           self.rng.base + j * BLOCK, self.rng.path)
            pos = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
            if len(self._nl) > 4096:
                self._nl.clear()
            self._nl[j] = pos
        return j * BLOCK + int(pos[m - self.cum[j] - 1])

    def line(self, k: int) -> bytes:
        """Raw bytes of the range's k-th line (1-based), without its newline."""
        begin = 0 if k == 1 else self._newline(k - 1) + 1
        end = self._newline(k)
        return _pread(self.rng.fd, end - begin, self.rng.base + begin, self.rng.path)

    def skipped_lines(self) -> list[int]:
        """Numbers (1-based, in the range) of the lines DuckDB skips: empty or only SKIPPED_WS."""
        out: list[int] = []
        line_no, pos = 1, 0
        ws = np.frombuffer(SKIPPED_WS + b"\n", np.uint8)
        while pos < self.rng.size:
            data = _pread(self.rng.fd, min(READ_BUF, self.rng.size - pos), self.rng.base + pos,
                          self.rng.path)
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than the buffer: it is not blank unless all space
                end = self._newline(line_no) if line_no <= self.rng.lines else self.rng.size
                if not _pread(self.rng.fd, end - pos, self.rng.base + pos,
                              self.rng.path).strip(SKIPPED_WS):
                    out.append(line_no)
                line_no, pos = line_no + 1, end + 1
                continue
            a = np.frombuffer(data, np.uint8, count=cut)
            nl = np.flatnonzero(a == 10)
            starts = np.concatenate(([0], nl[:-1] + 1))
            for c in np.flatnonzero(np.isin(a[starts], ws)):
                if not data[starts[c]:nl[c]].strip(SKIPPED_WS):
                    out.append(line_no + int(c))
            line_no += len(nl)
            pos += cut
        return out


# ---- the fast path's SQL ---------------------------------------------------------------------

_FIELDS = ("event_id", "ts", "phase", "kind", "latency_ms", "ok", "conflict", "session_id",
           "tenant", "environment", "tags")


def _tag_forms() -> list[str]:
    """Every `tags` object text the fast path decodes itself: the two known keys, each at most
    once, in either order, valued true/false/null (null means false, as in the validator). In
    these texts a key is true exactly when `"key":true` occurs: that is how SQL decodes them."""
    vals = ("true", "false", "null")
    forms = ["{}"]
    forms += [f'{{"{k}":{t}}}' for k in ("observed_only", "dry_run") for t in vals]
    for t1 in vals:
        for t2 in vals:
            forms.append(f'{{"observed_only":{t1},"dry_run":{t2}}}')
            forms.append(f'{{"dry_run":{t2},"observed_only":{t1}}}')
    return forms


# Both SQL paths see each known field as the JSON text DuckDB re-writes for it (minified, strings
# with only the escapes JSON requires), NULL when the key is absent (`_AS_STRING` fields: their
# string's value, below), and decide in SQL whether a line is *provably* accepted by the Python
# validator with the same values (`clean`). Every other line is validated in Python by its line
# number. Rows are staged in a temp table first: deleting rows a transaction has just inserted
# makes DuckDB's commit rewrite them all, so duplicates are left out of the insert instead.
#
# DuckDB's JSON reader also accepts NaN/Infinity, trailing commas and any nesting depth, which
# Python's json does not; those could hide in keys the fast path does not read. A line whose
# length is exactly that of its known keys written minified (`known_len`) has no other content:
# every other spelling of a string, key, object or boolean is at least as long as the minified
# one, and the only shorter spelling of a number is an exponent form of a value written with
# trailing zeros ("1E2" for 100.0) or leading ones ("1E-3" for 0.001), which the `lat_j` test
# singles out (`short_lat`).
#
# * The **canonical** path (`_stage_sql(canonical=True)`) reads the fields with `read_json`
#   (JSON-typed columns: one parse, no line text) and proves the length property for the whole
#   range at once: the clean rows' `known_len`, plus the suspects' own bytes, plus one newline a
#   line, must add up to the range's size. Each clean line is at least `known_len` long, so the
#   sum can only match if every one of them is exactly that long. The range must have one row a
#   line (`with ordinality` numbers them), else the general path takes it.
# * The **general** path (`_stage_sql(canonical=False)`) reads every line's text
#   (`read_ndjson_objects`) and checks each line on its own: by its length, else textually
#   for those extensions. It takes the ranges the canonical proof does not hold for (lines
#   written with spaces, CRLF, blank lines).
#
# `ts`, `phase` and `kind` (`_AS_STRING`) are read as VARCHAR, i.e. as the string's value
# (`read_json` with a VARCHAR column, `json_extract_string`), so DuckDB need not write their JSON
# text back (a 2M-line file's stage query 4.09 -> 3.46 CPU-s on one core). That value alone
# does not say the JSON value was a string: a number, literal, object or array reads as its own
# text (`12`, `true`, `NaN`, `{"a":1}`), an escaped string as its unescaped value. Neither can
# pass as clean: the values these fields accept (a time stamp of TS_PATTERN's shape, with a `T`
# and colons; a phase name, `^[A-Z]-[0-9]+$`; a kind) are none of them the text of a non-string
# (`_stage_sql` checks it), and an escaped string is longer than the value plus its two quotes
# that `known_len` counts, so its line fails the canonical proof and the general path's
# length test, which then checks it textually like any line with more than its known keys.
_AS_STRING = ("ts", "phase", "kind")
_SOURCE_CANONICAL = """src as (
    select o, e::VARCHAR as e, ts_s, phase_s, kind_s, lat_j::VARCHAR as lat_j,
        ok_j::VARCHAR as ok_j, conflict_j::VARCHAR as conflict_j, sid_j::VARCHAR as sid_j,
        tenant_j::VARCHAR as tenant_j, env_j::VARCHAR as env_j, tags_j::VARCHAR as tags_j
    from read_json($src, format = 'newline_delimited', ignore_errors = true,
                   maximum_object_size = {max_object}, columns = {json_columns})
        with ordinality
        as r(e, ts_s, phase_s, kind_s, lat_j, ok_j, conflict_j, sid_j, tenant_j, env_j, tags_j, o)
), v as (
    select *, {known_len} as known_len
    from src
)"""

_SOURCE_LINES = """src as (
    select ordinality as o, json::VARCHAR as raw,
        json_extract(json, {paths})::VARCHAR[] as f,
        json_extract_string(json, {string_paths}) as s
    from read_ndjson_objects($src, ignore_errors = true,
                             maximum_object_size = {max_object}) with ordinality
), {shifted}v as (
    select rel_line, raw, f[1] as e, s[1] as ts_s, s[2] as phase_s, s[3] as kind_s,
        f[2] as lat_j, f[3] as ok_j, f[4] as conflict_j, f[5] as sid_j, f[6] as tenant_j,
        f[7] as env_j, f[8] as tags_j, {known_len} as known_len
    from {lines}
)"""

_STAGE_SQL = """
create or replace temp table _ingest_stage as
with {source}, p as (
    select v.*,
        try_cast(lat_j as DOUBLE) as lat,  -- NULL for null too
        -- the pattern pins the one spelling whose every instance DuckDB's cast reads as
        -- Python's fromisoformat does (the cast alone takes 24:00, +24:00 and 23:60 in an
        -- offset, which Python refuses; it refuses Feb 30 itself); the rest is a suspect
        case when regexp_full_match(ts_s, {ts_re})
             then make_timestamp(epoch_us(try_cast(ts_s as TIMESTAMPTZ)))
        end as ts_utc,
        coalesce(lat_j like '%0.0' or lat_j like '0.0%', false) as short_lat,
        -- NULL unless a known kind / a policy phase: the checks below and the staged values
        -- (one lookup each; `in` lists cost a hash join per row on top)
        list_position({kind_list}, kind_s)::UTINYINT as kind_n,
        list_position({phase_list}, phase_s)::USMALLINT as phase_n
    from v  -- no join: the canonical path's line numbers rely on DuckDB keeping file order
), c as (
    select *,
        e is not null
        -- event_id: a non-empty string that starts with a printable character, <= 256 chars;
        -- the range says "a quote, then a byte 33..126" in byte comparisons (like plus ascii(e[2]),
        -- which decodes a UTF-8 character, cost 5 % more of the whole stage query)
        and e >= '"!' and e < ('"' || chr(127)) and not contains(e, '\\') and strlen(e) > 2
        and {e_len_ok}
        -- ts: YYYY-MM-DDTHH:MM:SS[.f{{1,6}}](Z|+HH:MM|-HH:MM), a real instant in range
        and ts_utc >= {min_ts} and ts_utc <= $max_ts
        and phase_n is not null and kind_n is not null
        and (case when lat is null then (lat_j is null or lat_j = 'null')
                  and kind_s <> 'autosave'
             else isfinite(lat) and lat >= 0 and lat <= {max_latency} end)
        and (case when ok_j is null or ok_j = 'null' then kind_s not in ({needs_ok})
             else ok_j in ('true', 'false') end)
        and (conflict_j is null or conflict_j in ('null', 'true', 'false'))
        and {sid_ok} and {tenant_ok} and {env_ok}
        and (tags_j is null or tags_j = 'null' or tags_j in ({tag_forms}))
        and {extensions_ok} as clean
    from p
)
select  -- values of unclean rows are never read: no CASE per column
    {flags} as flags,
    {known_len_out}
    hash({id_text}) as event_key,
    ts_utc as ts,
    lat as latency_ms,
    -- a string's JSON text, else NULL (`_staged_label`; a prefix test, not a cut per row)
    case when tenant_j like '"%' then tenant_j end as tenant,
    case when env_j like '"%' then env_j end as environment,
    {range_line}::INTEGER as range_line
from c
"""

# general path: no JSON extension Python rejects (NaN, trailing commas, deep nesting) anywhere
_EXTENSIONS_BY_LINE = """(case when strlen(raw) = known_len and not short_lat then true
             else not regexp_matches(raw, '{lenient_re}')
                  and (case when strlen(raw) <= {deep_bytes} then true
                       else strlen(raw) - strlen(replace(replace(raw, '{{', ''), '[', ''))
                            <= {deep_bytes} // 2 end) end)"""

_LENIENT_RE = r",[ \t\r]*[}\]]|[:\[,][ \t\r]*-?(?i:nan|inf)"


_SHIFTED = """shifted as (
    select src.*, o + coalesce(s.k, 0) as rel_line
    from src asof left join (select c, max(k) as k from _ingest_skips group by c) s
        on src.o > s.c
), """


def _short_enough(col: str) -> str:
    """At most MAX_ID_LEN characters between the quotes (bytes first: counting UTF-8 characters
    is slower, and CASE, unlike OR, evaluates the second test only where it is needed)."""
    return (f"(case when strlen({col}) <= {MAX_ID_LEN + 2} then true "
            f"else length({col}) <= {MAX_ID_LEN + 2} end)")


def _unquoted(col: str) -> str:
    """The characters between the quotes of a JSON string text `col` (its value, when it holds
    no escape). `col[2:-2]` says the same but counts the characters from the end: half the
    speed (0.22 vs 0.11 s per 4M strings)."""
    return f"substring({col}, 2, length({col}) - 2)"


def _optional_string(col: str) -> str:
    """Absent, null, or a JSON string without escapes that is short enough."""
    return (f"({col} is null or {col} = 'null' or ({col} like '\"%' "
            f"and not contains({col}, '\\') and {_short_enough(col)}))")


_REQUIRED = ("event_id", "ts", "phase", "kind")  # a clean row has each (see `clean` below)
_COLUMN_NAMES = ("e", "ts_s", "phase_s", "kind_s", "lat_j", "ok_j", "conflict_j", "sid_j",
                 "tenant_j", "env_j", "tags_j")


def _check_only_strings_spell(values) -> None:
    """Raise if a value accepted for an `_AS_STRING` field is also the text a non-string JSON
    value reads as in VARCHAR: a number (also NaN/Infinity), a literal, an object or an array."""
    for v in values:
        for parse in (json.loads, float):
            try:
                parse(v)
            except ValueError:
                continue
            raise ValueError(f"{v!r} is also the text of a non-string JSON value: the fast "
                             "path could not tell that value from the string")


def _stage_sql(policy: Policy, *, canonical: bool, with_skips: bool = False) -> str:
    """The stage query of one path for this policy. General: `with_skips` maps row numbers
    past the blank lines listed in `_ingest_skips` (only needed when the range has any)."""
    # the values SQL accepts for `phase` and `kind` (`event_kind` is KINDS)
    _check_only_strings_spell((*policy.phase_names, *KINDS))
    # a minified object made only of the known keys: each present key's `"key":value,`, plus
    # the braces, minus the last comma (NULL without a required key: such a row is not clean;
    # an `_AS_STRING` field's text is its value plus two quotes)
    known_len = " + ".join(
        f"strlen({col}) + {len(name) + 4 + 2 * (name in _AS_STRING)}" if name in _REQUIRED
        else f"coalesce(strlen({col}) + {len(name) + 4}, 0)"
        for col, name in zip(_COLUMN_NAMES, _FIELDS, strict=True)) + " + 1"
    if canonical:
        source = _SOURCE_CANONICAL.format(
            max_object=MAX_OBJECT_BYTES, known_len=known_len,
            json_columns="{" + ", ".join(
                f"{f}: '{'VARCHAR' if f in _AS_STRING else 'JSON'}'" for f in _FIELDS) + "}")
        extensions_ok = "not short_lat"  # the rest is proven for the whole range
    else:
        source = _SOURCE_LINES.format(
            paths="[" + ", ".join(f"'$.{f}'" for f in _FIELDS if f not in _AS_STRING) + "]",
            string_paths="[" + ", ".join(f"'$.{f}'" for f in _AS_STRING) + "]",
            max_object=MAX_OBJECT_BYTES, known_len=known_len,
            shifted=_SHIFTED if with_skips else "",
            lines="shifted" if with_skips else "(select *, o as rel_line from src)")
        extensions_ok = _EXTENSIONS_BY_LINE.format(lenient_re=_LENIENT_RE,
                                                   deep_bytes=DEEP_LINE_BYTES)
    return _STAGE_SQL.format(
        source=source,
        extensions_ok=extensions_ok,
        flags=_flags("coalesce(clean, false)",
                     "case ok_j when 'true' then 2 when 'false' then 1 else 0 end",
                     "coalesce(conflict_j = 'true', false)",
                     "coalesce(contains(tags_j, '\"observed_only\":true'), false)",
                     "coalesce(contains(tags_j, '\"dry_run\":true'), false)", "kind_n",
                     "phase_n"),
        known_len_out="known_len::INTEGER as known_len," if canonical else "",
        phase_list=_sql_list(_phase_order(policy.phase_names)),
        kind_list=_sql_list(KINDS),
        id_text=_unquoted("e"),
        range_line="o" if canonical else "rel_line",
        e_len_ok=_short_enough("e"),
        sid_ok=_optional_string("sid_j"),
        tenant_ok=_optional_string("tenant_j"),
        env_ok=_optional_string("env_j"),
        min_ts=f"TIMESTAMP '{MIN_TS:%Y-%m-%d %H:%M:%S}'",
        needs_ok=", ".join(map(sql_string, sorted(NEEDS_OK))),
        tag_forms=", ".join(map(sql_string, _tag_forms())),
        max_latency=repr(MAX_LATENCY_MS),
        ts_re=sql_string(TS_PATTERN),
    )


def _phase_order(phases) -> tuple[str, ...]:
    """The phases a staged row's `phase` number counts in (1-based): sorted, so any path that
    knows the policy's phases numbers them alike."""
    if len(phases) >= 1 << (31 - _PHASE_SHIFT):
        raise ValueError(f"at most {(1 << (31 - _PHASE_SHIFT)) - 1} phases fit a staged row")
    return tuple(sorted(phases))


def _sql_list(values) -> str:
    return "[" + ", ".join(map(sql_string, values)) + "]"


def _prepare_session(con) -> None:
    con.execute("create temp table if not exists _ingest_skips (c BIGINT, k BIGINT)")


# ---- schema upkeep ---------------------------------------------------------------------------

def check_event_keys(con) -> None:
    """Stored events keep `hash(event_id)`, not the id: refuse to ingest with a DuckDB whose
    `hash` gives other keys, since its duplicates would no longer match the stored ones."""
    text, expected = EVENT_KEY_PROBE
    got = con.execute("select hash(?)", [text]).fetchone()[0]
    if got != expected:
        raise RuntimeError(
            f"DuckDB {duckdb.__version__} hashes event ids differently from the DuckDB that made "
            "the stored event keys: pin the duckdb version in pyproject.toml, or ingest the "
            "canary files into a new warehouse")


# ---- storing rows ------------------------------------------------------------------------------

_STAGE_TABLE = """create temp table if not exists _ingest_stage (
    flags INTEGER, event_key UBIGINT, ts TIMESTAMP, latency_ms DOUBLE,
    tenant VARCHAR, environment VARCHAR, range_line INTEGER)"""


def _stage_python_rows(con, parsed: ParsedChunk, phases: tuple[str, ...], before: int) -> int:
    """Add rows the Python validator accepted to `_ingest_stage` (creating it if needed);
    `phases` is the `_phase_order` the stage numbers phases in, `before` the file's lines
    before the range."""
    con.execute(_STAGE_TABLE)
    valid = len(parsed.columns["event_id"])
    if not valid:
        return 0
    df = pd.DataFrame({c: parsed.columns[c] for c in ("event_id", *_STAGE_COLUMNS)})
    df["ts"] = pd.to_datetime(df["ts"])
    df["latency_ms"] = df["latency_ms"].astype("float64")
    df["ok"] = df["ok"].astype("boolean")
    for label in _STAGED_LABELS:  # from the lists: pandas would read None as NaN
        df[label] = pd.Series([_staged_label(v) for v in parsed.columns[label]], dtype=object)
    con.register("_ingest_py_rows", df)
    try:
        flags = _flags("true", "case when ok then 2 when not ok then 1 else 0 end", "conflict",
                       "observed_only", "dry_run", f"list_position({_sql_list(KINDS)}, kind)",
                       f"list_position({_sql_list(phases)}, phase)")
        columns = ", ".join(c for c in _STAGE_COLUMNS if c not in _FROM_FLAGS and c != "line_no")
        con.execute(f"insert into _ingest_stage by name select {flags} as flags, {columns}, "
                    "(line_no - $before)::INTEGER as range_line, "
                    "hash(event_id) as event_key from _ingest_py_rows", {"before": before})
    finally:
        con.unregister("_ingest_py_rows")
    return valid


def _insert_quarantine(con, rows: list[tuple[int, str, str]], rel: str, now: datetime) -> None:
    if not rows:
        return
    q = pd.DataFrame(rows, columns=["line_no", "raw", "reason"])
    q.insert(0, "source_file", rel)
    q["ingested_at"] = now
    con.register("_ingest_q_rows", q)
    try:
        con.execute("insert into quarantine select source_file, line_no, raw, reason, "
                    "ingested_at::TIMESTAMP from _ingest_q_rows")
    finally:
        con.unregister("_ingest_q_rows")


def _label_expr(column: str, texts: list[str], values: list[str | None], stored_as: str,
                params: dict) -> str:
    """SQL for the stored value of a staged label column whose distinct texts in the range are
    `texts` (standing for `values`), of the column's type `stored_as`; adds the lists it
    binds to `params` (as parameters: a label may hold any character, NUL included)."""
    if not texts:
        return "NULL"
    if len(texts) > _LABEL_LOOKUP_MAX:
        return _unquoted(column)  # every staged text is a quoted string (or NULL)
    params[f"{column}_texts"], params[f"{column}_values"] = texts, values
    return (f"(${column}_values::{stored_as}[])"
            f"[list_position(${column}_texts::VARCHAR[], {column})]")


def _store_stage(con, rel: str, cur: _Cursor, lines: int, nbytes: int, now: datetime,
                 phases: tuple[str, ...]) -> int:
    """Insert the staged valid rows whose event_key is neither stored already nor held by an
    earlier line of the stage (the first occurrence wins), as a new batch: the range of `lines`
    lines and `nbytes` bytes at the cursor. Returns the rows inserted."""
    exprs = {**_FROM_FLAGS, "phase": f"{_sql_list(phases)}[{_FROM_FLAGS['phase']}]",
             "kind": f"({_sql_list(KINDS)}::event_kind[])[{_FROM_FLAGS['kind']}]",
             "batch_id": "$batch", "window_start": "time_bucket(INTERVAL 15 MINUTE, ts)",
             "line_no": "$before + range_line"}
    # Every phase of the policy, present or not: the phase list is cast whole to the column's
    # ENUM, so the staged number picks the stored value with no text cast per row (and the
    # column is rewritten once for a policy's new phases, not once per phase as files bring
    # them: each rewrite costs ~0.2 s per 2M stored events).
    enum = grow_labels(con, "phase", phases)
    if enum is not None:
        exprs["phase"] = f"({_sql_list(phases)}::{enum}[])[{_FROM_FLAGS['phase']}]"
    batch = con.execute("select coalesce(max(batch_id), 0) + 1 from ingest_batches").fetchone()[0]
    params = {"batch": batch, "before": cur.lines}
    # the free-text labels' combinations (one grouping: cheaper than a distinct list per column)
    combos = con.execute(f"select distinct {', '.join(_STAGED_LABELS)} from _ingest_stage "
                         f"where {_clean()}").fetchall()
    for i, column in enumerate(_STAGED_LABELS):
        texts = sorted({row[i] for row in combos if row[i] is not None})
        values = [_label_from_stage(t) for t in texts]
        stored_as = grow_labels(con, column, values) or "VARCHAR"
        exprs[column] = _label_expr(column, texts, values, stored_as, params)
    kept = con.execute(f"""
        insert into canary_events ({', '.join(EVENT_TABLE_COLUMNS)})
        with stored as (  -- built on the (smaller) stage, probing the stored keys
            select distinct s.event_key from _ingest_stage s
            join canary_events c on c.event_key = s.event_key where {_clean('s.')}
        ), later as (
            select s.range_line from _ingest_stage s
            join _ingest_stage e on e.event_key = s.event_key
                and {_clean('e.')} and e.range_line < s.range_line
            where {_clean('s.')}
        )
        select {', '.join(exprs.get(c, c) for c in EVENT_TABLE_COLUMNS)}
        from _ingest_stage
        where {_clean()} and event_key not in (select event_key from stored)
            and range_line not in (select range_line from later)
    """, params).fetchone()[0]
    con.execute("insert into ingest_batches values (?, ?, ?, ?, ?, ?, ?, ?)",
                [batch, rel, cur.lines + 1, lines, cur.offset, nbytes, kept, now])
    return kept


@dataclass
class _Cursor:
    offset: int = 0
    lines: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    tail_hash: str | None = None  # of the TAIL_BYTES before `offset` (None: not recorded)
    rotated_from: str | None = None  # an archive: the name it was rotated away from


RECORD_TABLES = ("ingest_files", "ingest_batches", "quarantine")  # rows named by source_file
ASIDE_STAMP = "%Y%m%dT%H%M%SZ"
ASIDE_NAME_RE = r"#[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$"  # how `set_aside` names end: no file has them


def rename_records(con, old: str, new: str) -> None:
    """What the warehouse holds of a file read under `old` is now named `new`."""
    for table in RECORD_TABLES:
        con.execute(f"update {table} set source_file = ? where source_file = ?", [new, old])


def set_aside(con, rel: str) -> str:
    """Name the records of content that `rel` no longer holds `<rel>#<time it was last read>`,
    marked an archive (gone: read no more, never a collector fault), so the name is free for
    new content read from its first line. Returns the new name."""
    row = con.execute("select updated_at from ingest_files where source_file = ?",
                      [rel]).fetchone()
    if row is None:
        return rel
    aside = stem = f"{rel}#{row[0]:{ASIDE_STAMP}}"
    n = 1
    while con.execute("select 1 from ingest_files where source_file = ?", [aside]).fetchone():
        n += 1  # replaced again within the second (or under a pinned clock)
        aside = f"{stem}-{n}"
    rename_records(con, rel, aside)
    con.execute("update ingest_files set rotated_from = coalesce(rotated_from, ?) "
                "where source_file = ?", [rel, aside])
    return aside


def _read_cursor(con, rel: str) -> _Cursor:
    row = con.execute("select byte_offset, lines_read, loaded, duplicates, quarantined, "
                      "tail_hash, rotated_from from ingest_files where source_file = ?",
                      [rel]).fetchone()
    return _Cursor(*row) if row else _Cursor()


def tail_hash(fd: int, path: Path, offset: int) -> str:
    """A fingerprint of the TAIL_BYTES bytes before `offset`: the cursor's own bytes. A file
    replaced by another of the same size or longer (rotated, copied over, truncated and
    refilled between two runs) has other bytes there, and is read again from its start."""
    n = min(TAIL_BYTES, offset)
    return hashlib.blake2b(_pread(fd, n, offset - n, path), digest_size=8).hexdigest()


def _save_cursor(con, rel: str, cur: _Cursor, st: os.stat_result, now: datetime, fd: int,
                 path: Path) -> None:
    cur.tail_hash = tail_hash(fd, path, cur.offset)
    # by name: a warehouse migrated on connect has its later columns in another order
    con.execute("insert or replace into ingest_files (source_file, byte_offset, lines_read, "
                "loaded, duplicates, quarantined, size_bytes, mtime, updated_at, tail_hash, "
                "rotated_from) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [rel, cur.offset, cur.lines, cur.loaded, cur.duplicates, cur.quarantined,
                 st.st_size, st.st_mtime, now, cur.tail_hash, cur.rotated_from])


def _commit_counts(stats: FileIngest, cur: _Cursor, lines: int, loaded: int, valid: int,
                   quarantined: int, nbytes: int) -> None:
    """Add a committed range to the run's stats and to the file's cursor totals."""
    cur.offset += nbytes
    cur.lines += lines
    stats.bytes_read += nbytes
    stats.lines_read += lines
    for obj in (stats, cur):
        obj.loaded += loaded
        obj.duplicates += valid - loaded
        obj.quarantined += quarantined


# ---- the strict path -----------------------------------------------------------------------

def _store_parsed(con, parsed: ParsedChunk, nbytes: int, rel: str, cur: _Cursor,
                  now: datetime, phases: tuple[str, ...]) -> tuple[int, int]:
    """Store one chunk the Python validator read; returns (valid, kept)."""
    con.execute("drop table if exists _ingest_stage")
    valid = _stage_python_rows(con, parsed, phases, cur.lines)
    _insert_quarantine(con, parsed.quarantine, rel, now)
    kept = _store_stage(con, rel, cur, parsed.lines_read, nbytes, now, phases)
    con.execute("drop table _ingest_stage")
    return valid, kept


def _ingest_strict(con, fd: int, path: Path, rel: str, end: int, cur: _Cursor,
                   phases: frozenset[str], st, now: datetime, stats: FileIngest) -> None:
    """Validate [cursor, end) line by line in Python, CHUNK_BYTES per transaction."""
    while cur.offset < end:
        want = min(CHUNK_BYTES, end - cur.offset)
        data = _pread(fd, want, cur.offset, path)
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # a line longer than a chunk: read up to its newline
            cut = _read_until_newline(fd, path, cur.offset, end)
            data = _pread(fd, cut, cur.offset, path)
        chunk = data[:cut]
        _commit_parsed(con, parse_chunk(chunk, cur.lines + 1, rel, phases, now), len(chunk),
                       rel, cur, st, now, stats, phases, fd, path)


def _commit_parsed(con, parsed: ParsedChunk, nbytes: int, rel: str, cur: _Cursor, st,
                   now: datetime, stats: FileIngest, phases: frozenset[str], fd: int,
                   path: Path) -> None:
    """Store a chunk the Python validator read, with the file's cursor, in one transaction."""
    with transaction(con):
        valid, kept = _store_parsed(con, parsed, nbytes, rel, cur, now, _phase_order(phases))
        _commit_counts(stats, cur, parsed.lines_read, kept, valid, len(parsed.quarantine),
                       nbytes)
        _save_cursor(con, rel, cur, st, now, fd, path)
    stats.python_lines += parsed.lines_read


def _read_until_newline(fd: int, path: Path, start: int, end: int) -> int:
    pos = start
    while pos < end:
        block = _pread(fd, min(READ_BUF, end - pos), pos, path)
        i = block.find(b"\n")
        if i >= 0:
            return pos - start + i + 1
        pos += len(block)
    return end - start


# ---- the fast path -------------------------------------------------------------------------

def _snapshot_dir(size: int) -> str | None:
    """RAM-backed /dev/shm when it has room for the range (containers often give it 64 MB),
    else the system's temp directory."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    roomy = st.f_bavail * st.f_frsize > 2 * size + (64 << 20)
    return shm if roomy and os.access(shm, os.W_OK) else None


class _Grew(Exception):
    """The file changed while DuckDB read it in place: read a snapshot of the range instead."""


def _open_range(stack: contextlib.ExitStack, path: Path, fd: int, start: int, end: int, st,
                snapshot: bool) -> _Range:
    """The bytes [start, end) as a file DuckDB can read: the canary file itself when the range
    is all of it, else a snapshot copy (RAM-backed where /dev/shm exists) of just the range, so
    DuckDB never reads the bytes before the cursor. Cleaned up when `stack` closes."""
    if not snapshot and start == 0 and end == st.st_size:
        return _Range(path, fd, 0, end, *_scan_range(fd, path, start, end, None))
    tmpdir = tempfile.mkdtemp(prefix="rollout-ingest-", dir=_snapshot_dir(end - start))
    stack.callback(shutil.rmtree, tmpdir, True)
    snap = Path(tmpdir) / "range.jsonl"
    out = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        counts, odd = _scan_range(fd, path, start, end, out)
    finally:
        os.close(out)
    sfd = os.open(snap, os.O_RDONLY)
    stack.callback(os.close, sfd)
    return _Range(snap, sfd, 0, end - start, counts, odd)


class _Staged:
    """One file's complete lines [cursor, end), parsed and checked by DuckDB into the temp table
    `_ingest_stage` of `con` (outside any transaction: a temp table is private to `con`)."""

    def __init__(self, con, job: _FileJob, policy: Policy, now: datetime):
        self.con, self.job, self.policy, self.now = con, job, policy, now
        self.stack = contextlib.ExitStack()
        self.suspects: list[int] = []  # range line numbers (1-based) Python must validate
        self.raw: dict[int, bytes] = {}  # some suspects' bytes, read while proving the range
        self.rng: _Range | None = None
        self.path_taken = ""

    def run(self) -> _Staged:
        try:
            try:
                self._run(snapshot=False)
            except _Grew:
                self.stack.close()
                self.stack = contextlib.ExitStack()
                self._run(snapshot=True)
        except BaseException:
            self.close()
            raise
        return self

    def _run(self, snapshot: bool) -> None:
        job = self.job
        self.rng = rng = _open_range(self.stack, job.path, job.fd, job.cur.offset, job.end,
                                     job.st, snapshot)
        if rng.lines > MAX_RANGE_LINES:
            raise _Inconsistent(f"{rng.lines} lines: more than a staged INTEGER line number holds")
        self.finder = _LineFinder(rng)
        self.raw = {}
        if not self._canonical():
            self._general()
        if rng.path == job.path and os.stat(job.path).st_size != job.st.st_size:
            raise _Grew()

    def _execute_stage(self, sql: str) -> None:
        try:
            self.con.execute(sql, {"src": duckdb_path(self.rng.path),
                                   "max_ts": self.now + FUTURE_SLACK})
        except duckdb.Error as exc:
            raise _Inconsistent(f"DuckDB could not read the range: {exc}"[:300]) from None
        if self.rng.odd_lines:  # rows SQL took as clean that the validator refuses
            self.con.execute("update _ingest_stage set flags = flags & ~1 "
                             "where range_line in (select unnest(?::INTEGER[]))",
                             [self.rng.odd_lines])

    def _canonical(self) -> bool:
        """Stage the range on the canonical path; False (nothing decided) when its proof does
        not hold: the general path takes the range then."""
        con, rng, job = self.con, self.rng, self.job
        n_lines = rng.lines
        try:
            self._execute_stage(_stage_sql(self.policy, canonical=True))
        except _Inconsistent:
            return False  # read_json rejects some malformed lines read_ndjson_objects skips
        rows, known = con.execute(
            f"select count(*), coalesce(sum(known_len) filter (where {_clean()}), 0) "
            "from _ingest_stage").fetchone()
        if rows != n_lines:
            if rng.path == job.path and rows > n_lines:
                raise _Grew()
            return False  # blank lines, which DuckDB skips: the general path maps them
        con.execute("alter table _ingest_stage drop column known_len")  # 13 MB a 2M-line file
        suspects = [r[0] for r in con.execute(
            f"select range_line from _ingest_stage where not ({_clean()}) order by range_line"
        ).fetchall()]
        raw: dict[int, bytes] = {}
        cached = suspect_bytes = 0
        for k in suspects:
            line = self.finder.line(k)
            suspect_bytes += len(line)
            if cached < SUSPECT_CACHE_BYTES:
                raw[k] = line
                cached += len(line)
        # every clean line is at least `known_len` bytes long: the sum matches only if each is
        # exactly that long, i.e. holds nothing but its known keys, minified
        if known + suspect_bytes + n_lines != rng.size:
            return False
        if not self._in_file_order(n_lines):
            return False
        self.suspects, self.raw = suspects, raw
        self.path_taken = "canonical"
        return True

    def _in_file_order(self, n_lines: int) -> bool:
        """Spot-check the line numbers (a reader that skipped or reordered a line would shift
        them all): ORDER_PROBES clean rows spread over the range must each carry the event_id
        written on their line."""
        step = max(1, n_lines // ORDER_PROBES)
        probes = self.con.execute(
            f"select range_line, event_key from _ingest_stage where {_clean()} "
            "and (range_line % ? = 0 or range_line = ?)", [step, n_lines]).fetchall()
        ids = []
        for k, _ in probes:
            try:
                eid = json.loads(self.finder.line(k))["event_id"]
            except (ValueError, KeyError, TypeError):
                return False  # not a clean line: the rows are not where their numbers say
            if not isinstance(eid, str):
                return False
            ids.append(eid)
        keys = self.con.execute("select list_transform(?::VARCHAR[], x -> hash(x))",
                                [ids]).fetchone()[0]
        return keys == [key for _, key in probes]

    def _general(self) -> None:
        job, rng, con = self.job, self.rng, self.con
        n_lines = rng.lines
        skipped: list[int] = []
        for attempt in (1, 2):
            if skipped:
                con.execute("delete from _ingest_skips")
                con.executemany("insert into _ingest_skips values (?, ?)",
                                [(b - i - 1, i + 1) for i, b in enumerate(skipped)])
            self._execute_stage(_stage_sql(self.policy, canonical=False,
                                           with_skips=bool(skipped)))
            rows, bad = con.execute(
                f"select count(*), list(range_line) filter (where not ({_clean()})) "
                "from _ingest_stage").fetchone()
            if rows + len(skipped) == n_lines:
                self.suspects = sorted(set(bad or ()).union(skipped))
                self.path_taken = "general"
                return
            if rng.path == job.path and rows + len(skipped) > n_lines:
                raise _Grew()
            if attempt == 1 and rows < n_lines:
                skipped = self.finder.skipped_lines()  # blank lines: the only lines DuckDB skips
                continue
            raise _Inconsistent(f"{n_lines} lines but DuckDB read {rows} rows and "
                                f"{len(skipped)} blank lines")

    def store(self, stats: FileIngest) -> None:
        """Validate the suspects in Python and store the range with its cursor, in one
        transaction of `con`."""
        job, con, rng = self.job, self.con, self.rng
        assert rng is not None
        first = job.cur.lines
        parsed = ParsedChunk()
        cols = [parsed.columns[c] for c in EVENT_COLUMNS]
        phases = frozenset(self.policy.phase_names)
        for k in self.suspects:
            line_no = first + k
            raw = self.raw.get(k)
            if raw is None:
                raw = self.finder.line(k)
            row, text, reason = validate_line(line_bytes(raw, line_no), phases, self.now)
            if row is None:
                parsed.quarantine.append((line_no, text, reason))
            else:
                for col, value in zip(cols, (*row, job.rel, line_no), strict=True):
                    col.append(value)
        n_lines = rng.lines
        with transaction(con):
            order = _phase_order(self.policy.phase_names)
            _stage_python_rows(con, parsed, order, job.cur.lines)
            _insert_quarantine(con, parsed.quarantine, job.rel, self.now)
            kept = _store_stage(con, job.rel, job.cur, n_lines, rng.size, self.now, order)
            _commit_counts(stats, job.cur, n_lines, kept, n_lines - len(parsed.quarantine),
                           len(parsed.quarantine), rng.size)
            _save_cursor(con, job.rel, job.cur, job.st, self.now, job.fd, job.path)
            con.execute("drop table _ingest_stage")
        stats.fast_lines += n_lines - len(self.suspects)
        if self.path_taken == "canonical":
            stats.canonical_lines += n_lines - len(self.suspects)
        stats.python_lines += len(self.suspects)

    def close(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self.con.execute("drop table if exists _ingest_stage")
        self.stack.close()


# ---- per file --------------------------------------------------------------------------------

@dataclass
class _FileJob:
    path: Path
    rel: str
    fd: int
    st: os.stat_result
    cur: _Cursor
    end: int  # end of the last complete line
    stats: FileIngest
    hold_tail: bool = False  # the bytes after `end` are the rest of a line still being written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_job(con, home: RolloutHome, path: Path, now: datetime, policy: Policy) -> _FileJob:
    """Open a canary file at its cursor (a truncated file starts again)."""
    rel = home.relative(path)
    stats = FileIngest(rel)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _io_error(path, exc) from None
    try:
        st = os.fstat(fd)
        cur = _read_cursor(con, rel)
        if st.st_size < cur.offset or (cur.offset and cur.tail_hash is not None
                                       and tail_hash(fd, path, cur.offset) != cur.tail_hash):
            # The file was truncated or replaced (shorter, or other bytes before the cursor)
            # and no file holds the old bytes any more (`rotation.follow_rotations` moved those
            # it found): read it again from its first line. Already-stored events dedup by
            # event_id; the old content's cursor, batches and quarantine rows stay, under
            # `<name>#<time it was last read>`, as an archive that is gone.
            with transaction(con):
                set_aside(con, rel)
            cur = _Cursor(rotated_from=cur.rotated_from)  # an archive's name stays an archive
        elif 0 < cur.offset < st.st_size:
            # The last run took a settled last line that had no newline; the newline written
            # since ends that line, it is not an empty line of its own.
            edge = _pread(fd, 3, cur.offset - 1, path)
            ending = 2 if edge[1:3] == b"\r\n" else 1 if edge[1:2] == b"\n" else 0
            if ending and edge[:1] != b"\n":
                cur.offset += ending
                with transaction(con):
                    _save_cursor(con, rel, cur, st, now, fd, path)
            elif edge[:1] != b"\n" and _complete_truncated_line(
                    con, fd, path, rel, cur, st, now, frozenset(policy.phase_names), stats):
                # the rest of the truncated line is still being written: nothing to read yet
                return _FileJob(path, rel, fd, st, cur, cur.offset, stats, hold_tail=True)
        end = _complete_end(fd, path, cur.offset, st.st_size)
    except BaseException:
        os.close(fd)
        raise
    return _FileJob(path, rel, fd, st, cur, end, stats)


def _line_start(fd: int, path: Path, pos: int) -> int:
    """Offset of the first byte of the line that holds the byte before `pos`."""
    while pos > 0:
        n = min(BLOCK, pos)
        i = _pread(fd, n, pos - n, path).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return 0


def _complete_truncated_line(con, fd: int, path: Path, rel: str, cur: _Cursor, st,
                             now: datetime, phases: frozenset[str], stats: FileIngest) -> bool:
    """An earlier run read the file's last line before its newline, and its writer has since
    written more of it: the rest belongs to that line, not to a line of its own (every later
    line's number would be one too high). That line was quarantined as truncated once it had
    settled, or stored at once because it already was a valid event (then the rest, more than
    blanks, makes the line invalid: the event is taken back). The whole line replaces what the
    start was under its own number: stored when it is valid now, else quarantined as it reads
    whole. A rest still without its newline waits while the file is fresh (`SETTLE_SECONDS`),
    like any last line: returns True while it waits."""
    line_no = cur.lines
    held = con.execute("select 1 from quarantine where source_file = ? and line_no = ? "
                       "and starts_with(reason, 'truncated last line')",
                       [rel, line_no]).fetchone()
    end = cur.offset + _read_until_newline(fd, path, cur.offset, st.st_size)
    rest = _pread(fd, end - cur.offset, cur.offset, path)
    terminated = rest.endswith(b"\n")
    if not terminated and time.time() - st.st_mtime < SETTLE_SECONDS:
        stats.pending_bytes = st.st_size - cur.offset
        return True
    if held is None and not rest.strip():  # blanks (and its newline): the event stands
        stats.bytes_read += end - cur.offset
        cur.offset = end
        with transaction(con):
            _save_cursor(con, rel, cur, st, now, fd, path)
        return False
    start = _line_start(fd, path, cur.offset)
    whole = _pread(fd, end - start, start, path)
    parsed = parse_chunk(whole, line_no, rel, phases, now)
    if not terminated:
        parsed.quarantine = [(n, raw, f"truncated last line: {reason}")
                             for n, raw, reason in parsed.quarantine]
    if held is None:
        parsed.quarantine = [(n, raw, f"more of the line arrived after its event was read: "
                                      f"{reason}") for n, raw, reason in parsed.quarantine]
    before = _Cursor(offset=start, lines=line_no - 1)
    with transaction(con):
        if held is not None:
            con.execute("delete from quarantine where source_file = ? and line_no = ?",
                        [rel, line_no])
            taken = {"quarantined": 1}
        else:  # the event stored from the line's start (or the duplicate it counted as)
            (stored,) = con.execute(
                "delete from canary_events where line_no = ? and batch_id in (select batch_id "
                "from ingest_batches where source_file = ?)", [line_no, rel]).fetchone()
            taken = {"loaded": stored, "duplicates": 1 - stored}
        valid, kept = _store_parsed(con, parsed, end - start, rel, before, now,
                                    _phase_order(phases))
        for obj in (stats, cur):
            obj.loaded += kept - taken.get("loaded", 0)
            obj.duplicates += valid - kept - taken.get("duplicates", 0)
            obj.quarantined += len(parsed.quarantine) - taken.get("quarantined", 0)
        stats.bytes_read += end - cur.offset
        cur.offset = end
        _save_cursor(con, rel, cur, st, now, fd, path)
    stats.python_lines += 1
    return False


def _finish_job(con, job: _FileJob, policy: Policy, now: datetime) -> FileIngest:
    """The last line without its newline, then close the file."""
    try:
        if job.end < job.st.st_size and not job.hold_tail:
            _ingest_tail(con, job.fd, job.path, job.rel, job.end, job.cur,
                         frozenset(policy.phase_names), job.st, now, job.stats)
    finally:
        job.close()
    return job.stats


def ingest_file(con, home: RolloutHome, policy: Policy, path: Path, now: datetime,
                mode: str | None = None) -> FileIngest:
    """Read one canary file from its cursor: complete lines on the fast (or strict) path, then
    a last line without its newline once it has settled."""
    mode = ingest_mode(mode)
    job = _open_job(con, home, path, now, policy)
    try:
        if job.end > job.cur.offset:
            if mode == "fast":
                _prepare_session(con)
                staged = _Staged(con, job, policy, now)
                try:
                    staged.run().store(job.stats)
                except _Inconsistent as exc:
                    job.stats.fallbacks.append(str(exc))
                    _ingest_strict(con, job.fd, job.path, job.rel, job.end, job.cur,
                                   frozenset(policy.phase_names), job.st, now, job.stats)
                finally:
                    staged.close()
            else:
                _ingest_strict(con, job.fd, job.path, job.rel, job.end, job.cur,
                               frozenset(policy.phase_names), job.st, now, job.stats)
    except BaseException:
        job.close()
        raise
    return _finish_job(con, job, policy, now)


def _ingest_tail(con, fd: int, path: Path, rel: str, end: int, cur: _Cursor,
                 phases: frozenset[str], st, now: datetime, stats: FileIngest) -> None:
    """The last line has no newline yet: a writer may still be appending to it. Taken when it
    parses, or (quarantined as truncated) once the file has not changed for SETTLE_SECONDS."""
    tail = _pread(fd, st.st_size - end, end, path)
    parsed = parse_chunk(tail, cur.lines + 1, rel, phases, now)
    if parsed.quarantine and time.time() - st.st_mtime < SETTLE_SECONDS:
        stats.pending_bytes = len(tail)
        return
    parsed.quarantine = [(n, raw, f"truncated last line: {reason}")
                         for n, raw, reason in parsed.quarantine]
    _commit_parsed(con, parsed, len(tail), rel, cur, st, now, stats, phases, fd, path)


def _ingest_all_fast(con, home: RolloutHome, policy: Policy, paths: list[Path],
                     now: datetime, done: list[FileIngest] | None = None) -> list[FileIngest]:
    """The fast path over several files: DuckDB parses and checks the next file (on a second
    connection, in a thread) while this one is validated and stored. Storing stays in file
    order, one transaction per file, so "the first occurrence wins" means what it says."""
    jobs: list[_FileJob] = []
    try:
        for p in paths:
            jobs.append(_open_job(con, home, p, now, policy))
    except BaseException:
        for job in jobs:
            job.close()
        raise
    work = [j for j in jobs if j.end > j.cur.offset]
    # while file k is stored, files k+1..k+STAGING_AHEAD are parsed (numbering lines keeps each
    # parse on one core, so two parses fill two cores while the store takes what is left: a
    # 10M-event day 39.7 s -> 31.2 s on 2 cores); every file in flight has its own connection,
    # since temp tables are private to one, and the staged rows spill above the memory limit.
    ahead = STAGING_AHEAD
    cursors = [con.cursor() for _ in range(min(ahead + 1, len(work)))]
    for c in cursors:
        _prepare_session(c)
    futures: dict[int, Future] = {}
    try:
        # Each parse and the store run on their own calling thread, which works on its query
        # too: while they run at once, DuckDB's pool keeps only the workers that fill the
        # `threads` it was given (on 2 cores, 1 instead of 2 took a 10M-event ingest from
        # 20.4-24.6 s and 37-47 CPU-s to 19.5-21.1 s and 35-38 CPU-s). The last store, with
        # no parse beside it, has them all again. The setting is given back only after the
        # pool has stopped every parse.
        threads = int(con.execute("select current_setting('threads')").fetchone()[0])
        with _setting(con, "threads", max(1, threads - len(cursors) + 1)), \
                ThreadPoolExecutor(max_workers=max(1, min(ahead, len(work)))) as pool:
            def submit(i: int) -> None:
                if i < len(work) and i not in futures:
                    futures[i] = pool.submit(_Staged(cursors[i % len(cursors)], work[i],
                                                     policy, now).run)
            for i in range(ahead):
                submit(i)
            position = {id(j): k for k, j in enumerate(work)}
            for job in jobs:  # in file order: ranges, then each file's unterminated tail
                k = position.get(id(job))
                if k is not None:
                    staged: _Staged | None = None
                    pending = futures.pop(k)
                    submit(k + ahead)  # parse the next file while this one is stored
                    try:
                        staged = pending.result()
                        if not futures:  # no parse left beside this store
                            con.execute(f"set threads = {threads}")
                        staged.store(job.stats)
                    except _Inconsistent as exc:
                        job.stats.fallbacks.append(str(exc))
                        _ingest_strict(cursors[k % len(cursors)], job.fd, job.path, job.rel,
                                       job.end, job.cur, frozenset(policy.phase_names), job.st,
                                       now, job.stats)
                    finally:
                        if staged is not None:
                            staged.close()
                _finish_job(con, job, policy, now)
                if done is not None:
                    done.append(job.stats)  # committed, whatever happens to the next file
    except BaseException:
        for f in futures.values():  # parsed files not stored: release their snapshots
            if f.done() and not f.cancelled() and f.exception() is None:
                f.result().close()
        for job in jobs:
            job.close()
        raise
    finally:
        for c in cursors:
            with contextlib.suppress(duckdb.Error):
                c.execute("drop table if exists _ingest_stage")
            c.close()
    return [j.stats for j in jobs]


def ingest_canary(con, home: RolloutHome, policy: Policy, now: datetime | None = None,
                  retries: int = 3, retry_delay: float = 0.5,
                  mode: str | None = None) -> list[FileIngest]:
    """Ingest every `reports/canary/phase-*.jsonl` from its cursor. Retryable I/O faults are
    retried; a file that vanished or cannot be read raises for the caller to escalate.

    `mode` is "fast" (default) or "strict" (`ROLLOUT_INGEST_MODE`); both store the same rows."""
    now = now or _utcnow()
    mode = ingest_mode(mode)
    check_event_keys(con)
    _prepare_session(con)
    with _setting(con, "memory_limit", os.environ.get(MEMORY_LIMIT_ENV) or DEFAULT_MEMORY_LIMIT):
        return _ingest_canary(con, home, policy, now, retries, retry_delay, mode)


@contextlib.contextmanager
def _setting(con, name: str, value):
    """DuckDB setting `name` (database-wide) at `value` for the block, then as it was: its
    default by RESET when it was the default (`current_setting` shows a memory limit rounded,
    so setting that text back would shrink it a little every time), else that text."""
    current = "select current_setting(?)"
    before = con.execute(current, [name]).fetchone()[0]
    con.execute(f"set {name} = {sql_string(str(value))}")
    try:
        yield
    finally:
        with contextlib.suppress(duckdb.Error):
            con.execute(f"reset {name}")
            if con.execute(current, [name]).fetchone()[0] != before:
                con.execute(f"set {name} = {sql_string(str(before))}")


def _ingest_canary(con, home: RolloutHome, policy: Policy, now: datetime, retries: int,
                   retry_delay: float, mode: str) -> list[FileIngest]:
    # one path per file: a symlink to another canary file has the same cursor, and two jobs
    # on one cursor would read its new lines twice (the fast path opens every file first)
    by_file: dict[str, Path] = {}
    for path in home.canary_files():
        by_file.setdefault(home.relative(path), path)
    paths = list(by_file.values())
    committed: list[FileIngest] = []
    if mode == "fast" and len(paths) > 1:
        try:
            return _ingest_all_fast(con, home, policy, paths, now, committed)
        except RetryableIOError:
            pass  # a flaky file: file by file below, with retries (committed files are done)
        except duckdb.OutOfMemoryException:
            # several files staged at once did not fit the memory limit: one at a time below
            # (files already committed are done; the failed one's transaction rolled back)
            pass
    results = []
    for path in paths:
        for attempt in range(retries + 1):
            try:
                results.append(ingest_file(con, home, policy, path, now, mode))
                break
            except RetryableIOError:
                if attempt == retries:
                    raise
                time.sleep(retry_delay * (2**attempt))
    # files stored before the fallback found nothing new: report what this call read of them
    earlier = {s.source_file: s for s in committed}
    return [_merged(earlier[r.source_file], r) if r.source_file in earlier else r
            for r in results]


def _merged(a: FileIngest, b: FileIngest) -> FileIngest:
    """One file's stats over two passes of the same call."""
    out = FileIngest(a.source_file)
    for k, v in a.as_dict().items():
        if isinstance(v, int):
            setattr(out, k, v + getattr(b, k))
    out.pending_bytes = b.pending_bytes
    out.fallbacks = a.fallbacks + b.fallbacks
    return out
