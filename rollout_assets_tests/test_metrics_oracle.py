"""`window_metrics` against an independent oracle, on Hypothesis-generated valid events.

`test_window_metrics.py` checks the Collector on one hand-written data set; this test checks the
same table on randomized ones. Every generated line is a VALID event (the arithmetic is under
test here, not quarantine: see `test_reliability_bad_input.py`), but the data is made nasty:

- `ts` on window edges (`:00:00`, `:14:59.999`, `:14:59.999999`), written with `Z`, `+00:00`,
  `+09:00` or `-05:30` so the local date and hour differ from UTC, with 0, 3 or 6 fraction
  digits, over a day and across both of its midnights;
- a small pool of `event_id`s, so duplicates (with different bodies) happen within a file and
  across files, and across two ingests when the files are appended to in two parts;
- every exclusion flag (`tags.observed_only`, `tags.dry_run`, `environment=staging`,
  `tenant=standard`) in combination, missing `tags`/`tenant`/`environment`, all phases;
- `ok`/`conflict` true, false or (where optional) missing; windows holding only excluded events,
  windows with no restores, merges or sessions (NULL rates); minified or spaced JSON; the fast
  and the strict ingest path.

The oracle is written from the contract (shared DESIGN.md, "Windows", "Judged and observed-only
events", "`window_metrics`"), not from the project's code: it parses `ts` with
`datetime.fromisoformat`, floors it to a 15-minute UTC window, keeps the first occurrence of an
`event_id` (files are read in sorted name order, `RolloutHome.canary_files`; what an earlier
ingest stored comes first), applies the policy's `exclusions` (the policy says which rule applies
in which phase) and computes each column in plain Python, `numpy.percentile(..., 95)` (linear,
= DuckDB's `quantile_cont`) for the p95. Set `ROLLOUT_HYPOTHESIS_EXAMPLES` to search longer.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import Policy, load_policy
from rollout_assets.warehouse import connect, records
from rollout_assets_tests.conftest import DAY, stored_events

NOW = DAY + timedelta(days=1)  # the Collector's clock: every generated ts is in its past
EXAMPLES = int(os.environ.get("ROLLOUT_HYPOTHESIS_EXAMPLES", "50"))
WINDOW = timedelta(minutes=15)  # contract: 15-minute windows in UTC
# windows generated: from the one before DAY's midnight to the one after the next midnight
FIRST_WINDOW, LAST_WINDOW = -2, 24 * 4 + 1
OFFSETS = {"Z": timedelta(0), "+00:00": timedelta(0), "+09:00": timedelta(hours=9),
           "-05:30": -timedelta(hours=5, minutes=30)}
# where inside its window an event falls, in microseconds: both edges and a few in between
EDGES_US = [0, 1, 1_000, 450_000_000, 899_999_000, 899_999_999]
FILES = ["phase-A-1.jsonl", "phase-A-2.jsonl", "phase-B-0.jsonl", "phase-misc.jsonl"]
MAX_LATENCY_MS = 3_600_000  # events.py: slower than an hour is quarantined (kept out here)
COLS = ("events", "autosave_count", "autosave_p95_ms", "autosave_error_count", "restore_count",
        "restore_success_rate", "merge_count", "merge_auto_success_rate", "merge_conflict_rate",
        "session_count", "crash_count", "crash_rate", "excluded_events")
INT_COLS = frozenset(c for c in COLS if c.endswith(("count", "events")))


# the project's policy: its phases for the strategies, its exclusions for the oracle (a module
# constant rather than a fixture, so a falsifying example prints without the whole policy)
POLICY = load_policy(PROJECT_ROOT / "governance" / "policy.yaml")


# ---- strategies ----------------------------------------------------------------------------


def render_ts(instant: datetime, offset: str, digits: int) -> str:
    """`instant` (naive UTC) written in local time at `offset`, with `digits` fraction digits
    (the instant is truncated to that precision first)."""
    local = instant + OFFSETS[offset]
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{local.microsecond:06d}"[:digits]
    return text + offset


@st.composite
def timestamp(draw, windows: list[int]) -> str:
    start = DAY + WINDOW * draw(st.sampled_from(windows))
    inside = draw(st.one_of(st.sampled_from(EDGES_US), st.integers(0, 899_999_999)))
    return render_ts(start + timedelta(microseconds=inside), draw(st.sampled_from(list(OFFSETS))),
                     draw(st.sampled_from([0, 3, 6])))


latencies = st.one_of(
    st.sampled_from([0, 0.0, 1, 2500, 2500.5, MAX_LATENCY_MS, float(MAX_LATENCY_MS)]),
    st.integers(0, MAX_LATENCY_MS),
    st.floats(0, MAX_LATENCY_MS, allow_nan=False, allow_infinity=False),
)
maybe_bool = st.sampled_from([True, False, None])  # None: the field is left out


@st.composite
def valid_event(draw, ids: list[str], windows: list[int], phases: list[str]) -> dict:
    kind = draw(st.sampled_from(["autosave", "restore", "merge", "session", "crash"]))
    ev = {"event_id": draw(st.sampled_from(ids)), "ts": draw(timestamp(windows)),
          "phase": draw(st.sampled_from(phases)), "kind": kind}
    # events.py: autosave needs latency_ms, autosave/restore/merge need ok; others may carry them
    if kind == "autosave" or draw(st.booleans()):
        ev["latency_ms"] = draw(latencies)
    ok = draw(st.booleans() if kind in ("autosave", "restore", "merge") else maybe_bool)
    if ok is not None:
        ev["ok"] = ok
    conflict = draw(maybe_bool)
    if conflict is not None:
        ev["conflict"] = conflict
    if draw(st.booleans()):
        ev["session_id"] = draw(st.sampled_from(["s-1", "s-2"]))
    # every exclusion in combination, but most events judged (repeats weight the choices)
    tenant = draw(st.sampled_from(["qa", "beta", "standard", None, None]))
    if tenant is not None:
        ev["tenant"] = tenant
    env = draw(st.sampled_from(["production", "staging", None, None]))
    if env is not None:
        ev["environment"] = env
    tags = draw(st.one_of(st.none(), st.just({"observed_only": False, "dry_run": False}),
                          st.fixed_dictionaries({}, optional={
                              "observed_only": st.booleans(), "dry_run": st.booleans()})))
    if tags is not None:
        ev["tags"] = tags
    if draw(st.integers(0, 4)) == 0:  # unknown extra fields are kept, not rejected
        ev["region"] = "eu-west-1"
    return ev


@st.composite
def scenario(draw) -> dict:
    # a few windows and phases per example, so a (window, phase) holds several events, and a
    # small id pool, so ids repeat
    windows = draw(st.lists(st.integers(FIRST_WINDOW, LAST_WINDOW), min_size=1, max_size=4,
                            unique=True))
    phases = draw(st.lists(st.sampled_from(POLICY.phase_names), min_size=1, max_size=3,
                           unique=True))
    ids = [f"ev-{i}" for i in range(draw(st.integers(3, 30)))]
    names = draw(st.lists(st.sampled_from(FILES), min_size=1, max_size=3, unique=True))
    files = {}
    for name in names:
        events = draw(st.lists(valid_event(ids, windows, phases), max_size=20))
        if draw(st.booleans()):  # a burst of judged autosaves in one window: a real p95
            start = DAY + WINDOW * draw(st.sampled_from(windows))
            phase = draw(st.sampled_from(phases))
            for i, lat in enumerate(draw(st.lists(latencies, min_size=2, max_size=25))):
                at = start + timedelta(microseconds=draw(st.sampled_from(EDGES_US)))
                events.insert(draw(st.integers(0, len(events))), {
                    "event_id": f"{name}-burst-{i}", "phase": phase, "kind": "autosave",
                    "ts": render_ts(at, draw(st.sampled_from(list(OFFSETS))), 6),
                    "latency_ms": lat, "ok": draw(st.booleans())})
        # an event_id of this file delivered again with another body (before or after it)
        if events and draw(st.booleans()):
            again = dict(draw(st.sampled_from(events)))
            again.update(ts=draw(timestamp(windows)), kind="session", ok=False)
            again.pop("latency_ms", None)
            events.insert(draw(st.integers(len(events) // 2, len(events))), again)
        files[name] = {"events": events, "split": draw(st.integers(0, len(events)))}
    return {"files": files, "two_ingests": draw(st.booleans()),
            "minified": draw(st.booleans()), "mode": draw(st.sampled_from(["fast", "strict"]))}


# ---- the oracle: DESIGN.md, in plain Python ------------------------------------------------


def utc_of(ts: str) -> datetime:
    """`ts` as a naive UTC datetime (a trailing Z is UTC)."""
    dt = datetime.fromisoformat(ts[:-1] + "+00:00" if ts.endswith("Z") else ts)
    return dt.astimezone(UTC).replace(tzinfo=None)


def window_of(t: datetime) -> datetime:
    """The start of the 15-minute window `[start, start + 15m)` containing `t` (UTC)."""
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def field_value(ev: dict, field: str):
    """An event's value of a policy exclusion field; missing tags (or a missing tag) are false."""
    if field.startswith("tags."):
        return (ev.get("tags") or {}).get(field.removeprefix("tags."), False)
    return ev.get(field)


