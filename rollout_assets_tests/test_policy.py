"""governance/policy.yaml validation: a bad policy fails at load time, naming the field and the
reason; a good one gives the phase order every other part of the platform derives from."""

from __future__ import annotations

import copy

import pytest
import yaml

from rollout_assets.home import PROJECT_ROOT
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.policy import Policy, PolicyError, load_policy, parse_policy

POLICY_TEXT = (PROJECT_ROOT / "governance" / "policy.yaml").read_text(encoding="utf-8")
RAW = yaml.safe_load(POLICY_TEXT)


def _phase(raw: dict, name: str) -> dict:
    return next(p for p in raw["phases"] if p["name"] == name)


def _slo(raw: dict, phase: str, slo: str) -> dict:
    return next(s for s in _phase(raw, phase)["slos"] if s["name"] == slo)


def mutated(change) -> str:
    """The real policy with one change applied, as YAML text."""
    raw = copy.deepcopy(RAW)
    change(raw)
    return yaml.safe_dump(raw, sort_keys=False)


def load_error(text: str) -> str:
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "policy.yaml")
    msg = str(err.value)
    assert msg.startswith("policy.yaml: "), msg
    assert "\n" not in msg, f"the CLI prints this as a one-line reason: {msg!r}"
    return msg


# ---- the real policy ---------------------------------------------------------------------------

def test_real_policy_loads_with_phase_order_and_hash(policy: Policy):
    assert policy.phase_names == ("A-0", "A-1", "A-2", "B-0", "B-1")
    assert [policy.previous_phase(p) for p in policy.phase_names] == [
        None, "A-0", "A-1", "A-2", "B-0"]
    assert policy.next_phase("B-1") is None
    assert len(policy.version) == 12 and policy.content_hash.startswith(policy.version)
    # every flag is set by every phase, from the policy's own flag list
    for p in policy.phases:
        assert set(p.flags) == set(policy.flags.values())
    # the seed's thresholds, read from the file (not repeated in code)
    assert _slo(RAW, "A-1", "autosave_p95")["threshold"] == 2500
    assert policy.phase("A-1").slos[0].threshold == 2500.0


def test_how_far_later_verdicts_read_a_phases_events(policy: Policy):
    """The late-data sensor re-scores these windows after a late event (`read_later`)."""
    from datetime import timedelta

    assert policy.read_later("A-0") == timedelta(hours=RAW["baseline"]["lookback_hours"])
    burn = _phase(RAW, "A-2")["burn_rate_alerts"][0]["long_minutes"]
    assert policy.read_later("A-2") == timedelta(minutes=burn - 15)  # it ends with its window
    assert [policy.read_later(p) for p in ("A-1", "B-0", "B-1")] == [timedelta(0)] * 3
    # no phase judged against the baseline: nothing reads the baseline phase's events later
    def no_crash_rule(raw):
        for ph in raw["phases"]:
            ph["slos"] = [s for s in ph.get("slos", []) if s["metric"] != "crash_rate_delta"]
    assert parse_policy(mutated(no_crash_rule), "p.yaml").read_later("A-0") == timedelta(0)


def test_a_content_change_changes_the_version():
    a = parse_policy(POLICY_TEXT)
    b = parse_policy(POLICY_TEXT + "\n# a comment is a change too\n")
    assert a.version != b.version
    assert parse_policy(POLICY_TEXT).version == a.version


def test_a_yaml_round_trip_of_the_policy_still_loads():
    # the mutation helper below relies on this: its only difference is the one change
    parse_policy(mutated(lambda raw: None))


# ---- load-time errors: field + reason ------------------------------------------------------------

def test_invalid_yaml_names_line_and_problem():
    msg = load_error("phases: [\n  - name: A-0\n")
    assert "not valid YAML" in msg and "line " in msg


