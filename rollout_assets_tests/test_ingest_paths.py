"""The Collector's two ingest paths store the same thing.

The fast path (DuckDB decides the lines it can prove clean, Python validates the rest) and the
strict path (Python validates every line) read the same canary files into two DuckDB files on
disk; `canary_events`, `quarantine` and `ingest_files` must then be identical row for row. The
inputs are a corpus of hand-picked traps (JSON extensions DuckDB tolerates and Python does not,
type look-alikes, time stamps at the edges, blank lines, BOM/CRLF, duplicate ids across both
paths) and hypothesis-generated messy files, read in one go and appended in pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.ingest import ingest_canary, ingest_file
from rollout_assets.partitions import floor_window
from rollout_assets.policy import load_policy
from rollout_assets.warehouse import connect
from rollout_assets_tests.conftest import DAY, event, stored_events

NOW = DAY + timedelta(days=1)
POLICY = load_policy(PROJECT_ROOT / "governance" / "policy.yaml")
PHASES = ("A-0", "A-1", "A-2", "B-0", "B-1")


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def ev(**kw) -> dict:
    return event(**kw)


# ---- the two paths side by side --------------------------------------------------------------

class Twin:
    """Two rollout homes fed the same bytes; one ingests fast, the other strict."""

    def __init__(self, root: Path):
        self.homes = {m: RolloutHome((root / m).resolve()) for m in ("fast", "strict")}
        for h in self.homes.values():
            h.canary_dir.mkdir(parents=True, exist_ok=True)
        self.cons = {m: connect(h.db_path) for m, h in self.homes.items()}

    def write(self, name: str, data: bytes, mode: str = "ab") -> None:
        for h in self.homes.values():
            path = h.canary_dir / name
            with open(path, mode) as f:
                f.write(data)
            os.utime(path, (0, 0))  # long settled: an unterminated last line is taken

    def ingest(self) -> dict:
        stats = {m: ingest_canary(self.cons[m], h, POLICY, now=NOW, mode=m)
                 for m, h in self.homes.items()}
        return stats

    def tables(self, mode: str) -> tuple:
        con = self.cons[mode]
        return (
            con.execute("select * exclude (batch_id) from canary_event_sources "
                        "order by source_file, line_no").fetchall(),
            con.execute("select * from quarantine order by source_file, line_no").fetchall(),
            con.execute("select * exclude (updated_at, mtime) from ingest_files "
                        "order by source_file").fetchall(),
        )

    def assert_same(self) -> dict:
        fast, strict = self.tables("fast"), self.tables("strict")
        for name, f, s in zip(("canary_events", "quarantine", "ingest_files"), fast, strict,
                              strict=True):
            assert len(f) == len(s), (name, len(f), len(s))
            for a, b in zip(f, s, strict=True):
                assert a == b, (name, a, b)
        return {"events": len(fast[0]), "quarantined": len(fast[1])}

    def close(self) -> None:
        for c in self.cons.values():
            c.close()


@pytest.fixture
def twin(tmp_path):
    t = Twin(tmp_path)
    yield t
    t.close()


def lines(*items) -> bytes:
    out = b""
    for x in items:
        if isinstance(x, dict):
            x = compact(x)
        if isinstance(x, str):
            x = x.encode()
        out += x + b"\n"
    return out


# ---- a corpus of traps ---------------------------------------------------------------------------

def trap_corpus() -> list:
    good = compact(ev(event_id="g1"))
    return [
        b"\xef\xbb\xbf" + compact(ev(event_id="bom")).encode(),  # BOM on the first line
        compact(ev(event_id="crlf")).encode() + b"\r",
        b"", b"   ", b"\r", b"\t \r", b"\x0b", b"\x0c", b"\xc2\xa0",  # blank-ish lines
        "\x0b" + compact(ev(event_id="vt")), compact(ev(event_id="ff")) + "\x0c",
        " \x0c" + json.dumps(ev(event_id="ff-spaced")) + " \x0b\r",
        json.dumps(ev(event_id="spaced")),  # json.dumps' default ", " and ": "
        json.dumps(ev(event_id="spaced2"), indent=None, separators=(", ", " : ")),
        compact(ev(event_id="t1", ok="true")),
        compact(ev(event_id="t2", latency_ms="812")),
        compact(ev(event_id="t3", latency_ms=True)),
        compact(ev(event_id="t4", conflict="false")),
        compact(ev(event_id="t5", tenant=5)),
        compact(ev(event_id="t6", session_id=None, tenant=None)),
        compact(ev(event_id=17)),
        compact(ev(event_id="")),
        compact(ev(event_id=" lead")),
        compact(ev(event_id="\u3000")),
        compact(ev(event_id="x" * 256)),
        compact(ev(event_id="x" * 257)),
        compact(ev(event_id="é" * 200)),
        # the first character's bounds, written raw (no \u escape): 33..126 is decided in SQL
        *(json.dumps(ev(event_id=f"{c}first"), separators=(",", ":"), ensure_ascii=False)
          for c in ("!", "~", "\x7f", "é", "\u3000")),
        compact(ev(event_id="esc\"q")),
        '{"event_id":"esc\\u0041\\/","ts":"2025-01-18T09:03:12Z","phase":"A-1","kind":"session"}',
        '{"event_id":"sur\\ud800","ts":"2025-01-18T09:03:12Z","phase":"A-1","kind":"session"}',
        b'{"event_id":"bad\xff","ts":"2025-01-18T09:03:12Z","phase":"A-1","kind":"session"}',
        # JSON extensions DuckDB reads and Python's json refuses
        good[:-1] + ',"extra":NaN}',
        good[:-1] + ',"extra":-Infinity}',
        good[:-1] + ',"extra":[1,nan]}',
        good[:-1] + ',"extra":{"x":inf}}',
        good.replace("812.5", "NaN").replace('"g1"', '"n1"'),
        good.replace("812.5", "1e400").replace('"g1"', '"n2"'),
        good.replace("812.5", "1" + "0" * 30).replace('"g1"', '"n3"'),
        good[:-1] + ",}",
        good[:-1] + " ,  }",
        good.replace('"dry_run":false}', '"dry_run":false,}').replace('"g1"', '"c2"'),
        good[:-1] + ',"extra":[1,2,]}',
        # the exponent spelling of 100.0 is shorter than DuckDB's "100.0": with a trailing
        # comma and a space the line is exactly as long as its minified known keys
        compact(ev(event_id="e1", latency_ms=100.0)).replace("100.0", "1E2")[:-1] + ", }",
        compact(ev(event_id="e2", latency_ms=100.0)).replace("100.0", "1E2"),
        compact(ev(event_id="e3", latency_ms=0.001)).replace("0.001", "1e-3"),
        compact(ev(event_id="e4")).replace("812.5", "-0"),
        good[:-1] + ',"deep":' + "[" * 600 + "]" * 600 + "}",
        good[:-1] + ',"deep":' + "[" * 5000 + "]" * 5000 + "}",
        # duplicate keys: the first value wins on both paths
        '{"event_id":"d1","event_id":"d2","ts":"2025-01-18T09:03:12Z","phase":"A-1",'
        '"kind":"session"}',
        '{"event_id":"d3","ts":"2025-01-18T09:03:12Z","phase":"A-1","kind":"session",'
        '"tags":{"dry_run":true,"dry_run":false}}',
        '{"event_id":"d4","ok":"true","ok":true,"ts":"2025-01-18T09:03:12Z","phase":"A-1",'
        '"kind":"restore"}',
        # time stamps at the edges
        *(compact(ev(event_id=f"ts{i}", ts=t)) for i, t in enumerate([
            "2025-01-18T18:15:00+09:00", "2025-01-18T01:10:00-08:00", "2025-01-18T05:45:30+05:45",
            "2025-01-18T09:14:59.999Z", "2025-01-18T09:15:00z", "2025-01-18T09:03:12",
            "2025-01-18T24:00:00Z", "2025-01-18T23:59:60Z", "2025-01-18T09:03:12+24:00",
            "2025-01-18T09:03:12.1234567Z", "2025-01-18T09:03:12.1Z", "2025-01-18T09:03:12.Z",
            "2025-01-18T09:03:12+0900", "2025-01-18T09:03:12+09", "2025-01-18 09:03:12Z",
            "2025-02-29T09:03:12Z", "2025-01-18T09:03:1.5Z", " 2025-01-18T09:03:12Z",
            "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59Z",
            "2025-01-20T00:00:01Z", "2025-01-19T23:59:59Z", "2025-W03-6T09:03:12Z",
        ])),
        # ts, phase and kind are read as their string's value: a non-string reads as its own
        # text, an escaped string as the unescaped value
        compact(ev(event_id="v1", kind=1)), compact(ev(event_id="v2", kind=True)),
        compact(ev(event_id="v3", kind=["session"])), compact(ev(event_id="v4", phase={"A": 1})),
        compact(ev(event_id="v5", ts=20250118)), compact(ev(event_id="v6", phase=None)),
        compact(ev(event_id="v7")).replace('"phase":"A-1"', '"phase":NaN'),
        compact(ev(event_id="v8")).replace('"kind":"autosave"', '"kind":"autos\\u0061ve"'),
        compact(ev(event_id="v9")).replace('"phase":"A-1"', '"phase":"A\\u002d1"'),
        compact(ev(event_id="v10", ts="2025-01-18T09:03:12Z")).replace('Z"', '\\u005a"'),
        compact(ev(event_id="v11", ts="2025-01-18T09:03:12Z")).replace('Z"', 'Z\\u0000"'),
        compact(ev(event_id="v12")).replace('"kind":"autosave"', '"kind":"autosave\\n"'),
        # kinds, phases and tags
        compact(ev(event_id="k1", kind="Autosave")),
        compact(ev(event_id="k2", phase="Z-9")),
        compact(ev(event_id="k3", kind="crash", drop=["latency_ms", "ok", "conflict"])),
        compact(ev(event_id="k4", kind="merge", ok=None)),
        compact(ev(event_id="k5", tags=[])),
        compact(ev(event_id="k6", tags={"observed_only": "true"})),
        compact(ev(event_id="k7", tags={"observed_only": None, "dry_run": True})),
        compact(ev(event_id="k8", tags={"dry_run": True, "other": 1})),
        compact(ev(event_id="k9", drop=["tags"])),
        compact(ev(event_id="k10", tags=None)),
        # not JSON objects, broken and multi-line
        "not json at all", "[1,2]", '"s"', "null", "42", "{}",
        '{"event_id": "broken", "ts": ',
        '"x"}',  # with the line above, valid JSON across two lines
        '{"event_id":', '{"event_id":"after-open"}',
        compact(ev(event_id="two")) + " " + compact(ev(event_id="objects")),
        # duplicates: a clean line after a suspect line with the same id, and the reverse
        compact(ev(event_id="dupA")).replace('"ok":true', '"ok": true'),  # spaced: Python
        compact(ev(event_id="dupA", latency_ms=1.0)),  # clean: SQL, but second: dropped
        compact(ev(event_id="dupB", latency_ms=2.0)),
        compact(ev(event_id="dupB")).replace('"ok":true', '"ok": true'),
        "g1-again:" + good,
        good,
    ]


def test_trap_corpus_is_stored_identically(twin):
    twin.write("phase-A-1.jsonl", lines(*trap_corpus()))
    # an unterminated, settled last line is read too
    twin.write("phase-A-1.jsonl", compact(ev(event_id="tail")).encode())
    twin.write("phase-A-2.jsonl", lines(compact(ev(event_id="g1", phase="A-2")),
                                        compact(ev(event_id="dupA", phase="A-2")),
                                        compact(ev(event_id="only-a2", phase="A-2"))))
    stats = twin.ingest()
    counts = twin.assert_same()
    fast = {s.source_file: s for s in stats["fast"]}
    a1 = fast["reports/canary/phase-A-1.jsonl"]
    assert a1.fallbacks == [] and a1.fast_lines > 0 and a1.python_lines > 0
    assert a1.lines_read == len(trap_corpus()) + 1
    assert counts["quarantined"] > 40 and counts["events"] > 30


EDGE_TIMES = (
    "2000-01-01T00:07:00Z",  # before time_bucket's origin (2000-01-03)
    "2000-01-02T23:59:59.999999Z",
    "2025-01-18T09:14:59.999999Z", "2025-01-18T09:15:00Z", "2025-01-18T09:15:00.000001Z",
    "2025-01-18T18:14:59.5+09:00",  # 09:14:59.5 UTC
    "2025-01-18T18:15:00+09:00",  # 09:15 UTC
    "2025-01-18T03:44:59.999-05:30",  # 09:14:59.999 UTC
    "2025-01-18T23:59:59.999999Z", "2025-01-19T00:00:00Z",
)


def test_window_start_is_the_validators_window_on_every_path(twin):
    """The insert computes `window_start` from `ts` for rows decided in SQL and rows the Python
    validator accepted alike: it must be the window `partitions.floor_window` gives."""
    minified, spaced = [], []
    for i, ts in enumerate(EDGE_TIMES):
        minified.append(compact(ev(event_id=f"sql-{i}", ts=ts)))  # decided in SQL
        # "100.0" could be a re-spelt "1E2": a suspect, validated in Python
        minified.append(compact(ev(event_id=f"py-{i}", ts=ts, latency_ms=100.0)))
        spaced.append(json.dumps(ev(event_id=f"spaced-{i}", ts=ts, phase="A-2")))
    twin.write("phase-A-1.jsonl", lines(*minified))
    twin.write("phase-A-2.jsonl", lines(*spaced))
    fast = {s.source_file.split("/")[-1]: s for s in twin.ingest()["fast"]}
    canonical, general = fast["phase-A-1.jsonl"], fast["phase-A-2.jsonl"]
    assert canonical.canonical_lines == len(EDGE_TIMES) == canonical.python_lines
    assert general.canonical_lines == 0 and general.fast_lines == len(EDGE_TIMES)
    twin.assert_same()
    rows = minified + spaced
    for mode in ("fast", "strict"):
        stored = stored_events(twin.cons[mode], "ts, window_start",
                               [json.loads(r)["event_id"] for r in rows])
        assert len(stored) == len(rows), mode
        for eid, (ts, window_start) in stored.items():
            assert window_start == floor_window(ts), (mode, eid, ts, window_start)


TS_DATES = ("2025-01-18", "2024-02-29", "2025-02-29", "2025-02-30", "2025-04-31", "2025-00-10",
            "2025-13-01", "2025-01-00", "2025-01-32", "2000-01-01", "1999-12-31", "2025-01-19",
            "2025-01-20", "0000-01-01", "9999-12-31")
TS_TIMES = ("00:00:00", "09:03:12", "23:59:59", "24:00:00", "23:60:00", "23:59:60", "9:03:12",
            "09:03")
TS_FRACTIONS = ("", ".5", ".123456", ".000000", ".1234567", ".9999999", ".")
TS_ZONES = ("Z", "z", "+00:00", "-00:00", "+09:00", "-05:30", "+23:59", "-23:59", "+24:00",
            "+23:60", "+00:60", "+0900", "+09", " Z", "")


def test_every_ts_spelling_at_the_edges_is_stored_identically(twin):
    """SQL decides one `ts` spelling (a pattern, then DuckDB's cast); every value of it must be
    the instant Python's validator reads, and every spelling beyond it (24:00, offsets of 24 h,
    7 fraction digits, Feb 30, a lowercase z, no colon, dates out of range...) must reach the
    validator. A grid of dates, times, fractions and zones, on both fast paths."""
    import itertools

    spellings = ["".join((d, "T", t, f, z)) for d, t, f, z in
                 itertools.product(TS_DATES, TS_TIMES, TS_FRACTIONS, TS_ZONES)]
    twin.write("phase-A-1.jsonl", lines(*(compact(ev(event_id=f"m{i}", ts=ts))
                                          for i, ts in enumerate(spellings))))
    twin.write("phase-A-2.jsonl", lines(*(json.dumps(ev(event_id=f"s{i}", ts=ts, phase="A-2"))
                                          for i, ts in enumerate(spellings))))
    fast = {s.source_file.split("/")[-1]: s for s in twin.ingest()["fast"]}
    counts = twin.assert_same()
    canonical, general = fast["phase-A-1.jsonl"], fast["phase-A-2.jsonl"]
    assert canonical.fallbacks == [] == general.fallbacks
    # both paths decided hundreds in SQL; Python took the rest and accepted some of them
    assert canonical.canonical_lines == general.fast_lines > 300
    assert canonical.python_lines == general.python_lines > 9000
    assert canonical.loaded == general.loaded > canonical.canonical_lines
    assert counts["events"] + counts["quarantined"] == 2 * len(spellings)


def test_event_ids_first_character_is_decided_alike_on_both_fast_paths(twin):
    """SQL decides an event_id whose first byte is printable ASCII (33..126) itself, in byte
    comparisons; any other first character (space, DEL, a multibyte one, written raw) goes to
    the validator, which accepts what is not all whitespace. Both fast paths, the same rows."""
    in_sql = ["!", "~", "0", "A"]
    in_python = [" ", "\x7f", "\x1f", "é", "\u3000", "\U0001f600"]
    firsts = [*in_sql, *in_python]

    def raw(phase: str, spaced: bool) -> list[str]:
        ids = [f"{c}{phase}-{i}" for i, c in enumerate(firsts)] + ["\u3000", " "]
        sep = (", ", ": ") if spaced else (",", ":")
        return [json.dumps(ev(event_id=e, phase=phase), separators=sep, ensure_ascii=False)
                for e in ids]

    twin.write("phase-A-1.jsonl", lines(*raw("A-1", spaced=False)))
    twin.write("phase-A-2.jsonl", lines(*raw("A-2", spaced=True)))
    fast = {s.source_file.split("/")[-1]: s for s in twin.ingest()["fast"]}
    counts = twin.assert_same()
    canonical, general = fast["phase-A-1.jsonl"], fast["phase-A-2.jsonl"]
    assert canonical.canonical_lines == general.fast_lines == len(in_sql)
    assert canonical.python_lines == general.python_lines == len(in_python) + 2
    # only the two all-whitespace ids are refused
    assert canonical.quarantined == general.quarantined == 2
    assert counts["events"] == 2 * len(firsts)


@pytest.mark.parametrize("many", [False, True], ids=["looked-up", "cut-row-by-row"])
def test_labels_are_stored_alike_however_many_a_range_holds(twin, many):
    """The stage holds `tenant` and `environment` as their JSON text; the store turns a range's
    distinct texts into values and looks each row's up (or, past `_LABEL_LOOKUP_MAX` texts,
    cuts the quotes row by row). Rows decided in SQL and rows the validator accepted (spaced
    lines, escaped values), null, absent, "null" as a string and odd characters: the same."""
    from rollout_assets.ingest import _LABEL_LOOKUP_MAX

    tenants = ["beta", "null", "", "NULL", "qa'x", "é", "a b", None,
               *(f"t{i}" for i in range(_LABEL_LOOKUP_MAX + 5 if many else 3))]
    rows = []
    for i, t in enumerate(tenants):
        body = ev(event_id=f"l{i}", phase="A-2", tenant=t)
        if i % 3 == 0:
            body["environment"] = None
        elif i % 3 == 1:
            body.pop("environment", None)
        rows.append(compact(body))
        spaced = ev(event_id=f"s{i}", phase="A-2", tenant=t, environment=f"e{i % 4}")
        rows.append(json.dumps(spaced, separators=(", ", ": ")))
        # minified, but a non-ASCII value escaped ("\u00e9"): the validator's row
        rows.append(json.dumps(ev(event_id=f"x{i}", phase="A-2", tenant=t),
                               separators=(",", ":"), ensure_ascii=True))
    twin.write("phase-A-2.jsonl", lines(*rows))
    twin.ingest()
    counts = twin.assert_same()
    assert counts["events"] == len(rows)
    stored = {r[0] for r in twin.cons["fast"].execute(
        "select distinct tenant from canary_events").fetchall()}
    assert stored == set(tenants)


def test_values_read_as_strings_must_not_spell_a_non_string():
    """ts, phase and kind are read as their string's value, which a number, literal, object or
    array also has (its own text): a value SQL accepts must not be one of those texts."""
    from rollout_assets.ingest import _check_only_strings_spell

    _check_only_strings_spell(("A-1", "autosave", "Inf-1"))  # passes
    for v in ("1", "-2.5e3", "true", "null", "NaN", "-Infinity", "inf", '{"a":1}', "[]"):
        with pytest.raises(ValueError, match="non-string"):
            _check_only_strings_spell(("A-1", v))


def test_generated_traffic_is_mostly_decided_in_sql(twin):
    import numpy as np

    rng = np.random.default_rng(3)
    out = []
    for i in range(3000):
        t = DAY + timedelta(seconds=int(rng.integers(0, 86400)), milliseconds=int(i % 1000))
        off = rng.random() < 0.1
        ts = ((t + timedelta(hours=9)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+09:00") if off \
            else t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        kind = ["autosave", "restore", "merge", "session", "crash"][i % 5]
        e = ev(event_id=f"id-{int(rng.integers(0, 2800))}", ts=ts, kind=kind,
               latency_ms=float(np.round(rng.lognormal(6.4, 0.5), 1)),
               phase=PHASES[i % 5], drop=[] if kind in ("autosave", "restore", "merge")
               else ["latency_ms", "ok"])
        out.append(compact(e))
        if i % 97 == 0:
            out.append("junk " + str(i))
    twin.write("phase-B-0.jsonl", lines(*out))
    stats = twin.ingest()
    twin.assert_same()
    s = stats["fast"][0]
    assert s.fallbacks == [] and s.python_lines < 100 < s.duplicates
    # minified traffic is proven clean for the whole file at once (the canonical path)
    assert s.canonical_lines == s.fast_lines > 2900


def canonical_body(n: int = 50) -> list[str]:
    return [compact(ev(event_id=f"c{i}", latency_ms=812.5 + i)) for i in range(n)]


GOOD = compact(ev(event_id="odd"))


@pytest.mark.parametrize(("odd", "canonical", "stored"), [
    # a shorter exponent spelling (1E2 for 100.0) cannot pay for a trailing comma: lines whose
    # latency could be written shorter are validated one by one
    (compact(ev(event_id="odd", latency_ms=100.0)).replace("100.0", "1E2")[:-1] + ",}",
     True, False),
    (compact(ev(event_id="odd", latency_ms=100.0)).replace("100.0", "1E2"), True, True),
    (compact(ev(event_id="odd", latency_ms=0.001)).replace("0.001", "1e-3"), True, True),
    # extra content DuckDB tolerates in fields it does not read: the whole-range sum breaks,
    # and the general path judges every line on its own
    (GOOD[:-1] + ',"x":NaN}', False, False),
    (GOOD[:-1] + ',"x":[1,]}', False, False),
    (GOOD.replace('"dry_run":false}', '"dry_run":false,}'), False, False),
    (GOOD[:-1] + ',"x":1}', False, True),  # harmless, but not provable by length
    (GOOD.replace('"ok":true', '"ok": true'), False, True),  # spaced
    (GOOD + "\r", False, True),  # CRLF
    ("", False, False),  # a blank line: DuckDB skips it
    ("not json", True, False),  # a suspect: its own bytes are counted
    # ts/phase/kind are read as values: a non-string is a suspect (2 bytes shorter than the
    # string `known_len` counts), an escaped string is longer than its value: not provable
    (GOOD.replace('"phase":"A-1"', '"phase":1'), True, False),
    (GOOD.replace('"kind":"autosave"', '"kind":true'), True, False),
    (GOOD.replace('"phase":"A-1"', '"phase":"A\\u002d1"'), False, True),
    (GOOD.replace('"kind":"autosave"', '"kind":"autos\\u0061ve"'), False, True),
    (GOOD.replace('"odd"', '"c3"'), True, True),  # a duplicate id: still provable
    # vertical tab and form feed: whitespace to DuckDB's reader, not to Python's json (found by
    # an independent audit: the fast path stored these lines); a suspect, counted by its bytes
    ("\x0b" + GOOD, True, False),
    (GOOD + "\x0c", True, False),
    ("\x0c" + GOOD + "\x0b", True, False),
    (GOOD.replace('"ok":true', '"ok":\x0btrue'), True, False),
])
def test_canonical_proof_holds_only_for_minified_ranges(twin, odd, canonical, stored):
    body = canonical_body()
    twin.write("phase-A-1.jsonl", lines(*body[:25], odd, *body[25:]))
    stats = twin.ingest()
    twin.assert_same()
    s = stats["fast"][0]
    assert s.fallbacks == [] and s.lines_read == 51
    assert (s.canonical_lines > 0) is canonical
    stored_ids = stored_events(twin.cons["fast"], "line_no", ["odd"])
    assert ("odd" in stored_ids) is (stored and "odd" in odd)


def test_appends_truncation_and_cursor(twin):
    body = trap_corpus()
    twin.write("phase-A-1.jsonl", lines(*body[:40]))
    twin.ingest()
    twin.assert_same()
    twin.write("phase-A-1.jsonl", lines(*body[40:]))
    # a partial last line still being written stays pending on both paths
    twin.write("phase-A-1.jsonl", b'{"event_id":"partial"')
    for h in twin.homes.values():
        os.utime(h.canary_dir / "phase-A-1.jsonl")  # just written
    stats = twin.ingest()
    assert all(s.pending_bytes for s in stats["fast"])
    twin.assert_same()
    twin.write("phase-A-1.jsonl", b',"ts":"2025-01-18T09:00:00Z","phase":"A-1","kind":"session"}\n')
    twin.ingest()
    twin.assert_same()
    # the file replaced by a shorter one: read again from the start, ids already stored dedup
    twin.write("phase-A-1.jsonl", lines(*body[:5], compact(ev(event_id="new-after-truncate"))),
               mode="wb")
    twin.ingest()
    twin.assert_same()


def test_large_file_read_in_place_matches(twin, tmp_path):
    """A whole file from offset 0 is read by DuckDB in place (no snapshot copy)."""
    import sys

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from generate import generate

    generate(tmp_path / "gen", 20_000, DAY, hours=2)
    for f in sorted((tmp_path / "gen" / "reports" / "canary").glob("*.jsonl")):
        twin.write(f.name, f.read_bytes())
    stats = twin.ingest()
    twin.assert_same()
    assert sum(s.fast_lines for s in stats["fast"]) > 19_000
    assert 10 < sum(s.quarantined for s in stats["fast"]) < 30  # the generator's junk lines


# ---- hypothesis: messy files -------------------------------------------------------------------

TS = st.one_of(
    st.sampled_from(["2025-01-18T09:03:12Z", "2025-01-18T18:15:00+09:00", "2025-01-18T09:03:12",
                     "2025-01-18T09:03:12.5-02:30", "2025-01-18T24:00:00Z", "yesterday", "",
                     "2025-01-18T09:14:59.999999Z", "1999-01-01T00:00:00Z"]),
    st.builds(lambda dt, frac, off: dt.strftime("%Y-%m-%dT%H:%M:%S")
              + ("." + "7" * frac if frac else "") + off,
              st.datetimes(min_value=datetime(1998, 1, 1), max_value=datetime(2025, 1, 21)),
              st.integers(0, 7),
              st.sampled_from(["Z", "z", "+00:00", "-00:00", "+09:00", "-11:30", "+23:59",
                               "+24:00", "", "+0530"])),
    st.integers(), st.none(), st.booleans(),
)
STR = st.one_of(st.none(), st.text(max_size=4), st.sampled_from(["qa", "standard", "staging",
                                                                  "production", " ", "x" * 257]),
                st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))
BOOL = st.one_of(st.none(), st.booleans(), st.sampled_from(["true", 1, 0, "false"]))
NUM = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32),
                st.floats(min_value=0, max_value=4e6), st.integers(-5, 10**20),
                st.sampled_from(["812", True, 100.0, 0.001, 3_600_000.0, 3_600_000.5]))
EVENT = st.fixed_dictionaries(
    {"event_id": st.one_of(st.sampled_from(["a", "b", "c", "d", "é", " e"]), st.text(max_size=3),
                           st.integers(0, 3))},
    optional={
        "ts": TS,
        # ts, phase and kind are read as their values: non-strings must still be told apart
        "phase": st.one_of(st.sampled_from(PHASES), st.sampled_from(
            ["Z-9", "a-1", 1, True, float("nan"), ["A-1"], {"A": 1}])),
        "kind": st.one_of(st.sampled_from(["autosave", "restore", "merge", "session", "crash"]),
                          st.sampled_from(["Crash", "", None, 0, False, ["merge"], {}])),
        "latency_ms": NUM, "ok": BOOL, "conflict": BOOL, "session_id": STR, "tenant": STR,
        "environment": STR,
        "tags": st.one_of(st.none(), st.fixed_dictionaries(
            {}, optional={"observed_only": BOOL, "dry_run": BOOL, "x": st.integers()}),
            st.sampled_from([[], "tags", 3])),
        "extra": st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=3)),
    },
)


@st.composite
def rendered(draw) -> bytes:
    obj = draw(EVENT)
    items = list(obj.items())
    order = draw(st.permutations(range(len(items))))
    obj = {items[i][0]: items[i][1] for i in order}
    style = draw(st.sampled_from(["compact", "default", "ascii"]))

    def dump(o) -> str:
        if style == "compact":
            return json.dumps(o, separators=(",", ":"), ensure_ascii=False)
        return json.dumps(o, ensure_ascii=style == "ascii")

    text = dump(obj)
    mutation = draw(st.sampled_from(
        ["none"] * 6 + ["trailing_comma", "nan_extra", "inf_value", "dup_key", "bom", "cr",
                        "exponent", "truncate", "space_before_brace", "lone_surrogate",
                        "escaped_value"]))
    if mutation == "trailing_comma":
        text = text[:-1] + ",}"
    elif mutation == "nan_extra":
        text = text[:-1] + ',"z":' + draw(st.sampled_from(["NaN", "nan", "-Infinity", "INF"])) + "}"
    elif mutation == "inf_value" and "latency_ms" in obj:
        text = text.replace(json.dumps(obj["latency_ms"]), "Infinity", 1)
    elif mutation == "dup_key":
        text = text[:-1] + ',"event_id":"dup-second"}' if len(obj) > 1 else text
    elif mutation == "exponent":
        text = text.replace("100.0", "1E2").replace("0.001", "1e-3")
    elif mutation == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif mutation == "space_before_brace":
        text = text[:-1] + " }"
    elif mutation == "escaped_value":  # a string value whose first character is escaped
        keys = [k for k in ("ts", "phase", "kind", "event_id", "tenant")
                if isinstance(obj.get(k), str) and obj[k]]
        if keys:
            key = draw(st.sampled_from(keys))
            v = obj[key]
            escaped = f"\\u{ord(v[0]):04x}" + dump(v[1:])[1:-1] if ord(v[0]) < 0x10000 \
                else dump(v)[1:-1]
            text = dump({**obj, key: "PLACEHOLDER"}).replace('"PLACEHOLDER"', f'"{escaped}"', 1)
    elif mutation == "lone_surrogate":
        text = text.replace('"event_id"', '"event_id":"\\udc00","event_id_was"', 1)
    data = text.encode("utf-8", "surrogatepass")
    if mutation == "bom":
        data = b"\xef\xbb\xbf" + data
    if mutation == "cr":
        data += b"\r"
    return data


LINE = st.one_of(
    rendered(), rendered(), rendered(), rendered(),
    st.sampled_from([b"", b" ", b"\t\r", b"\x0c", b"{", b"[", b'{"event_id":', b"null"]),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
)


@settings(max_examples=int(os.environ.get("ROLLOUT_HYPOTHESIS_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=st.lists(st.lists(LINE, min_size=1, max_size=25), min_size=1, max_size=2),
       split=st.integers(0, 25), tail=st.booleans())
def test_messy_files_give_identical_tables(tmp_path_factory, files, split, tail):
    root = tmp_path_factory.mktemp("twin")
    twin = Twin(root)
    try:
        for i, file_lines in enumerate(files):
            # the first part, then the rest appended: the second read starts at the cursor
            twin.write(f"phase-{PHASES[i]}.jsonl", b"".join(x + b"\n" for x in file_lines[:split]))
        twin.ingest()
        twin.assert_same()
        for i, file_lines in enumerate(files):
            rest = b"".join(x + b"\n" for x in file_lines[split:])
            if tail and rest:
                rest = rest[:-1]  # an unterminated (settled) last line
            twin.write(f"phase-{PHASES[i]}.jsonl", rest)
        stats = twin.ingest()
        twin.assert_same()
        assert all(not s.fallbacks for s in stats["fast"])
        # the writer finishes the last line (its newline) and goes on
        for i, file_lines in enumerate(files):
            twin.write(f"phase-{PHASES[i]}.jsonl", b"\n" + file_lines[0] + b"\n")
        twin.ingest()
        twin.assert_same()
    finally:
        twin.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_warehouse_from_before_event_keys_is_upgraded(home, policy):
    """canary_events created with event_id, session_id, source_file and ingested_at on every
    row and no event_key/batch_id: opening the warehouse moves its rows to today's layout (keys,
    batches, label ENUMs), and a re-delivered event still counts as a duplicate."""
    import duckdb

    home.db_path.parent.mkdir(parents=True)
    old = duckdb.connect(str(home.db_path))
    old.execute("""create table canary_events (
        event_id VARCHAR NOT NULL, ts TIMESTAMP NOT NULL, window_start TIMESTAMP NOT NULL,
        phase VARCHAR NOT NULL, kind VARCHAR NOT NULL, latency_ms DOUBLE, ok BOOLEAN,
        conflict BOOLEAN, session_id VARCHAR, tenant VARCHAR, environment VARCHAR,
        observed_only BOOLEAN NOT NULL, dry_run BOOLEAN NOT NULL, source_file VARCHAR NOT NULL,
        line_no BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL)""")
    old.execute("insert into canary_events values ('old-1', TIMESTAMP '2025-01-18 09:00:00', "
                "TIMESTAMP '2025-01-18 09:00:00', 'A-1', 'session', NULL, NULL, false, NULL, "
                "NULL, NULL, false, false, 'reports/canary/phase-A-0.jsonl', 1, "
                "TIMESTAMP '2025-01-19 00:00:00')")
    old.close()
    home.canary_dir.mkdir(parents=True)
    (home.canary_dir / "phase-A-1.jsonl").write_bytes(lines(
        compact(ev(event_id="old-1", kind="session", drop=["latency_ms", "ok"])),
        compact(ev(event_id="new-1"))))
    con = connect(home.db_path)
    try:
        (s,) = ingest_canary(con, home, policy, now=NOW)
        assert (s.loaded, s.duplicates) == (1, 1)
        got = stored_events(con, "phase, kind, source_file, line_no, ingested_at",
                            ["old-1", "new-1"])
        assert got == {
            "old-1": ("A-1", "session", "reports/canary/phase-A-0.jsonl", 1,
                      datetime(2025, 1, 19)),
            "new-1": ("A-1", "autosave", "reports/canary/phase-A-1.jsonl", 2, NOW)}
        assert not con.execute("select count(*) from duckdb_tables() "
                               "where table_name = 'canary_events_old'").fetchone()[0]
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["fast", "strict"])
def test_one_file_alone_stores_its_phase_in_a_new_warehouse(home, policy, mode):
    """`ingest_file` (the Collector's API for a single file) on a warehouse whose phase ENUM
    has never seen the policy's phases: the store must make every phase storable itself, not
    rely on `ingest_canary` having grown the ENUM first."""
    home.canary_dir.mkdir(parents=True)
    path = home.canary_dir / "phase-B-0.jsonl"
    path.write_bytes(lines(ev(event_id="b0-1", phase="B-0"), ev(event_id="b0-2", phase="B-0")))
    con = connect(home.db_path)
    try:
        s = ingest_file(con, home, policy, path, NOW, mode)
        assert (s.loaded, s.quarantined) == (2, 0)
        assert stored_events(con, "phase", ["b0-1", "b0-2"]) == {
            "b0-1": ("B-0",), "b0-2": ("B-0",)}
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["fast", "strict"])
def test_a_file_replaced_by_one_as_long_or_longer_is_read_from_its_start(home, policy, mode):
    """Found by an independent audit: a file replaced between two runs by another at least as
    long (rotated and restarted, copied over, truncated and refilled) kept its cursor, so the
    new file's first lines were never read and nothing said so. The cursor's bytes are now
    fingerprinted; other bytes there mean another file."""
    home.canary_dir.mkdir(parents=True)
    path = home.canary_dir / "phase-A-1.jsonl"
    path.write_bytes(lines(*(ev(event_id=f"old{i}") for i in range(3))))
    con = connect(home.db_path)
    try:
        ingest_canary(con, home, policy, NOW, mode=mode)
        tmp = path.with_name("next.tmp")  # as long as the old file, then longer
        for n in (3, 6):
            tmp.write_bytes(lines(*(ev(event_id=f"new{n}-{i}") for i in range(n))))
            os.replace(tmp, path)
            ingest_canary(con, home, policy, NOW, mode=mode)
            ids = [f"new{n}-{i}" for i in range(n)]
            assert set(stored_events(con, "line_no", ids)) == set(ids), n
            assert con.execute("select lines_read, loaded from ingest_files where source_file "
                               "= 'reports/canary/phase-A-1.jsonl'").fetchone() == (n, n)
        # an append to the same file is still read from the cursor, not again from the start
        with open(path, "ab") as f:
            f.write(lines(ev(event_id="appended")))
        ingest_canary(con, home, policy, NOW, mode=mode)
        rows = con.execute("select source_file, lines_read, loaded, duplicates, rotated_from "
                           "from ingest_files order by lines_read").fetchall()
        # the two replaced contents keep their counts, set aside under their last read time
        old = "reports/canary/phase-A-1.jsonl"
        assert rows == [(f"{old}#20250119T000000Z", 3, 3, 0, old),
                        (f"{old}#20250119T000000Z-2", 3, 3, 0, old), (old, 7, 7, 0, None)]
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["fast", "strict"])
def test_a_symlink_to_another_canary_file_is_read_once(home, policy, mode):
    """Found by an independent audit: `phase-b.jsonl -> phase-a.jsonl` share one cursor, and
    the fast path (which opens every file before it stores any) read the new lines twice:
    '4 lines read = 1 loaded + 1 duplicates + 2 quarantined' for a file of two lines."""
    home.canary_dir.mkdir(parents=True)
    real = home.canary_dir / "phase-a.jsonl"
    real.write_bytes(lines(ev(event_id="e1"), "not json"))
    (home.canary_dir / "phase-b.jsonl").symlink_to(real.name)
    con = connect(home.db_path)
    try:
        stats = ingest_canary(con, home, policy, NOW, mode=mode)
        assert [(s.source_file, s.lines_read, s.loaded, s.quarantined) for s in stats] == [
            ("reports/canary/phase-a.jsonl", 2, 1, 1)]
        assert con.execute("select count(*) from quarantine").fetchone() == (1,)
        assert con.execute("select lines_read, loaded, duplicates, quarantined "
                           "from ingest_files").fetchall() == [(2, 1, 0, 1)]
    finally:
        con.close()


def test_cursors_from_before_the_fingerprint_keep_working(home, policy):
    """A warehouse whose `ingest_files` has no `tail_hash` yet gets the column on connect; its
    cursors carry on (no fingerprint to compare on the first run, one recorded by it)."""
    home.canary_dir.mkdir(parents=True)
    path = home.canary_dir / "phase-A-1.jsonl"
    path.write_bytes(lines(ev(event_id="a")))
    con = connect(home.db_path)
    ingest_canary(con, home, policy, NOW)
    con.execute("alter table ingest_files drop column tail_hash")
    con.close()
    with open(path, "ab") as f:
        f.write(lines(ev(event_id="b")))
    con = connect(home.db_path)
    try:
        assert con.execute("select tail_hash from ingest_files").fetchone() == (None,)
        ingest_canary(con, home, policy, NOW)
        row = con.execute("select lines_read, loaded, tail_hash from ingest_files").fetchone()
        assert row[:2] == (2, 2) and row[2] is not None
    finally:
        con.close()


def test_files_staged_together_that_do_not_fit_memory_are_read_one_at_a_time(twin, monkeypatch):
    """Parsing files ahead holds several stages at once; when DuckDB runs out of memory doing
    that, the files are read one by one and the tables are the strict path's all the same."""
    import duckdb

    from rollout_assets import ingest

    for k, phase in enumerate(PHASES):
        twin.write(f"phase-{phase}.jsonl",
                   lines(*(compact(ev(event_id=f"{phase}-{i}", phase=phase, latency_ms=900.5 + i))
                           for i in range(200 + k)), "junk"))
    real_store = ingest._Staged.store
    calls = []

    def store_once_out_of_memory(self, stats):
        calls.append(self.job.rel)
        if len(calls) == 2:  # the second file's store, with two more files staged
            raise duckdb.OutOfMemoryException("Out of Memory Error: failed to pin block")
        return real_store(self, stats)

    monkeypatch.setattr(ingest._Staged, "store", store_once_out_of_memory)
    stats = twin.ingest()
    counts = twin.assert_same()
    assert counts == {"events": sum(200 + k for k in range(5)), "quarantined": 5}
    assert [s.lines_read for s in stats["fast"]] == [201 + k for k in range(5)]


def test_a_line_longer_than_duckdbs_object_limit_is_stored_like_any_other(twin):
    """DuckDB reads at most MAX_OBJECT_BYTES a line (its buffers are twice that). Only an event
    with a big unknown field can be that long (known fields are short): it is stored like any
    other, by whichever path reads its range, exactly as the strict path stores it."""
    from rollout_assets.ingest import MAX_OBJECT_BYTES

    big = compact(ev(event_id="big", trace="x" * (4 * MAX_OBJECT_BYTES)))
    body = canonical_body()
    twin.write("phase-A-1.jsonl", lines(*body[:10], big, *body[10:]))
    stats = twin.ingest()
    twin.assert_same()
    s = stats["fast"][0]
    assert (s.lines_read, s.loaded, s.quarantined) == (len(body) + 1,) * 2 + (0,)
    assert set(stored_events(twin.cons["fast"], "line_no", ["big"])) == {"big"}


def test_parsing_files_side_by_side_leaves_no_core_oversubscribed_and_restores_settings(
        twin, monkeypatch):
    """Each parse and the store run on their own calling thread, which works on its query too:
    while they run at once DuckDB's pool keeps only the workers that fill its `threads`, the
    last store has them all, and every setting the ingest changed is as it was afterwards,
    also when a store fails."""
    from rollout_assets import ingest

    for phase in PHASES:
        twin.write(f"phase-{phase}.jsonl", lines(*(compact(ev(event_id=f"{phase}-{i}",
                                                               phase=phase))
                                                   for i in range(20))))
    con = twin.cons["fast"]
    settings = "select current_setting('threads'), current_setting('memory_limit')"
    con.execute("set threads = 4")
    default_limit = con.execute(settings).fetchone()[1]
    real_store = ingest._Staged.store
    seen, fail = [], []

    def store(self, stats):
        seen.append(con.execute("select current_setting('threads')").fetchone()[0])
        if fail:
            raise RuntimeError("store failed")
        return real_store(self, stats)

    monkeypatch.setattr(ingest._Staged, "store", store)
    twin.ingest()
    # 4 threads, 3 queries at once (two parses and a store): 2; the last store, alone: 4
    assert seen == [2, 2, 2, 2, 4]
    assert con.execute(settings).fetchone() == (4, default_limit)
    twin.write("phase-A-0.jsonl", lines(compact(ev(event_id="late-1")),
                                        compact(ev(event_id="late-2"))))
    twin.write("phase-B-0.jsonl", lines(compact(ev(event_id="late-3", phase="B-0"))))
    fail.append(True)
    with pytest.raises(RuntimeError):
        ingest.ingest_canary(con, twin.homes["fast"], POLICY, now=NOW, mode="fast")
    assert seen[5:] == [3]  # two files with new lines: two queries at once
    assert con.execute(settings).fetchone() == (4, default_limit)


# ---- finding suspect lines by number ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_lines_are_found_by_number_across_block_and_read_boundaries(tmp_path, monkeypatch, seed):
    """The newline index (counts per BLOCK, gathered READ_BUF bytes at a time) finds every line
    of a range by its number: lines ending exactly on a block edge, lines spanning many blocks,
    blank and whitespace-only lines, a range that starts inside a file and ends in a partial
    block."""
    import random

    from rollout_assets import ingest

    monkeypatch.setattr(ingest, "READ_BUF", 3 * ingest.BLOCK)  # several reads per range
    rnd = random.Random(seed)
    block = ingest.BLOCK
    lengths = [block - 1, block, 0, 2 * block + 5, 1, block - 2, 0, 3]  # edges first
    lengths += [rnd.choice((0, 1, rnd.randrange(block // 2), rnd.randrange(5 * block)))
                for _ in range(200)]
    lines = [(b" \t" if rnd.random() < 0.1 else b"x" * n)[:n] if n else b"" for n in lengths]
    for k in rnd.sample(range(len(lines)), 12):  # a vertical tab or form feed somewhere
        if lines[k]:
            i = rnd.randrange(len(lines[k]))
            lines[k] = lines[k][:i] + rnd.choice((b"\x0b", b"\x0c")) + lines[k][i + 1:]
    lines.insert(rnd.randrange(len(lines)), b"\x0b")
    data = b"".join(line + b"\n" for line in lines)
    prefix = b"skipped\n" * rnd.randrange(1, 50)  # bytes before the range
    path = tmp_path / "r.jsonl"
    path.write_bytes(prefix + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        counts, odd = ingest._scan_range(fd, path, len(prefix), len(prefix) + len(data), None)
        rng = ingest._Range(path, fd, len(prefix), len(data), counts, odd)
        assert rng.lines == len(lines)
        assert odd == [k for k, line in enumerate(lines, 1) if b"\x0b" in line or b"\x0c" in line]
        assert len(odd) >= 2
        assert len(counts) == -(-len(data) // block)
        finder = ingest._LineFinder(rng)
        order = list(range(1, len(lines) + 1))
        rnd.shuffle(order)  # any order: the block cache must not matter
        for k in order:
            assert finder.line(k) == lines[k - 1], k
        assert finder.skipped_lines() == [k for k, line in enumerate(lines, 1)
                                          if not line.strip(ingest.SKIPPED_WS)]
    finally:
        os.close(fd)
