"""Collector I/O faults (seed §7.4): a canary file that is missing or cannot be read.

The Collector probes every canary file before it ingests:
- a **retryable** fault (EIO, EAGAIN, a stale handle: the disk or the network may recover) is
  retried with back-off; if it still fails it is recorded with `retryable = true`;
- a **non-retryable** fault (permission denied, not a regular file, or a file the Collector has
  read before that is gone) is recorded at once with `retryable = false`.

The healthy files are still ingested. Faults are stored per (window, phase of the file) in
`collector_faults`, replaced with each run of those windows, and the Analyzer turns them into
verdicts (`apply_faults`): retryable=false -> breach, `rollback_required`, level P1;
retryable=true -> breach, level at least P2 (paged), no rollback. The failed SLO is named
`collector_io` / `collector_io_retryable`, so reports, pages and SQL show what happened.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from rollout_assets import collect
from rollout_assets.home import RolloutHome
from rollout_assets.ingest import set_aside
from rollout_assets.policy import Policy
from rollout_assets.scoring import Verdict, max_level
from rollout_assets.warehouse import transaction

PROBE_RETRIES = 3
PROBE_DELAY_SECONDS = 0.2  # doubled after each attempt: 0.2 + 0.4 + 0.8 s
NON_RETRYABLE_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR,
                                  errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EROFS})
HARD_SLO, SOFT_SLO = "collector_io", "collector_io_retryable"
# what the ingest raises for a file it could not read (it retries RetryableIOError itself)
_RETRYABLE_INGEST_ERROR = getattr(collect, "RetryableIOError", OSError)
IO_ERRORS = (OSError, _RETRYABLE_INGEST_ERROR)
_PHASE_FROM_NAME = re.compile(r"^phase-(.+)\.jsonl$")


@dataclass(frozen=True)
class FileFault:
    source_file: str  # relative to the home
    retryable: bool
    reason: str
    attempts: int


class NotARegularFile(OSError):
    def __init__(self, path: Path):
        super().__init__(errno.EISDIR, "not a regular file", str(path))


def is_retryable(exc: BaseException) -> bool:
    """An OSError whose errno says the condition may clear; anything else is not retryable."""
    if isinstance(exc, _RETRYABLE_INGEST_ERROR) and not isinstance(exc, OSError):
        return True
    if isinstance(exc, OSError):
        return exc.errno is not None and exc.errno not in NON_RETRYABLE_ERRNOS
    return False


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"[:200]


def _read_probe(path: Path) -> None:
    st = os.stat(path)  # follows symlinks: a dangling one is ENOENT
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(path)
    with open(path, "rb") as f:
        f.read(1)


def probe_file(path: Path, rel: str, retries: int = PROBE_RETRIES,
               delay: float = PROBE_DELAY_SECONDS,
               on_retry: Callable[[int, BaseException], None] | None = None) -> FileFault | None:
    """None if `path` can be opened and read; else the fault after retrying retryable errors."""
    for attempt in range(1, retries + 2):
        try:
            _read_probe(path)
            return None
        except OSError as exc:
            retryable = is_retryable(exc)
            if not retryable or attempt > retries:
                return FileFault(rel, retryable, describe(exc), attempt)
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def known_files(con, archives: bool = True) -> list[str]:
    """Canary files the Collector has read before (relative paths from `ingest_files`), with
    or without the archives rotation left (`rotation.py`)."""
    where = "" if archives else " where rotated_from is null"
    return [r[0] for r in con.execute(
        f"select source_file from ingest_files{where} order by 1").fetchall()]


def check_canary_files(con, home: RolloutHome, retries: int = PROBE_RETRIES,
                       delay: float = PROBE_DELAY_SECONDS,
                       on_retry: Callable[[str, int, BaseException], None] | None = None,
                       ) -> tuple[list[FileFault], set[Path]]:
    """Probe every canary file; a known file that vanished is a non-retryable fault.
    Returns the faults and the paths the ingest must skip."""
    faults: list[FileFault] = []
    skip: set[Path] = set()
    listed = home.canary_files()
    listed_rel = {home.relative(p) for p in listed} | {str(p.relative_to(home.root))
                                                       for p in listed}
    for path in listed:
        rel = str(path.relative_to(home.root))
        fault = probe_file(path, rel, retries, delay,
                           (lambda n, e, rel=rel: on_retry(rel, n, e)) if on_retry else None)
        if fault:
            faults.append(fault)
            skip.add(path)
    for rel in known_files(con, archives=False):  # an archive that goes is retention
        if rel not in listed_rel and not (home.root / rel).exists():
            faults.append(FileFault(rel, False, "ENOENT: canary file missing (read before)", 1))
    return faults, skip


class ForgetError(ValueError):
    """A canary file that cannot be forgotten: unknown, ambiguous, or still there."""


def known_file(con, home: RolloutHome, name: str) -> str:
    """The `ingest_files` entry `name` means: its path relative to the home, an absolute path,
    or a bare file name (`phase-A-2.jsonl`) when only one known file has it."""
    known = known_files(con)
    path = Path(name)
    if path.is_absolute() or path.parent != Path("."):
        matches = [rel for rel in (name, home.relative(home.root / path)) if rel in known][:1]
    else:
        matches = [rel for rel in known if Path(rel).name == name]
    if len(matches) > 1:
        raise ForgetError(f"{name}: matches {', '.join(matches)}; give the path")
    if not matches:
        gone = con.execute(
            "select source_file, actor, forgotten_at from forgotten_files where source_file = ? "
            "or source_file like '%/' || ? order by forgotten_at desc limit 1",
            [name, Path(name).name]).fetchone()
        if gone:
            raise ForgetError(f"{gone[0]} was already forgotten (by {gone[1]}, "
                              f"{gone[2]:%Y-%m-%d %H:%M} UTC)")
        raise ForgetError(f"{name}: the Collector has not read such a file")
    return matches[0]


def forget_file(con, home: RolloutHome, name: str, reason: str, actor: str,
                now: datetime) -> str:
    """An operator's word that a canary file read before is gone for good (retired, rotated
    away): the Collector stops raising it as a P1 fault. Its events stay stored; its cursor
    moves to `forgotten_files` with who and why. A file of that name written later is read
    from its first line, and events already stored still count once."""
    if not reason.strip():
        raise ForgetError("--reason is required: say why the file is gone")
    rel = known_file(con, home, name)
    if (home.root / rel).exists():
        raise ForgetError(f"{rel} is still there: only a file that is gone can be forgotten")
    with transaction(con):
        loaded = con.execute(
            "insert into forgotten_files select source_file, byte_offset, lines_read, loaded, "
            "?, ?, ? from ingest_files where source_file = ? returning loaded",
            [reason, actor, now, rel]).fetchone()[0]
        # its cursor, batches and quarantine rows move aside together, as a replaced file's
        # do (an archive that is gone, never a fault): a file of that name written later
        # starts with records of its own (its quarantine rows were mixed with the old ones)
        set_aside(con, rel)
    return (f"forgot {rel}: its {loaded} events stay stored and it is no longer a collector "
            "fault (re-run the windows it faulted to clear their verdicts)")


class _SomeFilesHome(RolloutHome):
    """The home as the ingest sees it: the canary files that passed the probe, and the
    archives rotation left (`extra`, read whatever their name)."""

    def __init__(self, root: Path, skip: Iterable[Path] = (), only: Path | None = None,
                 extra: Iterable[Path] = ()):
        super().__init__(root)
        object.__setattr__(self, "_skip", frozenset(skip))
        object.__setattr__(self, "_only", only)
        object.__setattr__(self, "_extra", tuple(extra))

    def canary_files(self) -> list[Path]:
        files = sorted({*super().canary_files(), *self._extra} - self._skip)
        return [p for p in files if p == self._only] if self._only else files


def ingest_isolated(con, home: RolloutHome, policy: Policy, skip: set[Path],
                    ingest: Callable, archives: Iterable[Path] = ()
                    ) -> tuple[list, list[FileFault]]:
    """Ingest every file not in `skip` (and the `archives`) in one call; if that call hits an
    I/O error anyway (a file failed past its first byte), ingest file by file so one bad file
    cannot hold back the rest. Non-I/O errors propagate: they are bugs, not faults."""
    archives = tuple(archives)
    try:
        return ingest(con, _SomeFilesHome(home.root, skip, extra=archives), policy), []
    except IO_ERRORS:
        pass
    stats, faults = [], []
    for path in _SomeFilesHome(home.root, skip, extra=archives).canary_files():
        try:
            stats.extend(ingest(con, _SomeFilesHome(home.root, only=path, extra=archives),
                                policy))
        except IO_ERRORS as exc:
            faults.append(FileFault(str(path.relative_to(home.root)), is_retryable(exc),
                                    f"while ingesting: {describe(exc)}", 1))
    return stats, faults


def phases_of(con, rel: str, policy: Policy) -> list[str]:
    """The phases a canary file feeds: the one its name says (`phase-A-1.jsonl` -> A-1), else
    the phases of the events stored from it; all phases when neither says (a file never read,
    or none of whose lines was an event), since its events could belong to any."""
    m = _PHASE_FROM_NAME.match(Path(rel).name)
    if m and m.group(1) in policy.phase_names:
        return [m.group(1)]
    fed = {r[0] for r in con.execute(
        "select distinct phase::VARCHAR from canary_events where batch_id in "
        "(select batch_id from ingest_batches where source_file = ?)", [rel]).fetchall()}
    return [p for p in policy.phase_names if p in fed] or list(policy.phase_names)


def record_faults(con, policy: Policy, windows: list[datetime], end: datetime,
                  faults: list[FileFault], now: datetime) -> None:
    """Replace `collector_faults` for the run's windows, in one transaction."""
    rows = [[w, phase, f.source_file, f.retryable, f.reason, f.attempts, now]
            for f in faults for phase in phases_of(con, f.source_file, policy) for w in windows]
    with transaction(con):
        con.execute("delete from collector_faults where window_start >= ? and window_start < ?",
                    [windows[0], end])
        if rows:
            con.executemany("insert or replace into collector_faults values (?, ?, ?, ?, ?, ?, ?)",
                            rows)


