"""Bad input never crashes the Collector and never vanishes (property-based, real DuckDB files).

Hypothesis writes canary files that mix valid events with every kind of damage the issue lists:
invalid JSON, wrong types, missing fields, NaN/Infinity, negative and absurd latencies, unknown
phases and kinds, timestamps without a zone or far in the future, a BOM, CRLF line ends, a
truncated last line, binary junk (and, in a separate example, lines of several MB). Each line is
generated together with what the contract says must happen to it (stored or quarantined), so the
test checks the Collector against an oracle, not against itself:

- per file, lines read = loaded + duplicates + quarantined (`ingest_files`), and lines read is
  the number of lines written;
- quarantine rows = quarantined, and every line expected bad is quarantined, every valid one
  stored or counted as a duplicate; `canary_events` holds each valid `event_id` once.

The files are appended to in two parts with an ingest after each, so the byte-offset cursor is
exercised too. Everything goes through `collect.ingest_canary` and the `canary_events` asset, the
public entry points, so the tests keep guarding the ingest whatever its internals become.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rollout_assets import collect
from rollout_assets.assets.collector import canary_events
from rollout_assets.events import RAW_KEEP
from rollout_assets.home import RolloutHome
from rollout_assets.partitions import partition_key
from rollout_assets.policy import Policy, load_policy
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.warehouse import connect
from rollout_assets_tests.conftest import DAY, stored_events

NOW = DAY + timedelta(hours=20)  # the Collector's clock in these tests
PHASES = ("A-0", "A-1", "A-2", "B-0", "B-1")
KINDS = ("autosave", "restore", "merge", "session", "crash")
OLD = (NOW - timedelta(days=1)).timestamp()  # an mtime long settled (collect.SETTLE_SECONDS)
EXAMPLES = int(os.environ.get("ROLLOUT_HYPOTHESIS_EXAMPLES", "40"))
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]

# ---- strategies: (line bytes, expected valid?, event_id if valid) ------------------------------

ts_in_day = st.integers(0, 24 * 3600 - 1).map(lambda s: DAY + timedelta(seconds=s))


@st.composite
def valid_event(draw, ids) -> dict:
    kind = draw(st.sampled_from(KINDS))
    when = draw(ts_in_day)
    offset = draw(st.sampled_from(["Z", "+00:00", "+09:00", "-05:30"]))
    local = when + {"Z": timedelta(0), "+00:00": timedelta(0), "+09:00": timedelta(hours=9),
                    "-05:30": timedelta(hours=-5, minutes=-30)}[offset]
    ev = {"event_id": draw(ids), "ts": local.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + offset,
          "phase": draw(st.sampled_from(PHASES)), "kind": kind}
    if kind == "autosave" or draw(st.booleans()):
        ev["latency_ms"] = draw(st.one_of(st.integers(0, 60_000),
                                          st.floats(0, 60_000, allow_nan=False)))
    if kind in ("autosave", "restore", "merge") or draw(st.booleans()):
        ev["ok"] = draw(st.booleans())
    if draw(st.booleans()):
        ev["conflict"] = draw(st.booleans())
    for key in ("session_id", "tenant", "environment"):
        if draw(st.booleans()):
            ev[key] = draw(st.sampled_from(["s-1", "qa", "standard", "production", "staging",
                                            "ünï-cødé"]))
    if draw(st.booleans()):
        ev["tags"] = {"observed_only": draw(st.booleans()), "dry_run": draw(st.booleans())}
    if draw(st.booleans()):  # unknown extra fields are kept, not rejected
        ev["extra"] = draw(st.one_of(st.integers(), st.text(max_size=10), st.none()))
    return ev


REQUIRED = ("event_id", "ts", "phase", "kind")
WRONG_TYPES = {
    "event_id": [5, "", None, ["x"]],
    "ts": [1737190800, None, "yesterday", "", "2025-13-45T99:00:00Z"],
    "phase": [1, "Z-9", "a-1", "A-1 ", "", None],
    "kind": ["autosave2", "", 3, None, "AUTOSAVE"],
    "latency_ms": ["812", True, [1], {"v": 1}, -1, -0.5, 1e12, 1e300, 10**400],
    "ok": ["true", 1, 0, "false"],
    "conflict": ["no", 1],
    "tags": [[], "x", 1],
    "session_id": [5, ["s"]],
    "tenant": [1, True],
    "environment": [{"a": 1}],
}


@st.composite
def damaged_event(draw, ids) -> bytes:
    """A line that breaks the contract and must be quarantined."""
    ev = draw(valid_event(ids))
    how = draw(st.sampled_from(["drop", "type", "nan", "no_zone", "future", "tags", "needs"]))
    if how == "drop":
        ev.pop(draw(st.sampled_from(REQUIRED)))
    elif how == "type":
        key = draw(st.sampled_from(sorted(WRONG_TYPES)))
        ev[key] = draw(st.sampled_from(WRONG_TYPES[key]))
    elif how == "nan":
        ev["latency_ms"] = 0.0
        text = json.dumps(ev).replace('"latency_ms": 0.0',
                                      '"latency_ms": ' + draw(st.sampled_from(
                                          ["NaN", "Infinity", "-Infinity", "1e999"])))
        return text.encode()
    elif how == "no_zone":
        ev["ts"] = draw(ts_in_day).strftime("%Y-%m-%dT%H:%M:%S")
    elif how == "future":
        ev["ts"] = (NOW + timedelta(days=draw(st.integers(30, 4000)))).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    elif how == "tags":
        ev["tags"] = {"observed_only": draw(st.sampled_from(["yes", 1, None, []]))}
        if ev["tags"]["observed_only"] is None:
            ev["tags"]["dry_run"] = "no"
    else:  # a kind that needs a field, without it
        ev["kind"] = draw(st.sampled_from(["autosave", "restore", "merge"]))
        if ev["kind"] == "autosave" and draw(st.booleans()):
            ev.pop("latency_ms", None)
            ev["ok"] = True
        else:
            ev.pop("ok", None)
            ev.setdefault("latency_ms", 1.0)
    return json.dumps(ev).encode()


junk_text = st.text(max_size=60).filter(lambda t: "\n" not in t).map(lambda t: t.encode())
junk_bytes = st.binary(max_size=60).filter(lambda b: b"\n" not in b)
NASTY = [b"", b"   ", b"{", b"}", b"[]", b"null", b"\"just a string\"", b"{\"event_id\": }",
         b'{"event_id": "x", "ts": "2025-01-18T09:00:00Z"',  # cut short
         b'{"event_id": "\\ud800", "ts": "2025-01-18T09:00:00Z", "phase": "A-1", '
         b'"kind": "session"}',  # an escaped lone surrogate cannot be stored
         b"\xef\xbb\xbf{}", b"\x00\x01\x02", b"[" * 100_000]


@st.composite
def line(draw, ids) -> tuple[bytes, bool, str | None]:
    choice = draw(st.integers(0, 9))
    if choice < 4:
        ev = draw(valid_event(ids))
        return json.dumps(ev, ensure_ascii=draw(st.booleans())).encode(), True, ev["event_id"]
    if choice < 7:
        return draw(damaged_event(ids)), False, None
    if choice == 7:
        return draw(st.sampled_from(NASTY)), False, None
    return draw(st.one_of(junk_text, junk_bytes)), False, None


def is_valid_event_line(raw: bytes) -> bool:
    """Random junk could in theory be a valid event; the oracle must never call it bad then."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and all(k in obj for k in REQUIRED)


