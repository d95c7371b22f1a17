"""Rotated canary files (log rotation: rename, then a new file under the old name), through the
real window runs: the lines written to the old file after the last run are still read (from
its new name, also when the writer appends there after the rotation), its quarantine rows stay
and follow it, the new file is read from its first line, nothing is a collector fault, and each
file's counts add up."""

from __future__ import annotations

import json
from datetime import timedelta

from rollout_assets.cli import main
from rollout_assets.runner import run_range
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.reliability_helpers import (
    T0,
    instance_of,
    promote_to,
    query,
    window_events,
)

W = timedelta(minutes=15)
BASE = "reports/canary/phase-A-1.jsonl"
ARCHIVE = BASE + ".1"


def run(home, first, last) -> None:
    assert run_range(home, first, last + W, log=lambda m: None).success


def stored(home, tag: str) -> int:
    return query(home, "select count(*) from canary_events e join ingest_batches b "
                       "using (batch_id) where e.window_start >= ? and e.window_start < ?",
                 [T0 + int(tag[1:]) * W, T0 + (int(tag[1:]) + 1) * W])[0][0]


def files(home) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query(
        home, "select source_file, lines_read, loaded, duplicates, quarantined, rotated_from "
              "from ingest_files order by 1")}


def quarantined(home) -> list[tuple]:
    return query(home, "select source_file, line_no, raw from quarantine order by all")


def append(path, lines) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def test_a_rotated_file_is_followed_to_its_new_name(home, capsys):
    promote_to(home, "A-1")
    base = home.root / BASE
    write_canary(home, "A-1", window_events("A-1", T0, "w0") + ["bad line 25"])
    run(home, T0, T0)
    assert stored(home, "w0") == 24

    # w1 lands in the file after the run; then logrotate renames it and starts a new one
    append(base, window_events("A-1", T0 + W, "w1") + ["bad line 50"])
    base.rename(home.root / ARCHIVE)
    write_canary(home, "A-1", window_events("A-1", T0 + 2 * W, "w2") + ["bad line 1 of new"])
    run(home, T0 + W, T0 + 2 * W)
    assert (stored(home, "w1"), stored(home, "w2")) == (24, 24)  # w1 was not lost
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    # the old content's records follow it; the new file's start at its line 1
    assert quarantined(home) == [(BASE, 25, "bad line 1 of new"), (ARCHIVE, 25, "bad line 25"),
                                 (ARCHIVE, 50, "bad line 50")]
    assert files(home) == {ARCHIVE: (50, 48, 0, 2, BASE), BASE: (25, 24, 0, 1, None)}

    # the writer still had the old file open: its late lines are read from the archive
    append(home.root / ARCHIVE, window_events("A-1", T0 + 3 * W, "w3"))
    run(home, T0 + 3 * W, T0 + 3 * W)
    assert stored(home, "w3") == 24
    assert files(home)[ARCHIVE] == (74, 72, 0, 2, BASE)

    # rotation deletes the archive later: retention, not a missing canary file
    (home.root / ARCHIVE).unlink()
    write_canary(home, "A-1", window_events("A-1", T0 + 4 * W, "w4"))
    run(home, T0 + 4 * W, T0 + 4 * W)
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    assert query(home, "select breach from window_verdicts where window_start = ? "
                       "and phase = 'A-1'", [T0 + 4 * W]) == [(False,)]
    # its records are set aside once: the name is free, and no run looks for it again
    aside = next(name for name in files(home) if name.startswith(ARCHIVE + "#"))
    assert files(home)[aside] == (74, 72, 0, 2, BASE)
    capsys.readouterr()
    assert main(["--home", str(home.root), "files", "list"]) == 0
    out = capsys.readouterr().out
    assert f"  {aside}: gone (an archive: no fault); rotated from {BASE}\n" in out

    # the next rotation takes the name `.1` again
    base.rename(home.root / ARCHIVE)
    write_canary(home, "A-1", window_events("A-1", T0 + 5 * W, "w5"))
    run(home, T0 + 5 * W, T0 + 5 * W)
    rows = files(home)
    assert rows[aside] == (74, 72, 0, 2, BASE)
    assert rows[ARCHIVE] == (49, 48, 0, 1, BASE) and rows[BASE] == (24, 24, 0, 0, None)
    assert [q[:2] for q in quarantined(home)] == [(ARCHIVE, 25), (aside, 25), (aside, 50)]
    total = query(home, "select count(*) from canary_events")[0][0]
    assert total == 6 * 24 == sum(r[1] for r in rows.values())  # every event counted once