def is_excluded(ev: dict, policy: Policy) -> bool:
    """Stored and counted, never judged: any exclusion rule of the policy that applies in the
    event's phase and whose field has the rule's value."""
    return any((rule.phases == "all" or ev["phase"] in rule.phases)
               and field_value(ev, rule.field) == rule.equals
               for rule in policy.exclusions)


def rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def first_occurrences(batches: list[list[tuple[str, list[dict]]]]
                      ) -> dict[str, tuple[dict, str, int]]:
    """event_id -> (event, file, line number) of its first occurrence: ingests in order, files in
    sorted name order within an ingest, lines in file order."""
    first: dict[str, tuple[dict, str, int]] = {}
    for batch in batches:
        for name, lines in sorted(batch, key=lambda x: x[0]):
            for line_no, ev in lines:
                first.setdefault(ev["event_id"], (ev, name, line_no))
    return first


def expected_metrics(events: list[dict], policy: Policy) -> dict[tuple, dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for ev in events:
        groups[(window_of(utc_of(ev["ts"])), ev["phase"])].append(ev)
    out = {}
    for key, evs in groups.items():
        judged = [e for e in evs if not is_excluded(e, policy)]

        def of(kind: str, judged=judged) -> list[dict]:
            return [e for e in judged if e["kind"] == kind]

        saves, restores, merges = of("autosave"), of("restore"), of("merge")
        sessions, crashes = len(of("session")), len(of("crash"))
        out[key] = {
            "events": len(judged),
            "autosave_count": len(saves),
            "autosave_p95_ms": float(np.percentile([float(e["latency_ms"]) for e in saves], 95))
            if saves else None,
            "autosave_error_count": sum(1 for e in saves if e["ok"] is False),
            "restore_count": len(restores),
            "restore_success_rate": rate(sum(1 for e in restores if e["ok"] is True),
                                         len(restores)),
            "merge_count": len(merges),
            "merge_auto_success_rate": rate(sum(1 for e in merges if e["ok"] is True),
                                            len(merges)),
            "merge_conflict_rate": rate(sum(1 for e in merges if e.get("conflict") is True),
                                        len(merges)),
            "session_count": sessions,
            "crash_count": crashes,
            "crash_rate": rate(crashes, sessions),
            "excluded_events": len(evs) - len(judged),
        }
    return out


# ---- the test ------------------------------------------------------------------------------


def append(path: Path, events: list[dict], minified: bool) -> None:
    seps = (",", ":") if minified else (", ", ": ")
    with open(path, "ab") as f:
        for ev in events:
            f.write(json.dumps(ev, separators=seps).encode() + b"\n")


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=scenario())
def test_window_metrics_match_the_contract_oracle(case):
    files = case["files"]
    # what each ingest reads: the first part of every file, then (appended) the rest
    parts = [{n: (f["events"][:f["split"]], 1) for n, f in files.items()},
             {n: (f["events"][f["split"]:], f["split"] + 1) for n, f in files.items()}]
    if not case["two_ingests"]:
        parts = [{n: (f["events"], 1) for n, f in files.items()}]
    batches = [[(n, list(enumerate(evs, start))) for n, (evs, start) in part.items()]
               for part in parts]
    first = first_occurrences(batches)
    want = expected_metrics([ev for ev, _, _ in first.values()], POLICY)

    with tempfile.TemporaryDirectory() as tmp:
        home = RolloutHome(Path(tmp).resolve())
        home.canary_dir.mkdir(parents=True)
        con = connect(home.db_path)
        try:
            for part in parts:
                for name, (events, _) in part.items():
                    append(home.canary_dir / name, events, case["minified"])
                ingest_canary(con, home, POLICY, now=NOW, mode=case["mode"])
            compute_window_metrics(con, POLICY, DAY + WINDOW * (FIRST_WINDOW - 1),
                                   DAY + WINDOW * (LAST_WINDOW + 1), now=NOW)
            got = {(r["window_start"], r["phase"]): r
                   for r in records(con, "select * from window_metrics")}
            stored = con.execute("select count(*), count(distinct event_key) from canary_events"
                                 ).fetchone()
            sources = stored_events(con, "source_file, line_no", list(first))
        finally:
            con.close()

    # duplicates count once; the first occurrence is the one stored
    assert stored == (len(first), len(first))
    assert sources == {eid: (f"reports/canary/{name}", line_no)
                       for eid, (_, name, line_no) in first.items()}
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g["window_end"] - g["window_start"] == WINDOW, key
        for col in COLS:
            if w[col] is None or col in INT_COLS:
                assert g[col] == w[col], (key, col, g[col], w[col])
            else:
                assert g[col] is not None and g[col] == pytest.approx(w[col], rel=1e-12), \
                    (key, col, g[col], w[col])