@st.composite
def canary_file(draw):
    ids = st.sampled_from([f"ev-{i}" for i in range(40)])  # a small pool: duplicates happen
    lines = draw(st.lists(line(ids), max_size=25))
    lines = [x for x in lines if x[1] or not is_valid_event_line(x[0])]
    return {
        "lines": lines,
        "bom": draw(st.booleans()),
        "crlf": draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines))),
        "split": draw(st.integers(0, len(lines))),
        # the last line without its newline, cut in the middle when it is an event
        "unterminated": draw(st.booleans()) and bool(lines),
    }


files_strategy = st.dictionaries(
    st.sampled_from(["phase-A-1.jsonl", "phase-B-0.jsonl", "phase-misc.jsonl"]),
    canary_file(), min_size=1, max_size=3)


# ---- the oracle --------------------------------------------------------------------------------

def render(spec: dict) -> tuple[bytes, bytes, list[tuple[bool, str | None]]]:
    """Both parts of a file's bytes and what each line must become."""
    lines = list(spec["lines"])
    outcome = [(valid, eid) for _, valid, eid in lines]
    chunks = []
    for i, (raw, _, _) in enumerate(lines):
        last = i == len(lines) - 1
        if last and spec["unterminated"]:
            if outcome[i][0]:  # a valid event cut in half is no longer valid
                raw = raw[: max(1, len(raw) // 2)]
                outcome[i] = (False, None)
            raw = raw or b"{"  # an empty unterminated tail is no line at all: make it one
        if i == 0 and spec["bom"]:
            raw = b"\xef\xbb\xbf" + raw
        chunks.append(raw if last and spec["unterminated"]
                      else raw + (b"\r\n" if spec["crlf"][i] else b"\n"))
    split = min(spec["split"], len(chunks) - 1 if spec["unterminated"] else len(chunks))
    return b"".join(chunks[:split]), b"".join(chunks[split:]), outcome


def ingest(home: RolloutHome, policy: Policy) -> list:
    con = connect(home.db_path)
    try:
        return collect.ingest_canary(con, home, policy, now=NOW)
    finally:
        con.close()


def check_counts(home: RolloutHome, expected: dict[str, list[tuple[bool, str | None]]]) -> None:
    con = connect(home.db_path, read_only=True)
    try:
        files = {r[0]: r[1:] for r in con.execute(
            "select source_file, lines_read, loaded, duplicates, quarantined from ingest_files"
        ).fetchall()}
        all_valid_ids = set()
        for name, outcome in expected.items():
            rel = f"reports/canary/{name}"
            valid = sum(1 for ok, _ in outcome if ok)
            bad = len(outcome) - valid
            all_valid_ids |= {eid for ok, eid in outcome if ok}
            if not outcome:
                assert files.get(rel, (0, 0, 0, 0)) == (0, 0, 0, 0)
                continue
            lines_read, loaded, dups, quarantined = files[rel]
            assert lines_read == loaded + dups + quarantined, (rel, files[rel])
            assert lines_read == len(outcome), (rel, files[rel], outcome)
            assert quarantined == bad, (rel, files[rel], outcome)
            assert loaded + dups == valid
            q_rows = con.execute("select count(*), count(distinct line_no) from quarantine "
                                 "where source_file = ?", [rel]).fetchone()
            assert q_rows == (quarantined, quarantined)
            stored = con.execute("select count(*) from canary_event_sources "
                                 "where source_file = ?", [rel]).fetchone()[0]
            assert stored == loaded
            bad_lines = {i + 1 for i, (ok, _) in enumerate(outcome) if not ok}
            assert {r[0] for r in con.execute(
                "select line_no from quarantine where source_file = ?", [rel]).fetchall()
            } == bad_lines
        assert set(stored_events(con, "line_no", all_valid_ids)) == all_valid_ids
        assert con.execute("select count(*), count(distinct event_key) from canary_events"
                           ).fetchone() == (len(all_valid_ids),) * 2
        assert con.execute("select count(*) from quarantine where reason is null or reason = ''"
                           ).fetchone()[0] == 0
    finally:
        con.close()


@pytest.fixture(scope="module")
def project_policy() -> Policy:
    from rollout_assets.home import PROJECT_ROOT

    return load_policy(PROJECT_ROOT / "governance" / "policy.yaml")


# no shrinking: a failing example is printed as found, in seconds (shrinking one of these can take
# minutes of CI time); set ROLLOUT_HYPOTHESIS_EXAMPLES higher to search longer locally
@settings(max_examples=EXAMPLES, deadline=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=files_strategy)
def test_every_line_is_stored_or_quarantined_never_lost(project_policy, files):
    with tempfile.TemporaryDirectory() as tmp:
        home = RolloutHome(Path(tmp).resolve())
        home.canary_dir.mkdir(parents=True)
        rendered = {name: render(spec) for name, spec in files.items()}
        for name, (part1, _, _) in rendered.items():
            path = home.canary_dir / name
            path.write_bytes(part1)
            os.utime(path, (OLD, OLD))
        ingest(home, project_policy)
        for name, (_, part2, _) in rendered.items():
            path = home.canary_dir / name
            with open(path, "ab") as f:
                f.write(part2)
            os.utime(path, (OLD, OLD))
        ingest(home, project_policy)
        check_counts(home, {name: r[2] for name, r in rendered.items()})
        # a third ingest with nothing new changes nothing
        before = [(s.lines_read, s.loaded) for s in ingest(home, project_policy)]
        assert all(x == (0, 0) for x in before)
        check_counts(home, {name: r[2] for name, r in rendered.items()})


def test_a_fresh_unterminated_line_waits_then_is_quarantined(home, policy):
    """A last line without its newline may still be being written: held back while the file is
    fresh, read once complete, quarantined as truncated once the file has settled."""
    path = home.canary_dir / "phase-A-1.jsonl"
    home.canary_dir.mkdir(parents=True)
    good = json.dumps({"event_id": "a", "ts": "2025-01-18T09:00:00Z", "phase": "A-1",
                       "kind": "session"}).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"a"', b'"b"')[:30])
    ingest(home, policy)
    con = connect(home.db_path, read_only=True)
    try:
        assert con.execute("select lines_read, loaded, quarantined from ingest_files"
                           ).fetchone() == (1, 1, 0)
    finally:
        con.close()
    os.utime(path, (OLD, OLD))
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (False, None)]})


