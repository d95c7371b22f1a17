"""Rotated canary files: a file renamed away from the name the Collector read it under.

Log rotation renames `phase-A-1.jsonl` to `phase-A-1.jsonl.1` (or `...-20251129`, or copies
and truncates it) and starts a new `phase-A-1.jsonl`; the writer may append to the renamed file
until it reopens. Without this module the new file would be read from its start (correct), but
the old file's lines after the cursor were never read, its quarantine rows were deleted, and a
file renamed with nothing in its place was a "missing file" P1.

Before each ingest, `follow_rotations` looks at every cursor (`ingest_files`) whose name no
longer holds the bytes it fingerprinted (`ingest.tail_hash` of the 256 bytes before the
cursor): missing, shorter, or other bytes there. A regular file in the canary folder, or in a
folder inside it (logrotate's `olddir`), that does hold them is the same content under its
new name: the cursor, its batches and its quarantine
rows move to that name (one transaction), which is marked an **archive** (`rotated_from`).
Archives are read like canary files while they exist (the lines the writer added after the
last run are not lost), whatever their name, and one that goes away is retention, not a
collector fault. The name the file left is then new: read from its first line (stored events
still count once).

A rotated file no cursor leads to (`phase-*.jsonl.*`, `phase-*.jsonl-*`: the file was empty
or new at the last run, or rotated twice between two runs) was never read under any name: it is
adopted as an archive and read from its first line. Compressed ones cannot be read by line and
are left alone. (On the first run after an upgrade, archives left by older rotations are read
once too: their events count as duplicates.)

An archive that is gone with no copy of its bytes anywhere was deleted (rotation's retention,
or compressed): its records move aside once, to `<name>#<time it was last read>`
(`ingest.set_aside`, as a file replaced with no copy of its old bytes does), so the name is free
for the next rotation and no two contents share a name.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rollout_assets.home import COMPRESSED_SUFFIXES, RolloutHome
from rollout_assets.ingest import (
    ASIDE_NAME_RE,
    RetryableIOError,
    rename_records,
    set_aside,
    tail_hash,
)
from rollout_assets.warehouse import transaction


@dataclass(frozen=True)
class Rotation:
    source_file: str  # the name the Collector read the bytes under
    moved_to: str  # the name that holds them now (an archive)
    compressed: bool = False  # only a compressed copy holds them: unread lines are lost


def _compressed_copy(home: RolloutHome, path: Path) -> Path | None:
    """A compressed rotation of `path` (`phase-A-1.jsonl.1.gz`, `…-20250118.gz`, in any of the
    home's `rotation_dirs`), if any: the newest."""
    found = [p for folder in home.rotation_dirs()
             for pattern in (f"{path.name}.*", f"{path.name}-*")
             for p in folder.glob(pattern) if p.name.endswith(COMPRESSED_SUFFIXES)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def holds(path: Path, offset: int, fingerprint: str) -> bool | None:
    """Whether `path` holds, before `offset`, the bytes a cursor fingerprinted (`tail_hash`).
    False when it is missing, shorter or different; None when it cannot be read (the probe
    reports that). The late-data sensor's marks use it too."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size < offset:
            return False
        return tail_hash(fd, path, offset) == fingerprint
    except (OSError, RetryableIOError):
        return None
    finally:
        os.close(fd)


def fingerprint(path: Path, offset: int) -> str | None:
    """`tail_hash` of `path` at `offset` (None at 0: nothing before it to tell files apart)."""
    if offset <= 0:
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        return tail_hash(fd, path, offset)
    finally:
        os.close(fd)


def _regular_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        try:
            if stat.S_ISREG(p.lstat().st_mode):  # not a symlink to another canary file
                out.append(p)
        except OSError:
            continue
    return out


def follow_rotations(con, home: RolloutHome) -> list[Rotation]:
    """Move the records of every rotated canary file to its new name (see the module)."""
    rows = con.execute(
        "select source_file, byte_offset, tail_hash, rotated_from is not null "
        "from ingest_files where not regexp_matches(source_file, ?) order by source_file",
        [ASIDE_NAME_RE]).fetchall()  # records set aside name no file
    lost = [(rel, offset, fp) for rel, offset, fp, _ in rows
            if offset and fp is not None and holds(home.root / rel, offset, fp) is False]
    moves = _move(con, home, rows, lost) if lost else []
    _adopt_unread(con, home)
    return moves


def _adopt_unread(con, home: RolloutHome) -> None:
    """A rotated file no cursor followed was never read under any name (the file was empty or
    new at the last run, or rotated twice between two runs): it becomes an archive read from
    its first line (stored events still count once)."""
    known = {r[0] for r in con.execute("select source_file from ingest_files").fetchall()}
    unread = [p for p in home.rotated_canary_files() if home.relative(p) not in known]
    if not unread:
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    with transaction(con):
        for path in unread:
            base = path.name[:path.name.index(".jsonl") + len(".jsonl")]
            con.execute(
                "insert into ingest_files (source_file, byte_offset, lines_read, loaded, "
                "duplicates, quarantined, size_bytes, mtime, updated_at, tail_hash, "
                "rotated_from) values (?, 0, 0, 0, 0, 0, 0, 0, ?, NULL, ?)",
                [home.relative(path), now, f"{home.relative(home.canary_dir)}/{base}"])


def _move(con, home: RolloutHome, rows: list, lost: list) -> list[Rotation]:
    """Follow each lost cursor to the file that holds its bytes now (see the module)."""
    lost_names = {rel for rel, _, _ in lost}
    archives = {rel for rel, _, _, archive in rows if archive}
    settled = {rel for rel, *_ in rows} - lost_names  # names that still hold their bytes
    moves: list[Rotation] = []
    claimed: set[str] = set()
    candidates = [f for folder in home.rotation_dirs() for f in _regular_files(folder)]
    for rel, offset, fp in lost:
        for cand in candidates:
            name = home.relative(cand)
            if name == rel or name in settled or name in claimed:
                continue
            if holds(cand, offset, fp):
                moves.append(Rotation(rel, name))
                claimed.add(name)
                break
    moving = {m.source_file for m in moves}
    # Rotated and compressed at once (no `delaycompress`): the bytes are in a `.gz` the
    # Collector cannot read by line. Not a missing file (no P1, no rollback), but said: the
    # lines written after the cursor are lost.
    for rel, _, _ in lost:
        if rel not in moving and rel not in archives:
            gz = _compressed_copy(home, home.root / rel)
            if gz is not None:
                moves.append(Rotation(rel, home.relative(gz), compressed=True))
    packed = {m.source_file for m in moves if m.compressed}
    moves = [m for m in moves if not m.compressed]
    # Records whose bytes are nowhere move aside: an archive gone with no copy anywhere was
    # deleted (rotation's retention, or compressed), so later runs stop looking for it; and a
    # name a move takes over may not keep another content's records.
    gone = {rel for rel in archives & lost_names if not (home.root / rel).exists()}
    aside = sorted((gone | packed | (claimed & lost_names)) - moving)
    if not moves and not aside:
        return moves
    with transaction(con):
        for name in aside:
            set_aside(con, name)  # marked an archive: gone, never a missing-file fault
        # through temporary names: a chain (.1 -> .2 while the file -> .1) moves at once
        for i, m in enumerate(moves):
            rename_records(con, m.source_file, f"<rotating {i}>")
        for i, m in enumerate(moves):
            rename_records(con, f"<rotating {i}>", m.moved_to)
            con.execute("update ingest_files set rotated_from = ? where source_file = ?",
                        [m.source_file, m.moved_to])
    return moves + [Rotation(rel, home.relative(_compressed_copy(home, home.root / rel)), True)
                    for rel in sorted(packed)]


def archive_paths(con, home: RolloutHome) -> list[Path]:
    """The archives that still exist: read like canary files, whatever their name."""
    return [home.root / rel for (rel,) in con.execute(
        "select source_file from ingest_files where rotated_from is not null order by 1"
    ).fetchall() if (home.root / rel).is_file()]


def describe(rotations: list[Rotation]) -> list[str]:
    return [f"canary file {r.source_file} was rotated and compressed to {r.moved_to} at once: "
            "lines written to it after the last run cannot be read and are lost (use "
            "logrotate's delaycompress); a new file under its name is read from its first line"
            if r.compressed else
            f"canary file {r.source_file} was rotated to {r.moved_to}: its cursor, batches and "
            "quarantine rows follow it, its new lines are read there, and "
            f"{Path(r.source_file).name} is read again from its first line" for r in rotations]
