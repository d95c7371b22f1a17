"""The dashboard's data and page, on a real DuckDB file filled by the real Collector and Analyzer.

Four A-1 windows 09:00-10:00 (pipeline_helpers.write_breach_data): 09:15 breaks restore_success
(6 of 12 restores fail), 09:45 has too small a sample; A-0 sessions run beside them. The browser
checks of the rendered page are in test_browser.py.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import dagster as dg
import pytest
import yaml

from rollout_assets.analyze import judge_range, score_range
from rollout_assets.assets.dashboard import dashboard
from rollout_assets.collect import compute_window_metrics, ingest_canary
from rollout_assets.dashboard.queries import dashboard_data
from rollout_assets.dashboard.render import dashboard_path, json_for_script, render_dashboard
from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import load_policy
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.warehouse import connect
from rollout_assets_tests.conftest import event, write_canary
from rollout_assets_tests.pipeline_helpers import BREACH_WINDOW, WINDOWS, write_breach_data

NOW = datetime(2025, 1, 18, 12, 0)


def _judge(home: RolloutHome, policy) -> None:
    """Collector and Analyzer over 09:00-10:00, as the window assets run them."""
    con = connect(home.db_path)
    try:
        ingest_canary(con, home, policy)
        compute_window_metrics(con, policy, WINDOWS[0], WINDOWS[-1], NOW)
        score_range(con, policy, WINDOWS[0], WINDOWS[-1], NOW)
        judge_range(con, policy, WINDOWS[0], WINDOWS[-1], NOW)
    finally:
        con.close()


def _home_policy(home: RolloutHome, a1_restore: float):
    """A home-local governance/policy.yaml whose A-1 restore threshold differs from the repo's."""
    raw = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text())
    for phase in raw["phases"]:
        if phase["name"] == "A-1":
            for rule in phase["slos"]:
                if rule["metric"] == "restore_success_rate":
                    rule["threshold"] = a1_restore
    (home.root / "governance").mkdir()
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_policy(home.policy_path)


@pytest.fixture
def judged(home: RolloutHome):
    write_breach_data(home)
    policy = _home_policy(home, a1_restore=0.6)
    _judge(home, policy)
    return home, policy


def _data(home, policy) -> dict:
    con = connect(home.db_path, read_only=True)
    try:
        return dashboard_data(con, home, policy, now=NOW)
    finally:
        con.close()


def _chart(data: dict, chart_id: str) -> dict:
    return next(c for p in data["panels"] for c in p["charts"] if c["id"] == chart_id)


def test_threshold_lines_are_the_policys_over_the_phases_that_judge_them(judged):
    home, policy = judged
    data = _data(home, policy)
    assert [p["id"] for p in data["panels"]] == ["autosave", "restore", "merge", "sla"]
    assert data["bands"] == [{"phase": "A-1", "t0": "2025-01-18T09:00:00Z",
                              "t1": "2025-01-18T10:00:00Z", "windows": 4}]
    restore = {t["phase"]: t for t in _chart(data, "restore_success")["thresholds"]}
    # every phase whose rules judge restore_success_rate, with the home policy's values
    assert {p: t["value"] for p, t in restore.items()} == {
        ph.name: r.threshold for ph, r in policy.all_slos() if r.metric == "restore_success_rate"}
    assert restore["A-1"]["value"] == 0.6 and restore["A-1"]["comparator"] == ">="
    assert restore["A-1"]["segments"] == [["2025-01-18T09:00:00Z", "2025-01-18T10:00:00Z"]]
    assert restore["A-2"]["segments"] == []  # no A-2 traffic in range: nothing drawn
    # 09:15's 0.5 is below the home policy's 0.6: one failed evaluation, one breach
    assert [(f["t"], f["slo"], f["value"]) for f in data["failed_scores"]] == [
        ("2025-01-18T09:15:00Z", "restore_success", 0.5)]
    assert [(b["t"], b["phase"], b["rollback_to"]) for b in data["breaches"]] == [
        ("2025-01-18T09:15:00Z", "A-1", "A-0")]
    # metric rows are columns of window_metrics, one entry per (window, phase)
    rows = data["rows"]
    a1 = [i for i, p in enumerate(rows["phase"]) if p == "A-1"]
    assert [rows["restore_success_rate"][i] for i in a1] == [1.0, 0.5, 1.0, 1.0]
    assert [rows["autosave_p95_ms"][i] for i in a1] == [pytest.approx(1545.0)] * 4


