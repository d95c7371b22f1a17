"""Deterministic, vectorized canary traffic for the benchmark: `reports/canary/phase-*.jsonl`.

The events look like `rollout simulate`'s (same kinds, success rates, tenants, observed-only
share, 5 % of timestamps written with a +09:00 offset, one retried delivery per 300 events and
one malformed line per 1000), but every line is built by one DuckDB query over `range(n)` and
written with `COPY`, never by a Python loop per event (1M events in a few seconds, 10M in about
a minute on 2 cores). Randomness is `hash(seed, stream, i)`, so the same arguments give
byte-identical files.

    python benchmarks/generate.py --home DIR --events 1000000 [--start 2025-01-18] [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from rollout_assets.simulate import HEALTHY, KIND_P, LATENCY_MEDIAN_MS, LATENCY_SIGMA, TENANTS

PHASES = ("A-0", "A-1", "A-2", "B-0", "B-1")
DUP_EVERY = 300  # a retried delivery: the same line again, counted once
JUNK_EVERY = 1000  # a malformed line the Collector must quarantine with its reason
JUNK = (
    '{"event_id": "broken", "ts": ',
    "not json at all",
    '{"event_id": "x-tz", "ts": "2025-01-18T09:00:00", "phase": "A-0", "kind": "session"}',
    '{"event_id": "x-phase", "ts": "2025-01-18T09:00:00Z", "phase": "Z-9", "kind": "session"}',
    '{"event_id": "x-type", "ts": "2025-01-18T09:00:00Z", "phase": "A-0", "kind": "restore", '
    '"ok": "true"}',
)


def _u(seed: int, stream: int, col: str = "i") -> str:
    """A uniform [0, 1) draw per row, from a 64-bit hash of (seed, stream, row)."""
    return f"((hash({seed}, {stream}, {col}) >> 11)::DOUBLE / 9007199254740992.0)"


def _kind_sql(seed: int) -> str:
    u = _u(seed, 1)
    cum, whens = 0.0, []
    total = sum(KIND_P.values())
    for kind, p in list(KIND_P.items())[:-1]:
        cum += p / total
        whens.append(f"when {u} < {cum!r} then '{kind}'")
    return f"(case {' '.join(whens)} else '{list(KIND_P)[-1]}' end)"


def _line_sql(seed: int) -> str:
    """One event's JSON line from the columns of the `ev` relation (compact, key order as
    `rollout simulate` writes it)."""
    return """
        '{"event_id":"' || event_id || '","ts":"' || ts_text || '","phase":"' || phase
        || '","kind":"' || kind || '","session_id":"s-' || session::VARCHAR
        || '","tenant":"' || tenant || '","environment":"' || environment
        || '","tags":{"observed_only":' || observed_only::VARCHAR || ',"dry_run":'
        || dry_run::VARCHAR || '}'
        || case when kind = 'autosave' then ',"latency_ms":' || latency_ms::VARCHAR else '' end
        || case when kind in ('autosave', 'restore', 'merge') then ',"ok":' || ok::VARCHAR
           else '' end
        || case when kind = 'merge' then ',"conflict":' || conflict::VARCHAR else '' end
        || '}'
    """


def phase_segments(start: datetime, hours: float,
                   phases: tuple[str, ...] = PHASES) -> list[tuple[str, datetime, datetime]]:
    """Contiguous, window-aligned segments of the span, one per phase (like `rollout simulate`)."""
    windows = max(1, int(round(hours * 4)))
    per = max(1, windows // len(phases))
    out, w = [], 0
    for i, name in enumerate(phases):
        count = windows - w if i == len(phases) - 1 else min(per, windows - w)
        if count <= 0:
            break
        out.append((name, start + timedelta(minutes=15 * w),
                    start + timedelta(minutes=15 * (w + count))))
        w += count
    return out


def write_phase(con, path: Path, phase: str, start: datetime, end: datetime, n: int,
                seed: int, id_prefix: str = "", noise: bool = True) -> int:
    """Append n events spread evenly over [start, end) to `path` (plus duplicates and junk
    lines when `noise`). Returns the number of lines written."""
    if n <= 0:
        return 0
    span_ms = int((end - start).total_seconds() * 1000)
    t0 = int((start - datetime(1970, 1, 1)).total_seconds() * 1000)
    cohort, standard_share = TENANTS.get(phase, ("standard", 1.0))
    ps = seed * 131 + PHASES.index(phase) if phase in PHASES else seed * 131 + 99
    u = lambda s: _u(ps, s)  # noqa: E731
    kind = _kind_sql(ps)
    normal = f"(sqrt(-2 * ln(1 - {u(2)})) * cos(2 * pi() * {u(3)}))"
    ok_p = (f"(case kind when 'autosave' then {HEALTHY['autosave_ok']} "
            f"when 'restore' then {HEALTHY['restore_ok']} else {HEALTHY['merge_ok']} end)")
    ev = f"""
        select i, '{seed:x}-{id_prefix}{phase}-' || lpad(i::VARCHAR, 9, '0') as event_id,
            make_timestamp(({t0} + (i * {span_ms}) // {n} + (hash({ps}, 9, i) % 997)::BIGINT
                            % greatest(1, {span_ms} // {n})) * 1000) as ts,
            '{phase}' as phase, kind,
            1 + (hash({ps}, 4, i) % 4999)::BIGINT as session,
            case when {u(5)} < {standard_share} then 'standard' else '{cohort}' end as tenant,
            case when {u(6)} < {0.03 if noise else 0} then 'staging' else 'production' end
                as environment,
            {u(7)} < {0.02 if noise else 0} as observed_only,
            {u(8)} < {0.005 if noise else 0} as dry_run,
            round(exp(ln({LATENCY_MEDIAN_MS}) + {LATENCY_SIGMA} * {normal}), 1) as latency_ms,
            {u(10)} < {ok_p} as ok,
            {u(11)} < {HEALTHY['conflict']} as conflict,
            {u(12)} < 0.05 as jst
        from (select i, {kind} as kind from range({n}) r(i))
    """
    ts_text = (
        "case when jst then strftime(ts + interval 9 hour, '%Y-%m-%dT%H:%M:%S.%g') || '+09:00' "
        "else strftime(ts, '%Y-%m-%dT%H:%M:%S.%g') || 'Z' end"
    )
    dups = n // DUP_EVERY if noise else 0
    junk = n // JUNK_EVERY if noise else 0
    junk_values = ", ".join("('" + j.replace("'", "''") + "')" for j in JUNK)
    lines = f"""
        with ev as (select *, {ts_text} as ts_text from ({ev})),
        lines as (select i::DOUBLE as pos, {_line_sql(seed)} as line from ev),
        -- a retry lands a little later than the original delivery
        dup as (select (d.ref + 1 + hash({ps}, 13, d.j) % 200)::DOUBLE + 0.5 as pos, l.line
                from (select j, (hash({ps}, 14, j) % {n})::BIGINT as ref
                      from range({dups}) r(j)) d
                join lines l on l.pos = d.ref::DOUBLE),
        junk_text as (select row_number() over () - 1 as k, t as line
                      from (values {junk_values}) v(t)),
        junk as (select (hash({ps}, 15, j) % {n})::DOUBLE + 0.25 as pos, jt.line
                 from range({junk}) r(j) join junk_text jt on jt.k = j % {len(JUNK)})
        select line from (select * from lines union all select * from dup
                          union all select * from junk)
        order by pos
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    con.execute(f"copy ({lines}) to '{tmp}' "
                "(format csv, header false, quote '', escape '', delimiter '\x1f')")
    # COPY cannot append: stream the new part onto the end of the file.
    with open(path, "ab") as out, open(tmp, "rb") as src:
        while block := src.read(16 << 20):
            out.write(block)
    tmp.unlink()
    return n + dups + junk


def generate(home: Path, events: int, start: datetime, hours: float = 24.0, seed: int = 7,
             threads: int | None = None, noise: bool = True) -> dict[str, int]:
    """Write `events` events over `hours` from `start`, split over the phases like `rollout
    simulate` does. Returns {file: lines written}."""
    con = duckdb.connect()
    if threads:
        con.execute(f"set threads = {threads}")
    segs = phase_segments(start, hours)
    total_ms = sum((e - s).total_seconds() for _, s, e in segs)
    out, given = {}, 0
    for k, (phase, s, e) in enumerate(segs):
        n = events - given if k == len(segs) - 1 else int(events * (e - s).total_seconds()
                                                            / total_ms)
        given += n
        path = home / "reports" / "canary" / f"phase-{phase}.jsonl"
        out[str(path)] = write_phase(con, path, phase, s, e, n, seed, noise=noise)
    con.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--start", default="2025-01-18")
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    t = time.perf_counter()
    files = generate(Path(args.home), args.events, datetime.fromisoformat(args.start),
                     args.hours, args.seed)
    size = sum(Path(f).stat().st_size for f in files)
    print(f"wrote {sum(files.values())} lines ({size / 1e6:.0f} MB) to {len(files)} files in "
          f"{time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
