"""rollback_job: runs the policy's rollback command (argv, no shell, timeout), moves the flag store,
records the exit code and log in `rollbacks`, and the window's alert report carries it; a failing
command fails the run and is recorded with its exit code."""

from __future__ import annotations

import sys
import textwrap

import dagster as dg
import pytest
import yaml

from rollout_assets.definitions import build_definitions
from rollout_assets.home import PROJECT_ROOT
from rollout_assets.partitions import partition_key, window_stamp
from rollout_assets.policy import load_policy
from rollout_assets.runner import QUIET, prepare_instance
from rollout_assets_tests.pipeline_helpers import (
    BREACH_WINDOW,
    breach_home_with_flags_at_a1,
    persistent_home,
    query,
)

STAMP = window_stamp(BREACH_WINDOW)
REQUEST = {"window": STAMP, "phase": "A-1", "rollback_to": "A-0", "level": "P2",
           "failed_slos": ["restore_success"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A home whose 09:15 window breached in A-1 (materialized, not yet rolled back) while the
    flags are at A-1."""
    with persistent_home(tmp_path_factory, "rollback") as home:
        breach_home_with_flags_at_a1(home)
        instance = prepare_instance(home)
        defs = build_definitions(home)
        res = defs.resolve_job_def("rollout_window_job").execute_in_process(
            partition_key=partition_key(BREACH_WINDOW), instance=instance, run_config=QUIET)
        assert res.success
        yield home, instance, defs
        instance.dispose()


def run_rollback(env, **overrides):
    home, instance, defs = env
    return defs.resolve_job_def("rollback_job").execute_in_process(
        run_config={**QUIET, "ops": {"execute_rollback": {"config": {**REQUEST, **overrides}}}},
        instance=instance, raise_on_error=False, tags={"test": "rollback"})


def flag_phase(home) -> str:
    return query(home, "select phase from flag_state")[0][0]


def alert_report(home) -> str:
    return (home.root / "reports" / "alerts" / f"{STAMP}.md").read_text(encoding="utf-8")


def home_policy(home, **rollback) -> None:
    """A home-local governance/policy.yaml: the project's policy with another rollback block."""
    raw = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text())
    raw["rollback"].update(rollback)
    path = home.root / "governance" / "policy.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert home.policy_path == path


def script(home, name: str, body: str) -> str:
    path = home.root / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_the_breach_report_waits_for_the_rollback(env):
    home, _, _ = env
    report = alert_report(home)
    assert "Pending" in report and f"{STAMP}:A-1" in report and "ExitCode=" not in report
    assert query(home, "select count(*) from rollbacks") == [(0,)]


def test_a_failing_command_fails_the_run_and_records_exit_code_3(env):
    home, _, _ = env
    fail = script(home, "fail.py", """\
        import sys
        print("flag service said no to", sys.argv[1])
        sys.exit(3)
    """)
    home_policy(home, command=["{python}", fail, "{phase}"])
    try:
        before = flag_phase(home)
        res = run_rollback(env)
        assert not res.success
        failure = next(e for e in res.all_events if e.is_step_failure)
        assert "ExitCode=3" in failure.step_failure_data.error.message or \
            "ExitCode=3" in str(failure.step_failure_data.user_failure_data.description)
        row = query(home, "select status, exit_code, command, log_tail, log_path, rollback_to, "
                          "dagster_run_id from rollbacks where rollback_id = ?", [f"{STAMP}:A-1"])
        assert len(row) == 1
        status, code, command, tail, log_path, to, run_id = row[0]
        assert (status, code, to, run_id) == ("failed", 3, "A-0", res.run_id)
        assert command == f"{sys.executable} {fail} A-0"
        assert "flag service said no to A-0" in tail
        log = (home.root / log_path).read_text()
        assert "flag service said no to A-0" in log and "ExitCode=3" in log
        assert flag_phase(home) == before == "A-1"  # nothing moved
        report = alert_report(home)
        assert "ExitCode=3" in report and "failed" in report
    finally:
        (home.root / "governance" / "policy.yaml").unlink()


def test_a_hanging_command_is_killed_at_the_timeout(env):
    home, _, _ = env
    hang = script(home, "hang.py", """\
        import sys, time
        print("waiting for", sys.argv[1], flush=True)
        time.sleep(30)
    """)
    home_policy(home, command=["{python}", hang, "{phase}"], timeout_seconds=1)
    try:
        res = run_rollback(env)
        assert not res.success
        status, code, tail = query(home, "select status, exit_code, log_tail from rollbacks")[0]
        assert (status, code) == ("timed_out", 124)
        assert "timed out after 1s" in tail
        assert flag_phase(home) == "A-1"
        assert "ExitCode=124" in alert_report(home)
    finally:
        (home.root / "governance" / "policy.yaml").unlink()


@pytest.mark.parametrize("field,value", [("rollback_to", "A-0; rm -rf /"),
                                         ("rollback_to", "../../x"), ("phase", "Z-9")])
def test_a_bad_phase_never_reaches_the_command(env, field, value):
    home, _, _ = env
    before = query(home, "select * from rollbacks order by all")
    res = run_rollback(env, **{field: value})
    assert not res.success
    assert query(home, "select * from rollbacks order by all") == before
    assert flag_phase(home) == "A-1"


def test_the_rollback_moves_the_flags_and_records_exit_code_0(env):
    home, _, _ = env
    res = run_rollback(env)
    assert res.success
    assert flag_phase(home) == "A-0"
    policy = load_policy(home.policy_path)
    state = query(home, "select flags from flag_state")[0][0]
    assert yaml.safe_load(state) == dict(policy.phase("A-0").flags)
    history = query(home, "select action, from_phase, to_phase from flag_history "
                          "order by changed_at")
    assert history[-1] == ("rollback", "A-1", "A-0")
    rows = query(home, "select status, exit_code, flags_before, flags_after, log_path "
                       "from rollbacks")
    assert len(rows) == 1  # the earlier failed attempts of this breach were replaced
    status, code, before, after, log_path = rows[0]
    assert (status, code) == ("succeeded", 0)
    assert before.startswith("A-1") and after.startswith("A-0")
    assert "ExitCode=0" in (home.root / log_path).read_text()
    report = alert_report(home)
    assert "ExitCode=0" in report and "Pending" not in report
    # every bullet on its own line (an `{% endif %}` ending a line ate the newline after it:
    # "- Level: **P2**- Policy: ..." and "- ExitCode=0- Flags: ...")
    lines = report.splitlines()
    for bullet in ("- Level: ", "- Policy: ", "- Flags now: ", "- ExitCode=0", "- Flags: A-1"):
        assert any(line.startswith(bullet) for line in lines), bullet
    assert not [line for line in lines if line.count("- ") > 1 and line.startswith("- ")
                and ("- Policy" in line[2:] or "- Flags" in line[2:])]
    assert any(line.startswith("> rollback_required=true, rollback_to=A-0") for line in lines)
    kinds = query(home, "select kind, channel from notifications where kind = 'rollback'")
    assert kinds and all(ch.startswith("#") for _, ch in kinds)
    mat = res.get_step_success_events()[0]
    assert mat.step_key == "execute_rollback"
    outputs = [e for e in res.all_events if e.event_type == dg.DagsterEventType.STEP_OUTPUT]
    md = outputs[0].event_specific_data.metadata
    assert md["exit_code"].value == 0 and md["flags_after"].value.startswith("A-0")