def test_sla_and_signoff_reflect_the_warehouse(judged):
    home, policy = judged
    data = _data(home, policy)
    assert [(r["phase"], r["judged"], r["passed"], r["breaches"]) for r in data["phase_sla"]] == [
        ("A-0", 0, 0, 0), ("A-1", 4, 3, 1)]
    assert data["hourly"]["attainment"] == [None, 0.75]  # A-0 not judged; A-1 3 of 4
    items = {i["check"]: i for s in data["signoff"] for i in s["items"]}
    restore = items["A-1 restore_success: restore_success_rate >= 0.6"]
    assert restore["status"] == "fail" and restore["detail"].startswith("2 passed, 1 failed, 1 ")
    # breach without its alert report or rollback yet: the reviewer sees both gaps
    assert items["every breached window has its alert report in reports/alerts/"][
        "status"] == "fail"
    assert items["every rollback_required verdict has a rollback run"]["status"] == "fail"
    assert items["rollback logs record ExitCode=0 (seed §8 step 3)"]["status"] == "n/a"

    con = connect(home.db_path)
    try:  # a failed rollback, as rollback_job records it
        con.execute(
            "insert into rollbacks values (?, ?, 'A-1', 'A-0', 'failed', 'flags:rollback', 3, "
            "'boom', NULL, 'A-1', 'A-1', 'run-1', ?, ?, ?)",
            ["20250118T0915Z:A-1", BREACH_WINDOW, policy.version, NOW, NOW])
    finally:
        con.close()
    data = _data(home, policy)
    items = {i["check"]: i for s in data["signoff"] for i in s["items"]}
    assert items["every rollback_required verdict has a rollback run"]["status"] == "pass"
    assert items["rollback logs record ExitCode=0 (seed §8 step 3)"]["status"] == "fail"
    assert data["rollbacks"][0]["exit_code"] == 3


def test_page_is_offline_escaped_and_survives_a_missing_incidents_table(judged):
    home, policy = judged
    # a hostile phase value reaches the quarantine reasons the page lists
    write_canary(home, "A-1", [event(event_id="x", phase="</script><img src=x onerror=alert(1)>")])
    con = connect(home.db_path)
    try:
        ingest_canary(con, home, policy)
        con.execute("drop table if exists incidents")
        path, data = render_dashboard(con, home, policy)
    finally:
        con.close()
    assert path == dashboard_path(home) and data["incidents"] is None
    html = path.read_text(encoding="utf-8")
    assert "<img" not in html and html.count("</script>") == 2
    assert "This warehouse has no <code>incidents</code> table." in html
    # nothing is fetched: no external script, style, font or image
    assert not re.search(r"<link|<script[^>]+src=|<img|@import|url\(", html, re.I)
    assert not re.search(r"(src|href)=\"https?:", html)
    embedded = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>',
                         html, re.S).group(1)
    assert json.loads(embedded)["breaches"][0]["t"] == "2025-01-18T09:15:00Z"
    assert any("</script><img" in q["reason_kind"] for q in json.loads(embedded)["quarantine"][
        "by_reason"])


def test_empty_warehouse_renders_a_page_that_says_so(home: RolloutHome, policy):
    con = connect(home.db_path)
    try:
        path, data = render_dashboard(con, home, policy)
    finally:
        con.close()
    assert data["range"] is None and data["breaches"] == []
    html = path.read_text(encoding="utf-8")
    assert "no window has data yet" in html and 'data-panel="sla"' in html


def test_json_for_script_cannot_close_the_script_element():
    text = json_for_script({"a": "</script><!-- & >", "nan": float("nan"), "t": NOW})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"a": "</script><!-- & >", "nan": None,
                                "t": "2025-01-18T12:00:00Z"}


def test_dashboard_asset_materializes_with_metadata(judged):
    home, policy = judged
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [dashboard], instance=instance,
        resources={"home": HomeResource(root=str(home.root)),
                   "warehouse": DuckDBWarehouse(path=str(home.db_path))},
        run_config={"ops": {"dashboard": {"config": {"days": 1.0}}}},
    )
    assert result.success
    md = result.asset_materializations_for_node("dashboard")[0].metadata
    assert md["relative_path"].value == "reports/dashboard/index.html"
    assert md["breaches"].value == 1 and md["windows"].value == 4
    assert md["from"].value == "2025-01-18T09:00:00Z" and md["to"].value == "2025-01-18T10:00:00Z"
    assert "| A-1 | 4 | 3 | 75.0 % | 1 | 0 |" in md["attainment_by_phase"].value
    assert dashboard_path(home).is_file()