def test_a_file_renamed_with_nothing_in_its_place_is_not_missing(home):
    promote_to(home, "A-1")
    base = home.root / BASE
    write_canary(home, "A-1", window_events("A-1", T0, "w0"))
    run(home, T0, T0)
    append(base, window_events("A-1", T0 + W, "w1"))
    base.rename(home.root / "reports/canary/phase-A-1.jsonl-20250118")  # dateext
    run(home, T0 + W, T0 + W)
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    assert stored(home, "w1") == 24
    assert files(home) == {"reports/canary/phase-A-1.jsonl-20250118": (48, 48, 0, 0, BASE)}
    # the writer starts the new file: read from its first line
    write_canary(home, "A-1", window_events("A-1", T0 + 2 * W, "w2"))
    run(home, T0 + 2 * W, T0 + 2 * W)
    assert stored(home, "w2") == 24 and files(home)[BASE] == (24, 24, 0, 0, None)


def test_a_file_replaced_by_other_content_is_read_from_its_start_and_the_old_kept(home):
    """No file holds the old bytes (truncated and refilled): the new content is read from its
    first line; the old content's counts and quarantine rows stay, set aside (they were
    deleted, so its bad lines vanished from the record)."""
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", T0, "w0") + ["bad line 25"])
    run(home, T0, T0)
    write_canary(home, "A-1", window_events("A-1", T0 + W, "w1"), mode="w")
    run(home, T0 + W, T0 + W)
    assert stored(home, "w1") == 24
    rows = files(home)
    aside = next(name for name in rows if name.startswith(BASE + "#"))
    assert rows == {BASE: (24, 24, 0, 0, None), aside: (25, 24, 0, 1, BASE)}
    assert quarantined(home) == [(aside, 25, "bad line 25")]
    assert query(home, "select count(*) from collector_faults") == [(0,)]


def test_two_rotations_between_runs_follow_each_file(home):
    """.1 becomes .2 while the file becomes .1 (rotate count 2), and both had lines the last
    run did not read; then the oldest is deleted while .1 is rotated once more over it."""
    promote_to(home, "A-1")
    base, one, two = (home.root / BASE, home.root / ARCHIVE,
                      home.root / "reports/canary/phase-A-1.jsonl.2")
    write_canary(home, "A-1", window_events("A-1", T0, "w0"))
    run(home, T0, T0)
    append(base, window_events("A-1", T0 + W, "w1"))
    base.rename(one)
    write_canary(home, "A-1", window_events("A-1", T0 + 2 * W, "w2"))
    run(home, T0 + W, T0 + 2 * W)
    append(one, ["late bad line"])
    append(base, window_events("A-1", T0 + 3 * W, "w3"))
    one.rename(two)
    base.rename(one)
    write_canary(home, "A-1", window_events("A-1", T0 + 4 * W, "w4"))
    run(home, T0 + 3 * W, T0 + 4 * W)
    assert [stored(home, f"w{i}") for i in range(5)] == [24] * 5
    assert files(home) == {"reports/canary/phase-A-1.jsonl.2": (49, 48, 0, 1, ARCHIVE),
                           ARCHIVE: (48, 48, 0, 0, BASE), BASE: (24, 24, 0, 0, None)}
    assert quarantined(home) == [("reports/canary/phase-A-1.jsonl.2", 49, "late bad line")]
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    # rotate count 2: .2 is deleted, .1 moves over it, the file becomes .1
    two.unlink()
    one.rename(two)
    base.rename(one)
    run(home, T0 + 5 * W, T0 + 5 * W)
    rows = files(home)
    gone = next(name for name in rows if name.startswith("reports/canary/phase-A-1.jsonl.2#"))
    assert rows[gone] == (49, 48, 0, 1, ARCHIVE)
    assert rows["reports/canary/phase-A-1.jsonl.2"] == (48, 48, 0, 0, ARCHIVE)
    assert rows[ARCHIVE] == (24, 24, 0, 0, BASE)
    assert query(home, "select count(*) from collector_faults") == [(0,)]