def test_the_rest_of_a_line_quarantined_as_truncated_completes_it(home, policy):
    """A writer that stalled mid-line past the settle time: the start was quarantined as a
    truncated line 2. When the rest arrives it completes line 2 (stored now that it is valid),
    and the next event is line 3, not 4 (the rest was read as a line of its own, so every later
    line number was one too high). A rest without its newline waits while fresh."""
    path = home.canary_dir / "phase-A-1.jsonl"
    home.canary_dir.mkdir(parents=True)
    ev = {"event_id": "a", "ts": "2025-01-18T09:00:00Z", "phase": "A-1", "kind": "session"}
    line = {k: json.dumps({**ev, "event_id": k}).encode() for k in "abcde"}
    path.write_bytes(line["a"] + b"\n" + line["b"][:30])
    os.utime(path, (OLD, OLD))
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (False, None)]})

    with open(path, "ab") as f:  # the rest, but still no newline: the writer is at it
        f.write(line["b"][30:40])
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (False, None)]})

    with open(path, "ab") as f:
        f.write(line["b"][40:] + b"\n" + line["c"] + b"\n")
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (True, "b"), (True, "c")]})

    # a rest that leaves the line invalid: quarantined whole, under its own number
    with open(path, "ab") as f:
        f.write(line["d"][:20])
    os.utime(path, (OLD, OLD))
    ingest(home, policy)
    with open(path, "ab") as f:
        f.write(b'oops"}\r\n' + line["e"] + b"\n")
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (True, "b"), (True, "c"),
                                            (False, None), (True, "e")]})
    con = connect(home.db_path, read_only=True)
    try:
        raw, reason = con.execute("select raw, reason from quarantine").fetchone()
    finally:
        con.close()
    assert raw == line["d"][:20].decode() + 'oops"}' and not reason.startswith("truncated")