def load_faults(con, first: datetime, end: datetime) -> dict[tuple, list[FileFault]]:
    out: dict[tuple, list[FileFault]] = {}
    for ws, phase, rel, retryable, reason, attempts in con.execute(
        "select window_start, phase, source_file, retryable, reason, attempts "
        "from collector_faults where window_start >= ? and window_start < ? order by all",
        [first, end],
    ).fetchall():
        out.setdefault((ws, phase), []).append(FileFault(rel, retryable, reason, attempts))
    return out


def apply_faults(policy: Policy, verdicts: list[Verdict],
                 faults: dict[tuple, list[FileFault]]) -> list[Verdict]:
    """Escalate the verdicts of (window, phase) pairs whose canary file could not be read."""
    out = []
    for v in verdicts:
        fs = faults.get((v.window_start, v.phase))
        if not fs:
            out.append(v)
            continue
        hard = any(not f.retryable for f in fs)
        previous = policy.previous_phase(v.phase)
        rollback = v.rollback_required or (
            hard and policy.phase(v.phase).rollback_allowed and previous is not None)
        out.append(replace(
            v, status="breach", breach=True, rollback_required=rollback,
            rollback_to=previous if rollback else None,
            level=max_level([v.level, "P1" if hard else "P2"]),
            failed_slos=[*v.failed_slos, HARD_SLO if hard else SOFT_SLO],
        ))
    return out