def test_a_rotated_file_no_cursor_had_read_is_read_from_its_first_line(home):
    """Two ways a rotated file holds lines no run read and no cursor points at (found by an
    independent audit: they were lost without a word): the file was empty at the last run
    (logrotate's `create`), then filled and rotated; and two rotations between two runs, where
    the middle generation went from the file to `.1` unread."""
    promote_to(home, "A-1")
    base, one, two = (home.root / BASE, home.root / ARCHIVE,
                      home.root / "reports/canary/phase-A-1.jsonl.2")
    write_canary(home, "A-1", [])  # created empty
    run(home, T0, T0)
    append(base, window_events("A-1", T0 + W, "w1"))
    base.rename(one)
    write_canary(home, "A-1", window_events("A-1", T0 + 2 * W, "w2"))
    run(home, T0 + W, T0 + 2 * W)
    assert (stored(home, "w1"), stored(home, "w2")) == (24, 24)
    assert files(home)[ARCHIVE] == (24, 24, 0, 0, BASE)

    # w3 is appended, then two rotations (rotate count 2) before the next run:
    append(base, window_events("A-1", T0 + 3 * W, "w3"))
    one.rename(two)
    base.rename(one)  # .2 = w1, .1 = w2 (read) + w3 (unread)
    write_canary(home, "A-1", window_events("A-1", T0 + 4 * W, "w4"))
    two.unlink()
    one.rename(two)
    base.rename(one)  # .2 = w2 + w3, .1 = w4 (never under a cursor), the file = w5
    write_canary(home, "A-1", window_events("A-1", T0 + 5 * W, "w5"))
    run(home, T0 + 3 * W, T0 + 5 * W)
    assert [stored(home, f"w{i}") for i in range(1, 6)] == [24] * 5
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    rows = files(home)
    assert rows[ARCHIVE] == (24, 24, 0, 0, BASE)  # w4: never under a cursor, read whole
    assert rows["reports/canary/phase-A-1.jsonl.2"] == (48, 48, 0, 0, BASE)  # w2 + w3
    assert sum(r[1] for r in rows.values()) == query(
        home, "select count(*) from canary_events")[0][0] == 5 * 24


def test_a_file_rotated_and_compressed_at_once_is_not_a_missing_file(home):
    """logrotate with `compress` but no `delaycompress`: the old bytes are only in a `.gz`,
    which cannot be read by line. Not a missing canary file (it paged P1 and rolled A-1 back,
    found by an independent audit): the records are set aside, the loss of the lines written
    after the last run is said in the run's log, and a new file is read from its start."""
    import gzip

    promote_to(home, "A-1")
    base = home.root / BASE
    write_canary(home, "A-1", window_events("A-1", T0, "w0"))
    run(home, T0, T0)
    append(base, window_events("A-1", T0 + W, "lost"))
    with open(base, "rb") as src, gzip.open(home.root / (ARCHIVE + ".gz"), "wb") as dst:
        dst.write(src.read())
    base.unlink()  # nothing under the name yet
    summary = run_range(home, T0 + W, T0 + 2 * W, log=lambda m: None)
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    assert query(home, "select phase from flag_state") == [("A-1",)]  # no rollback
    instance = instance_of(home)
    try:
        said = [e.user_message for e in instance.all_logs(summary.run_id)
                if "rotated and compressed" in (e.user_message or "")]
    finally:
        instance.dispose()
    assert len(said) == 1 and "are lost" in said[0] and ARCHIVE + ".gz" in said[0]
    write_canary(home, "A-1", window_events("A-1", T0 + 2 * W, "w2"))
    run(home, T0 + 2 * W, T0 + 2 * W)
    assert stored(home, "w2") == 24 and files(home)[BASE] == (24, 24, 0, 0, None)


