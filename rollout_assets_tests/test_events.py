"""The canary event contract (DESIGN Part 1, "Input event"): every line becomes an event or a
quarantine entry with a reason; types are strict; time zones are converted to UTC windows."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from rollout_assets.events import Reject, parse_chunk, validate_event
from rollout_assets_tests.conftest import DAY, event

PHASES = frozenset({"A-0", "A-1", "A-2", "B-0", "B-1"})
NOW = DAY + timedelta(days=1)  # never "now": the day under test is already closed


def ok(obj_or_text) -> dict:
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    row = validate_event(text, PHASES, NOW)
    keys = ("event_id", "ts", "window_start", "phase", "kind", "latency_ms", "ok", "conflict",
            "session_id", "tenant", "environment", "observed_only", "dry_run")
    assert len(row) == len(keys)
    return dict(zip(keys, row, strict=True))


def reason(obj_or_text) -> str:
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    with pytest.raises(Reject) as err:
        validate_event(text, PHASES, NOW)
    return str(err.value)


# ---- accepted ----------------------------------------------------------------------------------

def test_the_contract_example_is_accepted():
    e = ok(event())
    assert e == dict(event_id="e-1", ts=datetime(2025, 1, 18, 9, 3, 12, 123000),
                     window_start=datetime(2025, 1, 18, 9, 0), phase="A-1", kind="autosave",
                     latency_ms=812.5, ok=True, conflict=False, session_id="s-42", tenant="qa",
                     environment="production", observed_only=False, dry_run=False)


@pytest.mark.parametrize("ts,utc,window", [
    ("2025-01-18T18:03:12+09:00", datetime(2025, 1, 18, 9, 3, 12), datetime(2025, 1, 18, 9, 0)),
    # 18:15 in Tokyo is 09:15 UTC: the first instant of the 09:15 window
    ("2025-01-18T18:15:00+09:00", datetime(2025, 1, 18, 9, 15), datetime(2025, 1, 18, 9, 15)),
    ("2025-01-18T18:14:59.999+09:00", datetime(2025, 1, 18, 9, 14, 59, 999000),
     datetime(2025, 1, 18, 9, 0)),
    # 09:15 written in +09:00 is the previous UTC day's 00:15 window
    ("2025-01-18T09:15:00+09:00", datetime(2025, 1, 18, 0, 15), datetime(2025, 1, 18, 0, 15)),
    ("2025-01-18T01:10:00-08:00", datetime(2025, 1, 18, 9, 10), datetime(2025, 1, 18, 9, 0)),
    ("2025-01-18T09:14:59.999Z", datetime(2025, 1, 18, 9, 14, 59, 999000),
     datetime(2025, 1, 18, 9, 0)),
    ("2025-01-18T09:15:00.000Z", datetime(2025, 1, 18, 9, 15), datetime(2025, 1, 18, 9, 15)),
    ("2025-01-18T09:15:00z", datetime(2025, 1, 18, 9, 15), datetime(2025, 1, 18, 9, 15)),
    ("2025-01-18T09:44:00+00:00", datetime(2025, 1, 18, 9, 44), datetime(2025, 1, 18, 9, 30)),
    ("2025-01-18T05:45:30+05:45", datetime(2025, 1, 18, 0, 0, 30), datetime(2025, 1, 18, 0, 0)),
])
def test_ts_offsets_are_converted_to_the_utc_window(ts, utc, window):
    e = ok(event(ts=ts))
    assert (e["ts"], e["window_start"]) == (utc, window)
    assert e["ts"].tzinfo is None  # naive UTC, as DuckDB TIMESTAMP stores it


def test_missing_tags_means_both_false():
    e = ok(event(drop=["tags"]))
    assert (e["observed_only"], e["dry_run"]) == (False, False)
    e = ok(event(tags={}))
    assert (e["observed_only"], e["dry_run"]) == (False, False)
    e = ok(event(tags={"observed_only": True}))
    assert (e["observed_only"], e["dry_run"]) == (True, False)


def test_unknown_extra_fields_are_kept_not_rejected():
    e = ok(event(client_version="3.1.4", nested={"a": [1, 2]}, tags={"dry_run": True, "x": 1}))
    assert e["event_id"] == "e-1" and e["dry_run"] is True


def test_optional_fields_may_be_absent():
    e = ok(event(kind="session", drop=["latency_ms", "ok", "conflict", "session_id", "tenant",
                                       "environment"]))
    assert (e["kind"], e["latency_ms"], e["ok"], e["conflict"], e["tenant"]) == (
        "session", None, None, False, None)


def test_an_integer_latency_is_a_number():
    assert ok(event(latency_ms=10))["latency_ms"] == 10.0
    assert ok(event(latency_ms=0))["latency_ms"] == 0.0


# ---- every rejection reason --------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    ("", "empty line"),
    ("   \t", "empty line"),
    ('{"event_id": "e", ', "invalid JSON"),
    ("not json at all", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
    ('["e-1", "2025-01-18T09:03:12Z"]', "must be a JSON object, got list"),
    ('"just a string"', "must be a JSON object, got str"),
    ("null", "must be a JSON object"),
    ("42", "must be a JSON object"),
])
def test_not_an_object(line, expected):
    assert expected in reason(line)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(constant):
    line = json.dumps(event()).replace("812.5", constant)
    assert constant in line
    assert reason(line) == f"non-finite number {constant}"


def test_an_overflowing_float_is_not_finite():
    line = json.dumps(event()).replace("812.5", "1e400")
    assert reason(line) == "latency_ms is not finite"


@pytest.mark.parametrize("overrides,expected", [
    ({"drop": ["event_id"]}, "missing field event_id"),
    ({"event_id": ""}, "event_id must be a non-empty string"),
    ({"event_id": "   "}, "event_id must be a non-empty string"),
    ({"event_id": 17}, "event_id must be a non-empty string"),
    ({"event_id": "x" * 257}, "event_id longer than 256 characters"),
    ({"drop": ["ts"]}, "missing field ts"),
    ({"ts": None}, "ts must be an ISO-8601 string"),
    ({"ts": 1737190992}, "ts must be an ISO-8601 string"),
    ({"ts": "yesterday"}, "ts is not ISO-8601"),
    ({"ts": ""}, "ts is not ISO-8601"),
    ({"ts": "2025-01-18T09:03:12"}, "ts has no time zone"),
    ({"ts": "2025-01-18T09:03:12.123"}, "ts has no time zone"),
    ({"ts": "2025-01-18"}, "ts has no time zone"),
    ({"ts": "1999-12-31T23:59:59Z"}, "ts before 2000-01-01"),
    ({"ts": "2025-01-20T00:00:01Z"}, "ts more than a day in the future"),
    ({"drop": ["phase"]}, "missing field phase"),
    ({"phase": "Z-9"}, "unknown phase 'Z-9'"),
    ({"phase": "a-1"}, "unknown phase 'a-1'"),
    ({"phase": 1}, "unknown phase '1'"),
    ({"drop": ["kind"]}, "missing field kind"),
    ({"kind": "Autosave"}, "unknown kind 'Autosave'"),
    ({"kind": ["autosave"]}, "unknown kind"),
    ({"latency_ms": "812.5"}, "latency_ms must be a number"),
    ({"latency_ms": True}, "latency_ms must be a number"),
    ({"latency_ms": -0.5}, "latency_ms is negative"),
    ({"latency_ms": 3_600_000.5}, "latency_ms above one hour"),
    ({"drop": ["latency_ms"]}, "autosave event without latency_ms"),
    ({"latency_ms": None}, "autosave event without latency_ms"),
    ({"ok": "true"}, "ok must be a boolean, got str"),
    ({"ok": 1}, "ok must be a boolean, got int"),
    ({"ok": 0}, "ok must be a boolean, got int"),
    ({"drop": ["ok"]}, "autosave event without ok"),
    ({"kind": "restore", "drop": ["ok"]}, "restore event without ok"),
    ({"kind": "merge", "ok": None}, "merge event without ok"),
    ({"conflict": "false"}, "conflict must be a boolean, got str"),
    ({"tags": []}, "tags must be an object"),
    ({"tags": "observed_only"}, "tags must be an object"),
    ({"tags": {"observed_only": "true"}}, "observed_only must be a boolean, got str"),
    ({"tags": {"dry_run": 1}}, "dry_run must be a boolean, got int"),
    ({"session_id": 42}, "session_id must be a string, got int"),
    ({"tenant": ["qa"]}, "tenant must be a string, got list"),
    ({"environment": True}, "environment must be a string, got bool"),
    ({"tenant": "q" * 300}, "tenant longer than 256 characters"),
])
def test_every_rejection_reason(overrides, expected):
    assert reason(event(**overrides)).startswith(expected)


def test_the_first_reason_wins():
    # no time zone and an unknown phase: the ts reason comes first, deterministically
    assert reason(event(ts="2025-01-18T09:03:12", phase="Z-9")) == "ts has no time zone"


def test_a_day_of_clock_skew_is_tolerated():
    assert ok(event(ts="2025-01-19T23:59:59Z"))["ts"] == datetime(2025, 1, 19, 23, 59, 59)


def test_a_huge_integer_latency_is_a_reason_not_a_crash():
    line = json.dumps(event()).replace("812.5", "1" + "0" * 400)
    assert reason(line) == "latency_ms is not finite"


@pytest.mark.parametrize("ts", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00"])
def test_a_ts_that_overflows_in_utc_is_a_reason_not_a_crash(ts):
    assert reason(event(ts=ts)).startswith("ts ")


# ---- parse_chunk: bytes in, columns + quarantine out ---------------------------------------------

def lines(*objs) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n"
                    for o in objs)


def chunk(data: bytes, first_line_no: int = 1):
    out = parse_chunk(data, first_line_no, "reports/canary/phase-A-1.jsonl", PHASES, NOW)
    # the conservation law every caller relies on
    assert out.lines_read == len(out.columns["event_id"]) + len(out.quarantine)
    return out


def test_bom_crlf_and_blank_lines():
    data = (b"\xef\xbb\xbf" + json.dumps(event(event_id="a")).encode() + b"\r\n"
            + b"\r\n"
            + json.dumps(event(event_id="b")).encode() + b"\r\n"
            + b"\n"
            + json.dumps(event(event_id="c")).encode() + b"\n")
    out = chunk(data)
    assert out.columns["event_id"] == ["a", "b", "c"]
    assert out.columns["line_no"] == [1, 3, 5]
    assert out.columns["source_file"] == ["reports/canary/phase-A-1.jsonl"] * 3
    # a blank line is a line read: it is quarantined with its number, never silently dropped
    assert [(n, r) for n, _, r in out.quarantine] == [(2, "empty line"), (4, "empty line")]
    assert out.lines_read == 5


def test_a_bom_after_the_first_chunk_is_not_stripped():
    data = b"\xef\xbb\xbf" + json.dumps(event(event_id="a")).encode() + b"\n"
    out = chunk(data, first_line_no=7)
    assert out.quarantine and out.quarantine[0][0] == 7 and "invalid JSON" in out.quarantine[0][2]


def test_non_utf8_line_is_quarantined_with_its_number():
    bad = json.dumps(event(event_id="x", tenant="qa")).encode().replace(b'"qa"', b'"q\xe9a"')
    out = chunk(lines(event(event_id="a"), bad, event(event_id="b")))
    assert out.columns["event_id"] == ["a", "b"]
    assert len(out.quarantine) == 1
    line_no, raw, why = out.quarantine[0]
    assert (line_no, why) == (2, "not UTF-8")
    assert '"event_id": "x"' in raw  # kept (with a replacement character) for the operator


def test_line_numbers_continue_from_the_cursor():
    out = chunk(lines(event(event_id="a"), b"junk", event(event_id="b")), first_line_no=101)
    assert out.columns["line_no"] == [101, 103]
    assert [q[0] for q in out.quarantine] == [102]


def test_raw_line_is_kept_in_quarantine():
    raw = json.dumps(event(ok="true"))
    out = chunk(lines(raw.encode()))
    assert out.quarantine == [(1, raw, "ok must be a boolean, got str")]


def test_no_trailing_newline_still_reads_the_last_line():
    out = chunk(json.dumps(event(event_id="a")).encode())
    assert out.columns["event_id"] == ["a"]


def test_empty_chunk_reads_nothing():
    assert chunk(b"").lines_read == 0
    assert chunk(b"\xef\xbb\xbf").lines_read == 0


def test_columns_are_typed_for_the_warehouse():
    out = chunk(lines(event(event_id="a", ts="2025-01-18T18:15:00+09:00"),
                      event(event_id="b", kind="crash", drop=["latency_ms", "ok"])))
    c = out.columns
    assert c["window_start"] == [datetime(2025, 1, 18, 9, 15), datetime(2025, 1, 18, 9, 0)]
    assert c["latency_ms"] == [812.5, None] and c["ok"] == [True, None]
    assert c["conflict"] == [False, False]


@pytest.mark.parametrize("line,expected", [
    (b'{"ts":"2025-01-18T09:03:00Z","phase":"A-0"}', (datetime(2025, 1, 18, 9, 3), "A-0")),
    # what the late-data sensor's regexes got wrong (found by an independent audit): a
    # "phase" inside tags, an escaped value or key, a repeated key (the first wins)
    (b'{"tags":{"phase":"A-2"},"ts":"2025-01-18T09:03:00Z","phase":"A-0"}',
     (datetime(2025, 1, 18, 9, 3), "A-0")),
    (b'{"ts":"2025-01-18T09:03:00Z","phase":"A\\u002d0"}', (datetime(2025, 1, 18, 9, 3), "A-0")),
    (b'{"\\u0074s":"2025-01-18T18:03:00+09:00","ph\\u0061se":"A-0"}',
     (datetime(2025, 1, 18, 9, 3), "A-0")),
    (b'{"ts":"2025-01-18T09:03:00Z","phase":"A-0","phase":"A-2"}',
     (datetime(2025, 1, 18, 9, 3), "A-0")),
    (b'{"tags":{"ts":"2020-01-01T00:00:00Z"},"ts":"2025-01-18T09:03:00Z","phase":"A-1"}',
     (datetime(2025, 1, 18, 9, 3), "A-1")),
    # lines the Collector quarantines for their time or phase count nowhere
    (b'{"ts":"9999-12-31T23:59:59Z","phase":"A-0"}', None),
    (b'{"ts":"0001-01-01T00:00:00+01:00","phase":"A-0"}', None),
    (b'{"ts":"2025-01-18T09:03:00","phase":"A-0"}', None),
    (b'{"ts":"2025-01-18T09:03:00Z"}', None),
    (b'{"ts":"2025-01-18T09:03:00Z","phase":7}', None),
    (b'not json "ts":"2025-01-18T09:03:00Z" "phase":"A-0" \\', None),
    (b'', None),
    # a time stamp longer than the quick pattern takes: the JSON path reads it
    (b'{"ts":"2025-01-18T09:03:00.' + b"1" * 60 + b'Z","phase":"A-0"}',
     (datetime(2025, 1, 18, 9, 3, 0, 111111), "A-0")),
])
def test_time_and_phase_as_the_validator_reads_them(line, expected):
    from rollout_assets.events import time_and_phase

    assert time_and_phase(line, datetime(2026, 11, 29)) == expected
