"""Secrets and paths: tokens come only from the environment and are never written anywhere, and
every file a run writes stays under the rollout home.

`rollout` runs as a user would run it (subprocesses) with marker values in SLACK_BOT_TOKEN and
both PagerDuty routing keys, pointed at a real HTTP server on 127.0.0.1 that checks them (so the
secrets are really used), with a rollback command that dumps its environment (so a leaky script
is covered too). Then every byte under the home (DuckDB, `.dagster` run and event storage,
reports, outbox, logs) and everything the commands printed is searched for the markers; the
working directory, $HOME and $TMPDIR the commands ran with must still be empty.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets_tests.conftest import write_canary
from rollout_assets_tests.fake_endpoints import FakeEndpoints
from rollout_assets_tests.reliability_helpers import T0, clean_env, ok, rollout, window_events

SLACK_TOKEN = "xoxb-0000-MARKERSLACK-9f8e7d"
PD_AUTOSAVE = "MARKERPDAUTOSAVE0123456789abcdef"
PD_MERGE = "MARKERPDMERGE0123456789abcdef0000"
MARKERS = (SLACK_TOKEN, PD_AUTOSAVE, PD_MERGE)

LEAKY_ROLLBACK = """\
import os, subprocess, sys
print("environment:", dict(os.environ), flush=True)  # a careless script
sys.exit(subprocess.call([sys.executable, "-m", "rollout_assets.cli", "--home", sys.argv[2],
                          "flags", "rollback", "--phase", sys.argv[1]]))
"""


def leaky_policy(home: RolloutHome) -> None:
    raw = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text())
    script = home.root / "governance" / "rollback.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(LEAKY_ROLLBACK)
    raw["rollback"]["command"] = ["{python}", str(script), "{phase}", "{home}"]
    (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def files_containing(root: Path, needles: tuple[str, ...]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found = [n for n in needles if n.encode() in data]
            if found:
                hits[str(p.relative_to(root))] = found
    return hits


@pytest.mark.parametrize("slack_accepts", [True, False], ids=["delivered", "slack-rejects-token"])
def test_tokens_are_used_but_never_written_and_nothing_lands_outside_the_home(tmp_path,
                                                                             slack_accepts):
    """With Slack rejecting the token (invalid_auth) the run fails and reports why: the error
    messages, the ledger's failure reasons and the Dagster failure events hold no secret either."""
    home = RolloutHome((tmp_path / "home").resolve())
    home.root.mkdir()
    outside = {name: tmp_path / name for name in ("cwd", "userhome", "tmpdir")}
    for d in outside.values():
        d.mkdir()
    leaky_policy(home)
    lines = []
    for i in range(4):
        lines += window_events("A-1", T0 + timedelta(minutes=15 * i), f"w{i}",
                               failed_restores=6 if i == 1 else 0)
    write_canary(home, "A-1", lines + ["not json"])

    with FakeEndpoints(slack_token=SLACK_TOKEN if slack_accepts else "xoxb-another") as ep:
        env = clean_env(SLACK_BOT_TOKEN=SLACK_TOKEN, PAGERDUTY_ROUTING_KEY_AUTOSAVE=PD_AUTOSAVE,
                        PAGERDUTY_ROUTING_KEY_MERGE=PD_MERGE,
                        ROLLOUT_SLACK_BASE_URL=ep.slack_base_url,
                        ROLLOUT_PAGERDUTY_URL=ep.pagerduty_url,
                        HOME=str(outside["userhome"]), TMPDIR=str(outside["tmpdir"]))
        printed = []
        for args in (["flags", "promote", "--phase", "A-1"],
                     ["run", "--from", "2025-01-18T09:00Z", "--to", "2025-01-18T10:00Z"],
                     ["flags", "show"]):
            proc = rollout(home, *args, env=env, cwd=outside["cwd"])
            printed += [proc.stdout, proc.stderr]
            if slack_accepts or args[0] != "run":
                ok(proc)
            else:
                assert proc.returncode == 1 and "invalid_auth" in proc.stdout + proc.stderr
                # one line says why: no Dagster ERROR records and stack traces before it
                # (77-156 lines, found by an independent audit), no exception class names
                assert proc.stderr.count("\n") == 1, proc.stderr
                assert proc.stderr.startswith("rollout: window run ") and (
                    "step alert_reports failed: notification delivery failed" in proc.stderr)
                assert "Error:" not in proc.stderr and "Traceback" not in proc.stderr
        slack = ep.of("chat.postMessage")
        pages = ep.pd_events()

    # the secrets were really in use: Slack saw the bearer token, PagerDuty the routing key
    assert slack and all({k.lower(): v for k, v in r.headers.items()}.get("authorization")
                         == f"Bearer {SLACK_TOKEN}" for r in slack)
    assert all(r.ok for r in slack) == slack_accepts
    assert pages and {e["routing_key"] for e in pages} == {PD_AUTOSAVE}
    logs = list((home.root / "reports" / "rollbacks").glob("*.log"))
    assert logs and "environment:" in logs[0].read_text()  # the leaky rollback command ran

    # ... and were written nowhere: not in any file under the home, not in what was printed
    assert files_containing(home.root, MARKERS) == {}
    assert (home.dagster_home / "dagster.yaml").exists()  # .dagster was searched too
    assert not [m for m in MARKERS for text in printed if m in text]
    # every file written is under the home
    for name, d in outside.items():
        assert list(d.rglob("*")) == [], f"{name} got files: {list(d.rglob('*'))}"