def test_not_a_mapping():
    assert "must be a mapping" in load_error("- just\n- a list\n")


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_unknown_metric():
    msg = load_error(mutated(lambda r: _slo(r, "A-1", "autosave_p95").update(metric="p99_ms")))
    assert "phases.1.slos.0.metric" in msg and "unknown metric 'p99_ms'" in msg
    # the reason lists what is known, from the catalog
    assert all(m in msg for m in METRICS)


@pytest.mark.parametrize("comparator", ["=<", "==", "", "lt"])
def test_bad_comparator(comparator):
    msg = load_error(mutated(
        lambda r: _slo(r, "A-2", "crash_rate_delta").update(comparator=comparator)))
    assert "phases.2.slos.1.comparator" in msg and "'<='" in msg


def test_duplicate_phase():
    def dup(r):
        _phase(r, "A-2")["name"] = "A-1"
    msg = load_error(mutated(dup))
    assert "phases" in msg and "duplicate phase names" in msg


def test_duplicate_slo_in_a_phase():
    def dup(r):
        slos = _phase(r, "B-1")["slos"]
        slos.append(dict(slos[0]))
    msg = load_error(mutated(dup))
    assert "phases.4" in msg and "duplicate SLO names ['autosave_p95']" in msg


def test_exclusion_naming_an_unknown_phase():
    def bad(r):
        next(e for e in r["exclusions"] if e["name"] == "outside_canary")["phases"] = ["A-9"]
    msg = load_error(mutated(bad))
    assert "exclusions.outside_canary.phases" in msg and "unknown phases ['A-9']" in msg


@pytest.mark.parametrize("flags", [
    {"autosave.enabled": True},  # one missing
    {"autosave.enabled": True, "merge.precision": "legacy", "autosave.turbo": True},  # one extra
    {"autosave.enable": True, "merge.precision": "legacy"},  # a typo
])
def test_flags_not_matching_the_flag_list(flags):
    msg = load_error(mutated(lambda r: _phase(r, "A-1").update(flags=flags)))
    assert "phases.A-1.flags" in msg and "must set exactly" in msg


def test_rollback_command_without_phase_placeholder():
    msg = load_error(mutated(lambda r: r["rollback"].update(
        command=["{python}", "-m", "rollout_assets.cli", "flags", "rollback", "--phase", "A-0"])))
    assert "rollback.command" in msg and "{phase}" in msg


def test_unknown_pagerduty_service():
    msg = load_error(mutated(lambda r: _phase(r, "B-0").update(pagerduty_service="merge-duty")))
    assert "phases.B-0.pagerduty_service" in msg and "'merge-duty'" in msg


def test_unknown_baseline_phase():
    msg = load_error(mutated(lambda r: r["baseline"].update(phase="A-7")))
    assert "baseline.phase" in msg


def test_a_typo_in_a_field_name_is_not_ignored():
    def typo(r):
        slo = _slo(r, "A-1", "restore_success")
        slo["thresold"] = slo.pop("threshold")
    msg = load_error(mutated(typo))
    assert "phases.1.slos.1.thresold" in msg and "phases.1.slos.1.threshold" in msg


@pytest.mark.parametrize("field,value,reason", [
    ("severity", "P3", "'warning', 'P2' or 'P1'"),
    ("min_sample", 0, "greater than or equal to 1"),
    ("threshold", "fast", "valid number"),
    ("name", "Restore Success", "should match pattern"),
])
def test_bad_slo_values(field, value, reason):
    msg = load_error(mutated(lambda r: _slo(r, "A-1", "restore_success").update({field: value})))
    assert f"phases.1.slos.1.{field}" in msg and reason in msg


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_threshold_is_refused(threshold):
    # NaN fails every comparison (every window would breach and roll back); inf passes all
    msg = load_error(mutated(
        lambda r: _slo(r, "A-1", "autosave_p95").update(threshold=threshold)))
    assert "phases.1.slos.0.threshold" in msg and "finite" in msg


@pytest.mark.parametrize("name,value", [("staging", True), ("dry_run", "yes"),
                                        ("outside_canary", False)])
