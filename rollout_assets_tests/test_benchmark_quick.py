"""`benchmarks/bench.py --quick` runs end to end, so the issue-6 benchmark never rots.

It generates ~50k events, runs the bare DuckDB query and a backfill through Dagster on an
on-disk instance twice, alternated (the second backfill on a fresh home), stores 20k events of
earlier days, then runs one appended window, each step in its own process, and prints the
table. Timings are not asserted (other work shares the machine); what the benchmark claims is:
every step succeeds, the Collector stored exactly the valid, de-duplicated events, and the
appended window was read without reading the earlier bytes again.
"""

from __future__ import annotations

import json
import subprocess
import sys

from rollout_assets.home import PROJECT_ROOT


def test_quick_benchmark_runs_and_reports(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench.py"), "--quick",
         "--workdir", str(tmp_path / "work"), "--json", str(out_json), "--history", "20000",
         "--repeat", "2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| step | events | MB | seconds | events/s | MB/s | peak RSS MB |" in proc.stdout
    rows = {r["step"].split()[0]: r for r in json.loads(out_json.read_text())["rows"]}
    bare, back, win = rows["bare"], rows["backfill"], rows["window:"]
    assert bare["detail"]["rows"] > 0 and bare["ratio"] == 1.0
    # 50k events, one duplicate delivery per 300, one junk line per 1000: all accounted for
    d = back["detail"]
    assert d["success"] and d["windows"] == 24
    assert 49_000 < d["canary_events"] <= 50_000
    assert 40 <= d["quarantine"] <= 50
    assert d["window_metrics"] > 0 and back["ratio"] > 1
    # two alternated pairs, each backfill storing the same day; the table shows the pair with
    # the higher ratio of the two (the median of an even count, taken conservatively)
    pairs = back["pairs"]
    assert len(pairs) == 2 and back["ratio"] == max(p["ratio"] for p in pairs)
    assert back["seconds"] in {p["backfill_s"] for p in pairs}
    assert "pairs 50,000 (bare s / backfill s = ratio): " in proc.stdout
    assert not list((tmp_path / "work").glob("home-50000-r*"))  # the extra homes are removed
    w = win["detail"]
    # --history: 20k events of earlier days stored before the window, which is deduplicated
    # against them and adds its own 5k
    assert "1 window, " + f"{d['canary_events'] + 20_000:,} stored" in win["step"]
    assert w["success"] and w["canary_events"] == d["canary_events"] + 20_000 + 5_000
    # the day's bytes were overwritten with junk before the window ran: reading them again
    # would have quarantined them; only the new window's own junk lines are new
    assert w["new_quarantine"] == w["expected_new_quarantine"] == 5
    assert "earlier bytes not re-read" in proc.stdout
    # where the seconds went, read back from the runs each step made on the home's instance:
    # only that step's runs (the window step's split would go negative outside runs if it
    # counted the backfill's)
    for r in (back, win):
        split = r["detail"]
        assert all(split[p] > 0 for p in ("ingest_s", "window_run_other_s", "daily_run_s",
                                          "outside_runs_s")), split
    assert "s ingest (canary_events)" in proc.stdout
