"""Collector on a DuckDB file on disk, against values computed by hand on a small hand-written data
set: window edges and offsets, duplicates across files, seed §4 exclusions, NULL rates, p95 as
quantile_cont (= numpy's linear percentile), and per-file line accounting."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import pytest

from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.warehouse import connect, records
from rollout_assets_tests.conftest import DAY, event, stored_events, write_canary

NOW = DAY + timedelta(days=1)
W0015, W0900, W0915, W0930 = (DAY.replace(hour=h, minute=m) for h, m in
                              ((0, 15), (9, 0), (9, 15), (9, 30)))
A1, A2, B0 = "reports/canary/phase-A-1.jsonl", "reports/canary/phase-A-2.jsonl", \
    "reports/canary/phase-B-0.jsonl"


def ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def ev(eid: str, kind: str, at: str, phase: str = "A-1", **kw) -> dict:
    drop = [k for k in ("latency_ms", "ok", "conflict") if k not in kw]
    if kind == "autosave":
        drop = [k for k in drop if k != "latency_ms"]
    return event(event_id=eid, kind=kind, ts=at, phase=phase, drop=drop, **kw)


def a1_lines() -> list:
    out = []
    # 20 judged autosaves in 09:00, latencies 100..2000; the last one failed
    for i in range(20):
        at = ts(W0900 + timedelta(seconds=40 * i))
        if i == 0:
            at = "2025-01-18T09:00:00.000Z"  # first instant of the window
        if i == 18:
            at = "2025-01-18T18:14:59.999+09:00"  # last millisecond, written in Tokyo time
        if i == 19:
            at = "2025-01-18T09:14:59.999Z"  # last millisecond
        out.append(ev(f"a{i + 1}", "autosave", at, latency_ms=100.0 * (i + 1), ok=i != 19))
    out += [ev(f"r{i}", "restore", ts(W0900 + timedelta(minutes=i)), ok=i != 4)
            for i in range(1, 5)]
    # seed §4: stored and counted, never judged (latencies that would wreck the p95)
    out += [
        ev("x1", "autosave", "2025-01-18T09:05:00Z", latency_ms=99999.0, ok=True,
           tenant="standard"),
        ev("x2", "restore", "2025-01-18T09:05:01Z", ok=False, tenant="standard"),
        ev("x3", "autosave", "2025-01-18T09:05:02Z", latency_ms=99999.0, ok=False,
           tags={"observed_only": True, "dry_run": False}),
        ev("x4", "restore", "2025-01-18T09:05:03Z", ok=False, tags={"dry_run": True}),
        ev("x5", "autosave", "2025-01-18T09:05:04Z", latency_ms=99999.0, ok=True,
           environment="staging"),
        ev("x6", "autosave", "2025-01-18T09:05:05Z", latency_ms=99999.0, ok=False,
           environment="staging", tags={"observed_only": True}),
    ]
    # a retried delivery of a5 with a different body: the first occurrence wins
    out.append(ev("a5", "autosave", "2025-01-18T09:02:40Z", latency_ms=88888.0, ok=False))
    # 09:15 window: its first instant, in UTC and in +09:00
    out += [
        ev("b1", "autosave", "2025-01-18T09:15:00.000Z", latency_ms=500.0, ok=True),
        ev("b2", "autosave", "2025-01-18T18:15:00+09:00", latency_ms=700.0, ok=True),
        ev("m1", "merge", "2025-01-18T09:20:00Z", ok=True, conflict=True),
        ev("m2", "merge", "2025-01-18T09:21:00Z", ok=False, conflict=False),
    ]
    # 09:15 written in +09:00 is 00:15 UTC
    out.append(ev("s0", "session", "2025-01-18T09:15:00+09:00"))
    # five bad lines
    out += [
        "not json at all",
        json.dumps(ev("q1", "session", "2025-01-18T09:01:00")),
        json.dumps(ev("q2", "restore", "2025-01-18T09:01:00Z", ok="true")),
        "",
        b'{"event_id": "q3", "ts": "2025-01-18T09:01:00Z", "phase": "A-1", "kind": "sess\xffion"}',
    ]
    return out


def a2_lines() -> list:
    out = [ev(f"s{i}", "session", ts(W0900 + timedelta(seconds=30 * i)), phase="A-2",
              tenant="standard") for i in range(1, 11)]
    out += [ev(f"c{i}", "crash", ts(W0900 + timedelta(minutes=10, seconds=i)), phase="A-2",
               tenant="standard") for i in (1, 2)]
    out += [ev(f"rr{i}", "restore", "2025-01-18T09:12:00Z", phase="A-2", ok=True,
               tenant="standard") for i in (1, 2)]
    out.append(ev("st1", "session", "2025-01-18T09:13:00Z", phase="A-2", environment="staging"))
    # a3 again, delivered into another file: counted once
    out.append(a1_lines()[2])
    out.append(json.dumps(ev("q4", "autosave", "2025-01-18T09:13:00Z", phase="A-2",
                             latency_ms=1.0, ok=True)).replace("1.0", "NaN"))
    out.append(ev("q5", "session", "2025-01-18T09:13:00Z", phase="C-7"))
    return out


def b0_lines() -> list:
    return [ev(f"o{i}", "merge", "2025-01-18T09:31:00Z", phase="B-0", ok=True, conflict=False,
               tags={"observed_only": True}) for i in (1, 2)]


@pytest.fixture
def loaded(home, policy, con):
    write_canary(home, "A-1", a1_lines())
    write_canary(home, "A-2", a2_lines())
    write_canary(home, "B-0", b0_lines())
    stats = ingest_canary(con, home, policy, now=NOW)
    df = compute_window_metrics(con, policy, DAY, DAY.replace(hour=23, minute=45), now=NOW)
    return stats, df


NULL = None
EXPECTED = {
    # (window, phase): events, autosave_count, p95, autosave errors, restore n, restore rate,
    #   merge n, merge auto rate, conflict rate, sessions, crashes, crash rate, excluded
    (W0900, "A-1"): (24, 20, 1905.0, 1, 4, 0.75, 0, NULL, NULL, 0, 0, NULL, 6),
    (W0915, "A-1"): (4, 2, 690.0, 0, 0, NULL, 2, 0.5, 0.5, 0, 0, NULL, 0),
    (W0015, "A-1"): (1, 0, NULL, 0, 0, NULL, 0, NULL, NULL, 1, 0, 0.0, 0),
    (W0900, "A-2"): (14, 0, NULL, 0, 2, 1.0, 0, NULL, NULL, 10, 2, 0.2, 1),
    (W0930, "B-0"): (0, 0, NULL, 0, 0, NULL, 0, NULL, NULL, 0, 0, NULL, 2),
}
COLS = ("events", "autosave_count", "autosave_p95_ms", "autosave_error_count", "restore_count",
        "restore_success_rate", "merge_count", "merge_auto_success_rate", "merge_conflict_rate",
        "session_count", "crash_count", "crash_rate", "excluded_events")


def test_window_metrics_match_hand_computed_values(loaded, con):
    got = {(r["window_start"], r["phase"]): tuple(r[c] for c in COLS)
           for r in records(con, "select * from window_metrics")}
    # windows with no (stored) events have no row at all
    assert set(got) == set(EXPECTED)
    for key, want in EXPECTED.items():
        for col, g, w in zip(COLS, got[key], want, strict=True):
            assert (g is None) == (w is None), (key, col, g, w)
            if w is not None:
                assert g == pytest.approx(w, rel=1e-12), (key, col, g, w)
    for r in records(con, "select * from window_metrics"):
        assert r["window_end"] - r["window_start"] == timedelta(minutes=15)


def test_p95_is_numpys_linear_percentile(loaded, con):
    p95 = con.execute("select autosave_p95_ms from window_metrics where window_start = ? and "
                      "phase = 'A-1'", [W0900]).fetchone()[0]
    assert p95 == np.percentile([100.0 * i for i in range(1, 21)], 95) == 1905.0


def test_p95_matches_numpy_on_skewed_latencies(home, policy, con):
    rng = np.random.default_rng(11)
    lat = np.round(rng.lognormal(np.log(600), 0.9, 997), 3)
    write_canary(home, "B-1", [
        ev(f"l{i}", "autosave", ts(W0900 + timedelta(milliseconds=900 * i)), phase="B-1",
           latency_ms=float(v), ok=True) for i, v in enumerate(lat)])
    ingest_canary(con, home, policy, now=NOW)
    compute_window_metrics(con, policy, W0900, W0900, now=NOW)
    got = con.execute("select autosave_count, autosave_p95_ms from window_metrics").fetchone()
    assert got[0] == 997
    assert got[1] == pytest.approx(np.percentile(lat, 95, method="linear"), rel=1e-12)
    assert got[1] != pytest.approx(np.percentile(lat, 95, method="nearest"), rel=1e-9)


def test_window_edges_and_offsets_land_in_the_right_window(loaded, con):
    got = stored_events(con, "window_start, ts", ["a1", "a19", "a20", "b1", "b2", "s0"])
    where = {k: v[0] for k, v in got.items()}
    assert where["a1"] == where["a19"] == where["a20"] == W0900
    assert where["b1"] == where["b2"] == W0915
    assert where["s0"] == W0015
    assert got["a19"][1] == datetime(2025, 1, 18, 9, 14, 59, 999000)
    assert got["b2"][1] == datetime(2025, 1, 18, 9, 15)


def test_duplicates_count_once_first_occurrence_wins(loaded, con):
    assert con.execute("select count(*), count(distinct event_key) from canary_events"
                       ).fetchone() == (52, 52)
    got = stored_events(con, "latency_ms, ok, source_file, line_no", ["a5", "a3"])
    assert got["a5"] == (500.0, True, A1, 5)
    assert got["a3"][2] == A1


def test_exclusions_are_stored_counted_and_never_judged(loaded, con):
    by_reason = {(r["window_start"], r["phase"], r["reason"]): r["events"]
                 for r in records(con, "select * from window_exclusions")}
    assert by_reason == {
        (W0900, "A-1", "outside_canary"): 2,  # tenant=standard only in A-1 ...
        (W0900, "A-1", "observed_only"): 2,   # x6 is staging too: counted once, first rule
        (W0900, "A-1", "dry_run"): 1,
        (W0900, "A-1", "staging"): 1,
        (W0900, "A-2", "staging"): 1,         # ... while A-2's standard tenants are judged
        (W0930, "B-0", "observed_only"): 2,
    }
    # excluded events are stored, with their tags
    assert len(stored_events(con, "line_no", [f"x{i}" for i in range(1, 7)])) == 6
    # excluded_events agrees with the per-reason table for every row
    mismatched = con.execute("""
        select count(*) from window_metrics m
        where excluded_events != coalesce((select sum(events) from window_exclusions e
              where e.window_start = m.window_start and e.phase = m.phase), 0)""").fetchone()[0]
    assert mismatched == 0


def test_every_line_is_accounted_for_per_file(loaded, con):
    stats, _ = loaded
    want = {A1: (41, 35, 1, 5), A2: (18, 15, 1, 2), B0: (2, 2, 0, 0)}
    assert {s.source_file: (s.lines_read, s.loaded, s.duplicates, s.quarantined)
            for s in stats} == want
    table = {r[0]: r[1:] for r in con.execute(
        "select source_file, lines_read, loaded, duplicates, quarantined from ingest_files"
    ).fetchall()}
    assert table == want
    for f, (read, loaded_n, dups, quarantined) in want.items():
        assert read == loaded_n + dups + quarantined
        assert con.execute("select count(*) from quarantine where source_file = ?", [f]
                           ).fetchone()[0] == quarantined
        assert con.execute("select count(*) from canary_event_sources where source_file = ?",
                           [f]).fetchone()[0] == loaded_n
    got = con.execute("select line_no, reason from quarantine where source_file = ? "
                      "order by line_no", [A1]).fetchall()
    want_reasons = [(37, "invalid JSON"), (38, "ts has no time zone"),
                    (39, "ok must be a boolean, got str"), (40, "empty line"), (41, "not UTF-8")]
    assert [n for n, _ in got] == [n for n, _ in want_reasons]
    for (_, r), (_, w) in zip(got, want_reasons, strict=True):
        assert r.startswith(w), (r, w)
    reasons = [r[0] for r in con.execute(
        "select reason from quarantine where source_file = ? order by line_no", [A2]
    ).fetchall()]
    assert reasons == ["non-finite number NaN", "unknown phase 'C-7'"]


def test_reingest_and_recompute_change_nothing(loaded, home, policy, con):
    def snapshot():
        return {t: con.execute(f"select count(*) from {t}").fetchone()[0]
                for t in ("canary_events", "quarantine", "window_metrics", "window_exclusions")}, \
            con.execute("select * exclude (computed_at) from window_metrics order by all"
                        ).fetchall()

    before = snapshot()
    stats = ingest_canary(con, home, policy, now=NOW)
    assert [s.lines_read for s in stats] == [0, 0, 0]
    compute_window_metrics(con, policy, DAY, DAY.replace(hour=23, minute=45), now=NOW)
    assert snapshot() == before


def test_appended_lines_are_read_incrementally(loaded, home, policy, con):
    write_canary(home, "A-1", [
        ev("a21", "autosave", "2025-01-18T09:14:00Z", latency_ms=2100.0, ok=True),
        ev("a1", "autosave", "2025-01-18T09:14:00Z", latency_ms=1.0, ok=True),  # duplicate
        "{broken",
    ])
    stats = {s.source_file: s for s in ingest_canary(con, home, policy, now=NOW)}
    s = stats[A1]
    assert (s.lines_read, s.loaded, s.duplicates, s.quarantined) == (3, 1, 1, 1)
    assert con.execute("select lines_read, loaded, duplicates, quarantined from ingest_files "
                       "where source_file = ?", [A1]).fetchone() == (44, 36, 2, 6)
    assert con.execute("select max(line_no) from quarantine where source_file = ?", [A1]
                       ).fetchone()[0] == 44
    compute_window_metrics(con, policy, W0900, W0900, now=NOW)
    assert con.execute("select autosave_count, autosave_p95_ms from window_metrics where "
                       "window_start = ? and phase = 'A-1'", [W0900]).fetchone() == (
        21, np.percentile([100.0 * i for i in range(1, 22)], 95))


def test_recomputing_one_window_leaves_the_others(loaded, policy, con):
    con.execute("delete from canary_events where window_start = ? and phase = 'A-1'", [W0915])
    compute_window_metrics(con, policy, W0915, W0915, now=NOW)
    keys = set(con.execute("select window_start, phase from window_metrics").fetchall())
    assert keys == set(EXPECTED) - {(W0915, "A-1")}


def test_the_file_on_disk_holds_the_rows(loaded, home, con):
    con.close()
    ro = connect(home.db_path, read_only=True)
    try:
        assert ro.execute("select count(*) from window_metrics").fetchone()[0] == len(EXPECTED)
    finally:
        ro.close()


def test_a_lone_surrogate_is_quarantined_not_fatal(home, policy, con):
    write_canary(home, "A-1", [
        ev("ok1", "session", "2025-01-18T09:01:00Z"),
        '{"event_id": "bad\\ud800", "ts": "2025-01-18T09:01:00Z", "phase": "A-1", '
        '"kind": "session"}',
        '{"event_id": "bad2", "ts": "2025-01-18T09:01:00Z", "phase": "A-1", '
        '"kind": "session", "tenant": "\\udc00"}',
    ])
    try:
        stats = ingest_canary(con, home, policy, now=NOW)
    except Exception as exc:  # the database is gone: that is the bug
        pytest.fail(f"ingest crashed: {type(exc).__name__}: {str(exc)[:120]}")
    assert (stats[0].loaded, stats[0].quarantined) == (1, 2)


def test_alert_evidence_sql_reproduces_every_metric(loaded, policy, con):
    """The query printed in an alert report recomputes the judged numbers from canary_events."""
    from rollout_assets.metrics_catalog import METRICS
    from rollout_assets.reporting import evidence_sql

    # every metric aggregated in SQL (the canary-vs-baseline statistics are computed in Python)
    names = sorted(m for m, spec in METRICS.items() if not spec.sql.startswith("--"))
    baseline = 1 / 30  # a measured baseline has many digits: the evidence must keep them all
    for (ws, phase) in EXPECTED:
        sql = evidence_sql(policy, ws, phase, names, baseline)
        got = dict(zip(names, con.execute(sql).fetchone(), strict=True))
        row = records(con, "select * from window_metrics where window_start = ? and phase = ?",
                   [ws, phase])[0]
        for m in names:
            want = row[m] if m in row else (
                None if row["crash_rate"] is None else row["crash_rate"] - baseline)
            if want is None:
                assert got[m] is None, (ws, phase, m, got[m])
            else:
                assert got[m] == pytest.approx(want, rel=1e-12, abs=1e-15), (ws, phase, m)


# ---- the ingest agrees with the reference validator, line by line ------------------------------

def _tricky_lines() -> list[bytes]:
    """Valid and invalid lines whose reading is easy to get subtly wrong in a fast path."""
    def j(**kw) -> bytes:
        base = {"event_id": None, "ts": "2025-01-18T09:03:12.123Z", "phase": "A-1",
                "kind": "autosave", "latency_ms": 812.5, "ok": True}
        base.update(kw)
        return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()

    out: list[bytes] = []
    ts_variants = [
        "2025-01-18T09:14:59.999999Z", "2025-01-18T09:15:00+00:00", "2025-01-18T09:15:00-00:00",
        "2025-01-18T18:15:00+09:00", "2025-01-18T18:14:59.999+09:00", "2025-01-18T09:15:00z",
        "2025-01-18 09:15:00Z", "2025-01-18T09:15Z", "2025-01-18T09Z", "20250118T091500Z",
        "2025-01-18T09:15:00.5Z", "2025-01-18T09:15:00,5Z", "2025-01-18T23:59:60Z",
        "2025-01-18T24:00:00Z", "2025-01-18T09:15:00+0900", "2025-01-18T09:15:00+09",
        "2025-W03-6T09:15:00Z", " 2025-01-18T09:15:00Z ", "2025-01-18T09:15:00.1234567Z",
        "2025-01-18T09:15:00+09:00:30", "2025-01-18T09:15:00.000+05:45", "2025-1-18T09:15:00Z",
        "2025-01-18T09:15:00Z\u0000", "２０２５-01-18T09:15:00Z", "2025-01-18T09:15:00+24:00",
        "2000-01-01T00:00:00Z", "1999-12-31T23:59:59.999Z", "2025-01-18T09:15:00.000000Z",
    ]
    for i, t in enumerate(ts_variants):
        out.append(j(event_id=f"t{i}", ts=t))
    numbers = ["1e3", "1E+3", "812.50", "-0.0", "0", "3600000", "3600000.0000001", "1e308",
               "5e-324", "10.", ".5", "01", "0x10", "1_000", "+1", "Infinity", "-1e-9"]
    for i, n in enumerate(numbers):
        out.append(j(event_id=f"n{i}").replace(b"812.5", n.encode()))
    ids = ["\\u0041bc", 'a\\"b', "\u00fcn\u00efcode", "emoji \U0001f600", " spaced ", "x" * 256,
           "x" * 257, "tab\\tid", "\\ud83d\\ude00", "\\ud800"]
    for i, e in enumerate(ids):
        raw = j(event_id="@@").replace(b'"@@"', b'"' + e.encode() + b'"')
        out.append(raw.replace(b'"event_id"', b'"event_id"', 1) + b"")
        out[-1] = out[-1].replace(b'"ts"', f'"seq": {i}, "ts"'.encode(), 1)
    out += [
        b'{"event_id": "d1", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "restore", '
        b'"ok": true, "ok": "x"}',  # a repeated key: the first value wins
        b'{"event_id": "d2", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "restore", '
        b'"ok": "x", "ok": true}',
        b'{"event_id": "k1", "ts": "2025-01-18T09:03:12Z", "phase": "A\\u002d1", '
        b'"kind": "auto\\u0073ave", "latency_ms": 5, "ok": true}',
        b'   {"event_id": "w1", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"}'
        b'   \t',
        b'{"event_id": "c1", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session",}',
        b'{"event_id": "c2", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"} x',
        b'{"event_id": "c3", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"}'
        b'{"event_id": "c4"}',
        b"{'event_id': 'c5', 'ts': '2025-01-18T09:03:12Z', 'phase': 'A-1', 'kind': 'session'}",
        b'{"event_id": "c6", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session", '
        b'"tags": {"observed_only": null, "dry_run": true}, "tenant": "standard"}',
        b'{"event_id": "c7", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session", '
        b'"tags": null, "environment": "Staging", "extra": {"deep": [1, {"x": null}]}}',
        b'{"event_id": "c8", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "merge", '
        b'"ok": false, "conflict": null}',
        b'{"event_id": "c9", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "crash", '
        b'"latency_ms": "fast"}',
        b'{"event_id": "c10", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session", '
        b'"session_id": 7}',
        b'{"event_id": "c11", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session", '
        b'"tenant": "q\\u0000a"}',
        b'{"event_id": "c12", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"'
        b', "nested": ' + b"[" * 600 + b"]" * 600 + b"}",
        b'{"event_id": "c13", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"'
        b', "nested": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"event_id": "c14", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session", '
        b'"ok": NaN}',
        b'{"event_id": "c15", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "autosave", '
        b'"latency_ms": 1' + b"0" * 400 + b', "ok": true}',
        b'{"event_id": "c16", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"'
        b', "note": "caf\xc3\xa9"}',
        b'{"event_id": "c17", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"'
        b', "note": "caf\xe9"}',
        b"\xef\xbb\xbf" + b'{"event_id": "c18", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", '
        b'"kind": "session"}',
        b'[{"event_id": "c19", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"}]',
        b'{"event_id": "c20", "ts": "2025-01-18T09:03:12Z", "phase": "A-1", "kind": "session"}\r',
        b"",
        b"   ",
        b'{"event_id": "t0", "ts": "2025-01-18T09:00:00Z", "phase": "A-1", "kind": "session"}',
    ]
    return out


VALIDATED = ("event_id", "ts", "window_start", "phase", "kind", "latency_ms", "ok", "conflict",
             "session_id", "tenant", "environment", "observed_only", "dry_run")
STORED = tuple(c for c in VALIDATED if c not in ("event_id", "session_id"))  # event_id as a key


@pytest.mark.parametrize("mode", ["fast", "strict"])
def test_ingest_stores_exactly_what_the_reference_validator_reads(home, policy, con, mode,
                                                                   monkeypatch):
    from rollout_assets.events import Reject, validate_event

    monkeypatch.setenv("ROLLOUT_INGEST_MODE", mode)
    lines = _tricky_lines()
    # two leading valid lines so that the BOM line is not the file's first
    lines = [json.dumps(ev("h1", "session", "2025-01-18T09:00:00Z")).encode(),
             json.dumps(ev("h2", "session", "2025-01-18T09:00:01Z")).encode(), *lines]
    write_canary(home, "A-1", lines)
    (stats,) = ingest_canary(con, home, policy, now=NOW)
    phases = frozenset(policy.phase_names)
    want_rows, want_quarantine, seen = {}, {}, set()
    for n, raw in enumerate(lines, start=1):
        try:
            row = validate_event(raw.decode("utf-8").removesuffix("\r"), phases, NOW)
        except UnicodeDecodeError:
            want_quarantine[n] = "not UTF-8"
            continue
        except Reject as exc:
            want_quarantine[n] = str(exc)
            continue
        if row[0] not in seen:  # first occurrence wins
            seen.add(row[0])
            want_rows[n] = (con.execute("select hash(?)", [row[0]]).fetchone()[0],
                            *(v for c, v in zip(VALIDATED, row, strict=True) if c in STORED))
    got_rows = {r[-1]: r[:-1] for r in con.execute(
        f"select event_key, {', '.join(STORED)}, line_no from canary_events").fetchall()}
    got_quarantine = dict(con.execute("select line_no, reason from quarantine").fetchall())
    assert got_quarantine == want_quarantine
    assert set(got_rows) == set(want_rows)
    for n, want in want_rows.items():
        assert got_rows[n] == want, (n, lines[n - 1][:120])
    assert (stats.lines_read, stats.loaded, stats.quarantined) == (
        len(lines), len(want_rows), len(want_quarantine))
    assert stats.duplicates == len(lines) - len(want_rows) - len(want_quarantine)


@pytest.mark.parametrize("mode", ["fast", "strict"])
def test_a_line_finished_after_a_run_is_one_line(home, policy, con, mode, monkeypatch):
    monkeypatch.setenv("ROLLOUT_INGEST_MODE", mode)
    path = write_canary(home, "A-1", [ev("f1", "session", "2025-01-18T09:00:00Z")])
    with open(path, "ab") as f:  # the writer has flushed the object, not yet its newline
        f.write(json.dumps(ev("f2", "session", "2025-01-18T09:00:01Z")).encode())
    ingest_canary(con, home, policy, now=NOW)
    with open(path, "ab") as f:
        f.write(b"\n" + json.dumps(ev("f3", "restore", "2025-01-18T09:00:02Z", ok="no")).encode()
                + b"\n")
    ingest_canary(con, home, policy, now=NOW)
    assert path.read_bytes().count(b"\n") == 3
    assert con.execute("select lines_read, loaded, duplicates, quarantined from ingest_files"
                       ).fetchone() == (3, 2, 0, 1)
    assert con.execute("select line_no, reason from quarantine").fetchall() == [
        (3, "ok must be a boolean, got str")]