def test_exclusion_value_must_match_the_field_type(name, value):
    # `environment = true` would only blow up in DuckDB at run time
    def bad(r):
        next(e for e in r["exclusions"] if e["name"] == name)["equals"] = value
    msg = load_error(mutated(bad))
    assert "exclusions." in msg and "equals" in msg


def test_a_key_given_twice_is_refused():
    # YAML keeps the last value silently: the reviewer reads 2500, 25000 is in force
    text = POLICY_TEXT.replace("        threshold: 2500\n",
                               "        threshold: 2500\n        threshold: 25000\n", 1)
    assert text != POLICY_TEXT
    msg = load_error(text)
    assert "duplicate key 'threshold'" in msg and "line " in msg


def test_yaml_merge_keys_may_override_a_merged_key():
    a1 = ("      - name: autosave_p95\n        metric: autosave_p95_ms\n"
          "        comparator: \"<=\"\n        threshold: 2500\n        min_sample: 10\n"
          "        severity: warning\n        rollback: true\n")
    b1 = a1.replace("severity: warning", "severity: P1")
    assert POLICY_TEXT.count(a1) == 1 and POLICY_TEXT.count(b1) == 1
    text = POLICY_TEXT.replace(a1, a1.replace("- name:", "- &p95\n        name:"))
    text = text.replace(b1, "      - <<: *p95\n        severity: P1\n")
    policy = parse_policy(text)
    assert policy.phase("B-1").slos[0].severity == "P1"
    assert policy.phase("B-1").slos[0].threshold == 2500
    assert policy.phase("A-1").slos[0].severity == "warning"


def test_rollout_mode_env_is_validated(monkeypatch, policy: Policy):
    monkeypatch.setenv("ROLLOUT_MODE", "production")
    assert policy.effective_mode() == "production"
    monkeypatch.setenv("ROLLOUT_MODE", "prod")
    with pytest.raises(PolicyError, match="ROLLOUT_MODE"):
        policy.effective_mode()
    monkeypatch.delenv("ROLLOUT_MODE")
    assert policy.effective_mode() == policy.mode


@pytest.mark.parametrize("change,field", [
    (lambda r: _slo(r, "A-1", "autosave_p95").update(threshold="2500"), "threshold"),
    (lambda r: _slo(r, "A-1", "autosave_p95").update(threshold=True), "threshold"),
    (lambda r: _slo(r, "A-1", "restore_success").update(min_sample="10"), "min_sample"),
    (lambda r: _slo(r, "A-1", "restore_success").update(rollback="yes"), "rollback"),
    (lambda r: _slo(r, "A-1", "restore_success").update(rollback=1), "rollback"),
    (lambda r: r["rollback"].update(timeout_seconds="60"), "timeout_seconds"),
    (lambda r: r["incidents"].update(close_after_green_cycles=2.0), "close_after_green_cycles"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(change, field):
    """`threshold: "2500"` was read as 2500 and `threshold: true` as 1.0 (a p95 SLO of 1 ms),
    `rollback: "yes"` as true (found by an independent audit): the policy takes YAML's own
    types only; an int is still a float."""
    msg = load_error(mutated(change))
    assert field in msg, msg
    ok = parse_policy(mutated(lambda r: _slo(r, "A-1", "restore_success").update(threshold=1)))
    assert ok.phase("A-1").slos[1].threshold == 1.0


def test_rollout_mode_cannot_lift_a_production_policy(monkeypatch, policy: Policy):
    """Found by an independent audit: ROLLOUT_MODE=rehearsal let drills (--simulate-breach,
    dry-run rollbacks) into a home whose policy says production."""
    prod = policy.model_copy(update={"mode": "production"})
    monkeypatch.setenv("ROLLOUT_MODE", "rehearsal")
    assert prod.effective_mode() == "production"
    assert policy.effective_mode() == "rehearsal"