def test_more_of_a_line_read_as_a_valid_event_takes_the_event_back(home, policy):
    """A last line without its newline that is already a valid event is read at once. If its
    writer then writes more on that line, the line is no longer that event: it is quarantined
    whole under its own number and the event is taken back, and the next line keeps its
    number (the rest was read as a line of its own: every later line number was one too high
    and the file had one line more than it holds; found by an independent audit). A newline
    alone, or blanks and a newline, change nothing."""
    path = home.canary_dir / "phase-A-1.jsonl"
    home.canary_dir.mkdir(parents=True)
    ev = {"event_id": "a", "ts": "2025-01-18T09:00:00Z", "phase": "A-1", "kind": "session"}
    line = {k: json.dumps({**ev, "event_id": k}).encode() for k in "abcde"}
    path.write_bytes(line["a"] + b"\n" + line["b"])
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (True, "b")]})
    with open(path, "ab") as f:
        f.write(b"  \n" + line["c"])
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (True, "b"), (True, "c")]})

    with open(path, "ab") as f:  # more of line 3, then line 4
        f.write(b',"note":"late"}\n' + line["d"] + b"\n")
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "a"), (True, "b"), (False, None),
                                            (True, "d")]})
    with open(path, "ab") as f:
        f.write(b'{"event_id": "bad"}\n')
    ingest(home, policy)
    con = connect(home.db_path, read_only=True)
    try:
        assert con.execute("select line_no, raw, starts_with(reason, 'more of the line "
                           "arrived after its event was read') from quarantine order by 1"
                           ).fetchall() == [
            (3, line["c"].decode() + ',"note":"late"}', True), (5, '{"event_id": "bad"}', False)]
        assert con.execute("select lines_read, loaded, duplicates, quarantined from "
                           "ingest_files").fetchall() == [(5, 3, 0, 2)]
        assert con.execute("select count(*) from canary_events").fetchone() == (3,)
    finally:
        con.close()


