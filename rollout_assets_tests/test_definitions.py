"""The code location: it loads, `dagster definitions validate` accepts it, and the asset graph is
pinned here so that a renamed asset, group, dependency or check is a visible diff in review.

When you change the graph on purpose, update GRAPH below (the assertion prints the new one)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from rollout_assets.checks.slo_checks import check_name
from rollout_assets.definitions import build_definitions
from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import PolicyError

WINDOW, DAILY = "TimeWindowPartitionsDefinition", "DailyPartitionsDefinition"
GRAPH = {
    "assets": {
        "canary_events": {"group": "collector", "deps": [], "partitions": WINDOW},
        "window_metrics": {"group": "collector", "deps": ["canary_events"], "partitions": WINDOW},
        "slo_scores": {"group": "analyzer", "deps": ["window_metrics"], "partitions": WINDOW},
        "window_verdicts": {"group": "analyzer", "deps": ["slo_scores"], "partitions": WINDOW},
        "incidents": {"group": "governance", "deps": ["window_verdicts"], "partitions": None},
        "alert_reports": {"group": "reporter", "deps": ["incidents", "window_verdicts"],
                          "partitions": WINDOW},
        "dashboard": {"group": "reporter", "deps": ["alert_reports", "incidents", "slo_scores",
                                                    "window_metrics", "window_verdicts"],
                      "partitions": None},
        "sla_daily": {"group": "governance", "deps": ["incidents"], "partitions": DAILY},
    },
    # checks the code defines; the one-per-policy-rule checks on slo_scores are compared with
    # the policy itself in test_one_check_per_policy_rule
    "checks": ["alert_reports:etl_slot", "sla_daily:ga_gate", "window_metrics:etl_slot",
               "window_verdicts:etl_slot"],
    "jobs": ["__ASSET_JOB", "rollback_job", "rollout_daily_job", "rollout_window_job"],
    "sensors": ["breach_sensor", "canary_late_data_sensor", "sla_refresh_sensor"],
    "schedules": ["daily_sla", "every_15_minutes"],
}


def policy_checks(policy) -> set[str]:
    rules = [(p, r) for p, r in policy.all_slos()] + [
        (p, b) for p in policy.phases for b in getattr(p, "burn_rate_alerts", ())]
    return {check_name(p.name, r.name) for p, r in rules}


def graph_of(defs: dg.Definitions, policy) -> dict:
    g = defs.resolve_asset_graph()
    derived = policy_checks(policy)
    assets = {}
    for key in g.get_all_asset_keys():
        node = g.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": type(node.partitions_def).__name__ if node.partitions_def else None,
        }
    return {
        "assets": assets,
        "checks": sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in g.asset_check_keys
                         if not (c.asset_key == dg.AssetKey("slo_scores") and c.name in derived)),
        "jobs": sorted(j.name for j in defs.resolve_all_job_defs()),
        "sensors": sorted(s.name for s in defs.sensors or []),
        "schedules": sorted(s.name for s in defs.schedules or []),
    }


def test_the_code_location_loads(home):
    import rollout_assets.definitions as module

    dg.Definitions.validate_loadable(module.defs())
    defs = build_definitions(home)
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("rollout_window_job") is not None
    assert defs.resolve_sensor_def("breach_sensor").job_name == "rollback_job"


def test_the_asset_graph_is_pinned(home, policy):
    got = graph_of(build_definitions(home), policy)
    assert got == GRAPH, "asset graph changed; if on purpose, set GRAPH to:\n" + json.dumps(
        got, indent=1, sort_keys=True)


def test_window_assets_share_one_partitioning_and_run_a_range_in_one_run(home):
    g = build_definitions(home).resolve_asset_graph()
    window = [k for k, v in GRAPH["assets"].items() if v["partitions"] == WINDOW]
    defs_ = {g.get(dg.AssetKey(k)).partitions_def for k in window}
    assert len(defs_) == 1
    (pdef,) = defs_
    assert pdef.cron_schedule == "*/15 * * * *" and pdef.timezone == "UTC"
    for k in window:
        policy = g.get(dg.AssetKey(k)).backfill_policy
        assert policy is not None and policy.max_partitions_per_run is None, k


def test_one_check_per_slo_of_the_policy(home, policy):
    got = {c.name for c in build_definitions(home).resolve_asset_graph().asset_check_keys
           if c.asset_key == dg.AssetKey("slo_scores")}
    rules = policy.all_slos() + policy.all_burn_rules()
    assert got == {check_name(p.name, r.name) for p, r in rules}


def _home_policy(home: RolloutHome, change) -> None:
    raw = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text())
    change(raw)
    path = home.root / "governance" / "policy.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False))


def test_adding_an_slo_is_a_yaml_change(home):
    def add(raw):
        next(p for p in raw["phases"] if p["name"] == "B-0")["slos"].append(dict(
            name="merge_conflicts", metric="merge_conflict_rate", comparator="<=",
            threshold=0.1, min_sample=10, severity="warning", rollback=False))
    _home_policy(home, add)
    g = build_definitions(home).resolve_asset_graph()
    spec = g.get_check_spec(dg.AssetCheckKey(dg.AssetKey("slo_scores"), "b0_merge_conflicts"))
    assert "merge_conflict_rate <= 0.1" in spec.description


def test_a_broken_policy_fails_loading_the_code_location(home):
    _home_policy(home, lambda raw: raw["phases"][1]["slos"][0].update(comparator="=<"))
    with pytest.raises(PolicyError, match="comparator"):
        build_definitions(home)


def test_dagster_definitions_validate(tmp_path):
    dagster = Path(sys.executable).with_name("dagster")
    (tmp_path / ".dagster").mkdir()
    env = {**os.environ, "ROLLOUT_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path / ".dagster")}
    proc = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=str(PROJECT_ROOT), env=env, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "All code locations passed validation" in out