def test_a_file_rotated_into_an_olddir_is_followed_there(home):
    """logrotate's `olddir old`: the file is renamed into `reports/canary/old/`, its next
    rotation moves it on to `.2` there, and a file that was empty at the last run is rotated
    there unread. Each is followed or adopted like a rotation beside the canary files (it was a
    missing file: P1 and a rollback of A-1; found by the last session's own review)."""
    promote_to(home, "A-1")
    base = home.root / BASE
    old = home.root / "reports/canary/old"
    write_canary(home, "A-1", window_events("A-1", T0, "w0"))
    old.mkdir()
    run(home, T0, T0)
    append(base, window_events("A-1", T0 + W, "w1"))  # after the run, then rotated
    base.rename(old / "phase-A-1.jsonl.1")
    run(home, T0 + W, T0 + W)
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    assert query(home, "select phase from flag_state") == [("A-1",)]
    assert stored(home, "w1") == 24
    assert files(home) == {"reports/canary/old/phase-A-1.jsonl.1": (48, 48, 0, 0, BASE)}

    write_canary(home, "A-1", window_events("A-1", T0 + 2 * W, "w2"))
    run(home, T0 + 2 * W, T0 + 2 * W)
    append(base, window_events("A-1", T0 + 3 * W, "w3"))
    (old / "phase-A-1.jsonl.1").rename(old / "phase-A-1.jsonl.2")
    base.rename(old / "phase-A-1.jsonl.1")
    write_canary(home, "A-1", [])  # `create`: empty, filled and rotated before the next run
    append(base, window_events("A-1", T0 + 4 * W, "w4"))
    (old / "phase-A-1.jsonl.2").unlink()  # `rotate 2`
    (old / "phase-A-1.jsonl.1").rename(old / "phase-A-1.jsonl.2")
    base.rename(old / "phase-A-1.jsonl.1")  # w4, never under a cursor
    run(home, T0 + 3 * W, T0 + 4 * W)
    assert [stored(home, f"w{i}") for i in range(5)] == [24] * 5
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    rows = files(home)
    assert rows["reports/canary/old/phase-A-1.jsonl.2"] == (48, 48, 0, 0, BASE)  # w2 + w3
    assert rows["reports/canary/old/phase-A-1.jsonl.1"] == (24, 24, 0, 0, BASE)  # w4
    assert query(home, "select count(*) from canary_events")[0][0] == 5 * 24


def test_a_current_symlink_to_dated_files_is_read_once_and_its_targets_are_archives(home):
    """The writer logs to dated files and points `phase-A-1.jsonl` at today's. A file is read
    under the name it resolves to, so each dated file is read once, under its own cursor, also
    the lines written to it after the link moved on; each is an archive of `phase-A-1.jsonl`,
    so retention deleting an old one is no missing file (each named itself as what it was
    rotated from)."""
    promote_to(home, "A-1")
    canary = home.root / "reports/canary"
    write_canary(home, "A-1", [])
    (canary / "phase-A-1.jsonl").unlink()
    day1, day2 = canary / "phase-A-1.jsonl-20250118", canary / "phase-A-1.jsonl-20250119"
    d1, d2 = (f"reports/canary/{p.name}" for p in (day1, day2))
    append(day1, window_events("A-1", T0, "w0"))
    (canary / "phase-A-1.jsonl").symlink_to(day1.name)
    run(home, T0, T0)
    assert files(home) == {d1: (24, 24, 0, 0, BASE)}  # read once

    append(day1, window_events("A-1", T0 + W, "w1"))  # after the run, before the switch
    append(day2, window_events("A-1", T0 + 2 * W, "w2"))
    (canary / "phase-A-1.jsonl").unlink()
    (canary / "phase-A-1.jsonl").symlink_to(day2.name)
    run(home, T0 + W, T0 + 2 * W)
    assert [stored(home, f"w{i}") for i in range(3)] == [24] * 3
    assert files(home) == {d1: (48, 48, 0, 0, BASE), d2: (24, 24, 0, 0, BASE)}
    day1.unlink()  # retention
    run(home, T0 + 3 * W, T0 + 3 * W)
    assert query(home, "select count(*) from collector_faults") == [(0,)]
    assert query(home, "select phase from flag_state") == [("A-1",)]