def test_lines_of_several_megabytes(home, policy):
    """A valid event carrying a 4 MB unknown field is stored; 6 MB of junk and a 3 MB JSON array
    on one line are quarantined; the lines around them are unaffected."""
    home.canary_dir.mkdir(parents=True)
    ev = {"event_id": "big", "ts": "2025-01-18T09:00:00Z", "phase": "A-1", "kind": "session"}
    lines = [
        json.dumps({**ev, "event_id": "before"}).encode(),
        json.dumps({**ev, "blob": "x" * (4 * 1024 * 1024)}).encode(),
        b"z" * (6 * 1024 * 1024),
        b"[" + b"1," * (1536 * 1024) + b"1]",
        json.dumps({**ev, "event_id": "after"}).encode(),
    ]
    path = home.canary_dir / "phase-A-1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    os.utime(path, (OLD, OLD))
    ingest(home, policy)
    check_counts(home, {"phase-A-1.jsonl": [(True, "before"), (True, "big"), (False, None),
                                            (False, None), (True, "after")]})
    con = connect(home.db_path, read_only=True)
    try:
        rows = con.execute("select raw, reason from quarantine order by line_no").fetchall()
    finally:
        con.close()
    # `raw` keeps the first RAW_KEEP characters of a long line, and its reason says so (it was
    # cut without a word: an auditor took the 64 KiB for the whole line)
    assert [len(raw) for raw, _ in rows] == [RAW_KEEP, RAW_KEEP]
    assert rows[0][1].startswith("invalid JSON") and rows[0][1].endswith(
        f"(raw keeps the first {RAW_KEEP} characters of {6 * 1024 * 1024} bytes)")
    assert rows[1][1].endswith(f"of {len(lines[3])} bytes)")


def test_the_canary_events_asset_survives_every_kind_of_damage(home):
    """The same guarantee through Dagster: one materialization over a file holding one line of
    each kind of damage succeeds, and its metadata balances per file."""
    home.canary_dir.mkdir(parents=True)
    good = {"event_id": "g", "ts": "2025-01-18T09:01:00Z", "phase": "A-1", "kind": "autosave",
            "latency_ms": 10.0, "ok": True}
    damaged = [json.dumps({**good, "event_id": f"d{i}", k: v}).encode()
               for i, (k, vs) in enumerate(WRONG_TYPES.items()) for v in vs[:1]]
    body = (b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\r\n" + b"\n".join(NASTY) + b"\n"
            + b"\n".join(damaged) + b"\n" + json.dumps(good).encode() + b"\n"
            + b'{"event_id": "cut", "ts": "2025-01-18T09:0')
    path = home.canary_dir / "phase-A-1.jsonl"
    path.write_bytes(body)
    os.utime(path, (OLD, OLD))
    res = dg.materialize(
        [canary_events], partition_key=partition_key(datetime(2025, 1, 18, 9, 0)),
        resources={"home": HomeResource(root=str(home.root)),
                   "warehouse": DuckDBWarehouse(path=str(home.db_path))},
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert res.success
    md = res.asset_materializations_for_node("canary_events")[0].metadata
    total = 1 + len(NASTY) + len(damaged) + 1 + 1
    assert md["run/lines_read"].value == total
    assert (md["run/loaded"].value, md["run/duplicates"].value) == (1, 1)
    assert md["run/quarantined"].value == total - 2
    check_counts(home, {"phase-A-1.jsonl": [(True, "g")] + [(False, None)] * (
        len(NASTY) + len(damaged)) + [(True, "g"), (False, None)]})
