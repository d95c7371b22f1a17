"""Real Slack and PagerDuty delivery against a real HTTP server on 127.0.0.1 (fake_endpoints):
exact payloads, routing per phase, threads and status updates, dedup across re-runs, retries and
their timing, escalation paths, mrkdwn escaping, and secrets that never reach a file or a log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from rollout_assets import flags
from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import load_policy
from rollout_assets.reporting import rca_messages, resolve_messages
from rollout_assets.resources.notifier import (
    DeliveryError,
    Message,
    Notifier,
    notifier_from_env,
)
from rollout_assets.resources.pagerduty import PagerDutyEvents
from rollout_assets.resources.slack import RolloutSlackResource
from rollout_assets.runner import RunError, run_range
from rollout_assets.warehouse import connect, records, transaction
from rollout_assets_tests.conftest import DAY, event, write_canary
from rollout_assets_tests.fake_endpoints import (
    PD_ENQUEUE,
    SLACK_POST,
    SLACK_UPDATE,
    FakeEndpoints,
    bad_request,
    rate_limited,
    server_error,
    slack_error,
)
from rollout_assets_tests.reliability_helpers import instance_of, promote_to

# Marker secrets: none of these strings may appear in any file under the home or in any log.
TOKEN = "xoxb-SECRET-MARKER-7f3c9a21"
WRONG_TOKEN = "xoxb-SECRET-MARKER-revoked-0b"
PD_AUTOSAVE = "pdkeySECRETMARKERautosave000001"
PD_MERGE = "pdkeySECRETMARKERmerge0000000002"
SECRETS = (TOKEN, WRONG_TOKEN, PD_AUTOSAVE, PD_MERGE)
AUTOSAVE = "Autosave & Precision Merge"
MERGE = "Merge Duty"
CONFIG_ENV = ("SLACK_BOT_TOKEN", "ROLLOUT_SLACK_BASE_URL", "ROLLOUT_PAGERDUTY_URL",
              "PAGERDUTY_ROUTING_KEY_AUTOSAVE", "PAGERDUTY_ROUTING_KEY_MERGE")
W0900 = DAY.replace(hour=9)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Nothing from the developer's shell: every test says which credentials exist."""
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def endpoints():
    with FakeEndpoints(slack_token=TOKEN) as ep:
        yield ep


@pytest.fixture
def pd_keys(monkeypatch):
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_AUTOSAVE", PD_AUTOSAVE)
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_MERGE", PD_MERGE)


def make_notifier(home: RolloutHome, ep: FakeEndpoints, token: str = TOKEN, **kw) -> Notifier:
    kw = {"backoff_seconds": 0.01, "max_backoff_seconds": 5.0, "outage_pause_seconds": 0, **kw}
    return Notifier(home=str(home.root),
                    slack=RolloutSlackResource(token=token, base_url=ep.slack_base_url),
                    pagerduty=PagerDutyEvents(url=ep.pagerduty_url), **kw)


def payload(ws: datetime = W0900, phase: str = "A-2", incident: str | None = None, **kw) -> dict:
    """What reporting.alert_messages puts in a breach message (one failed SLO)."""
    stamp = f"{ws:%Y%m%dT%H%MZ}"
    base = {
        "window": stamp, "window_start_text": f"{ws:%Y-%m-%d %H:%M}",
        "window_end_text": f"{ws + timedelta(minutes=15):%Y-%m-%d %H:%M}",
        "phase_title": "beta", "report": f"reports/alerts/{stamp}.md",
        "failed": [{"slo": "restore_success", "metric": "restore_success_rate", "value": 0.75,
                    "value_text": "0.75", "comparator": ">=", "threshold": 0.995,
                    "threshold_text": "0.995", "sample_size": 20, "min_sample": 10}],
        "excluded": {}, "rollback_required": True, "rollback_to": "A-1", "rollback": None,
        "run_key": f"{stamp}:{phase}", "evidence_sql": "select 1;", "service": AUTOSAVE,
        "dedup_key": incident or f"rollout-{phase}-{stamp}",
    }
    base.update(kw)
    return base


def alert(ws: datetime = W0900, channel: str = "#launch-autosave", level: str = "P2",
          phase: str = "A-2", incident: str | None = None, text: str | None = None,
          **kw) -> Message:
    text = text or (f"[{level}] {phase} breached restore_success in window "
                    f"{ws:%Y%m%dT%H%MZ}; rolling back to A-1")
    p = payload(ws, phase, incident, **kw)
    if channel.startswith("pagerduty:"):
        p["severity"] = {"P1": "critical", "P2": "error"}[level]
    return Message(ws, phase, channel, "alert", level, text, p, incident)


def ledger(con) -> dict[str, dict]:
    return {r["idempotency_key"]: r for r in records(con, "select * from notifications")}


def assert_no_secret(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for s in SECRETS:
        assert s.encode() not in data, f"a secret leaked into {where}"


def assert_home_clean(root: Path) -> int:
    """Every file under the home (DuckDB, Dagster instance and logs, reports, outbox)."""
    n = 0
    for path in root.rglob("*"):
        if path.is_file():
            assert_no_secret(str(path), path.read_bytes())
            n += 1
    return n


def strip_run_link(body: dict) -> dict:
    """Replace the run id in the Dagster link (it differs per run)."""
    return json.loads(json.dumps(body).replace("/runs/None", "/runs/RUN"))


# ---- payloads -------------------------------------------------------------------------------

def test_slack_alert_is_block_kit_with_slos_rollback_and_links(home, con, endpoints):
    n = make_notifier(home, endpoints)
    n._run_id = "run-1"  # what setup_for_execution records inside a run
    msg = alert(incident="INC-20250118T0900Z-A-2")
    assert n.send(con, msg) == "sent"
    [req] = endpoints.of(SLACK_POST)
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.body == {
        "channel": "#launch-autosave",
        "text": "[P2] A-2 breached restore_success in window 20250118T0900Z; rolling back to A-1",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                        "text": ":warning: P2 SLO breach: A-2 (beta)"}},
            {"type": "section", "text": {"type": "mrkdwn", "text":
                "[P2] A-2 breached restore_success in window 20250118T0900Z; rolling back to "
                "A-1\n*Window* 2025-01-18 09:00–09:15 UTC (20250118T0900Z)"}},
            {"type": "section", "text": {"type": "mrkdwn", "text":
                "*Failed SLOs*\n• *restore_success*: `restore_success_rate` = *0.75* vs "
                "`&gt;= 0.995` (sample 20, min 10)"}},
            {"type": "section", "text": {"type": "mrkdwn", "text":
                "*Rollback* to A-1: launched by the breach sensor (run key "
                "`20250118T0900Z:A-2`); ExitCode follows in the thread"}},
            {"type": "section", "text": {"type": "mrkdwn", "text":
                "*Reproduce* (`duckdb data/rollout.duckdb`)\n```select 1;```"}},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": "Incident `INC-20250118T0900Z-A-2`"},
                {"type": "mrkdwn", "text": "Alert report `reports/alerts/20250118T0900Z.md` · "
                                           "<http://127.0.0.1:3000/runs/run-1|Dagster run>"}]},
            {"type": "context", "block_id": "rollout_status", "elements": [
                {"type": "mrkdwn", "text": "*Status:* open: updates follow in this thread"}]},
        ],
        "unfurl_links": False, "unfurl_media": False,
    }
    row = ledger(con)[msg.idempotency_key]
    assert (row["transport"], row["status"], row["attempts"], row["response_code"]) == (
        "slack", "sent", 1, 200)
    assert row["channel_id"] == FakeEndpoints.channel_id("#launch-autosave")
    assert row["thread_ts"] == row["message_ts"]  # a new thread's root
    assert row["incident_id"] == row["dedup_key"] == "INC-20250118T0900Z-A-2"
    assert json.loads(row["body"])["blocks"] == req.body["blocks"]


def test_pagerduty_trigger_payload_and_routing_key_from_the_policy_named_variable(
        home, con, endpoints, monkeypatch):
    # the policy names the variable; rename it in a home-local policy and only that one counts
    text = (PROJECT_ROOT / "governance" / "policy.yaml").read_text()
    (home.root / "governance").mkdir()
    (home.root / "governance" / "policy.yaml").write_text(
        text.replace("routing_key_env: PAGERDUTY_ROUTING_KEY_AUTOSAVE",
                     "routing_key_env: STAGING_PD_KEY"))
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_AUTOSAVE", "not-this-one")
    monkeypatch.setenv("STAGING_PD_KEY", PD_AUTOSAVE)
    n = make_notifier(home, endpoints)
    n._run_id = "run-1"
    msg = alert(channel=f"pagerduty:{AUTOSAVE}", incident="INC-20250118T0900Z-A-2")
    assert n.send(con, msg) == "sent"
    [req] = endpoints.of(PD_ENQUEUE)
    assert req.headers["content-type"] == "application/json"
    assert req.body == {
        "routing_key": PD_AUTOSAVE, "event_action": "trigger",
        "dedup_key": "INC-20250118T0900Z-A-2",
        "payload": {
            "summary": "[P2] A-2 breached restore_success in window 20250118T0900Z; rolling "
                       "back to A-1",
            "source": "rollout-assets/A-2", "severity": "error",
            "timestamp": "2025-01-18T09:00:00Z", "component": "A-2", "group": AUTOSAVE,
            "class": "slo_breach",
            "custom_details": {
                "window": "20250118T0900Z", "phase": "A-2", "level": "P2",
                "failed_slos": {"restore_success": {
                    "metric": "restore_success_rate", "value": 0.75,
                    "rule": "restore_success_rate >= 0.995", "sample_size": 20}},
                "rollback_required": True, "rollback_to": "A-1",
                "report": "reports/alerts/20250118T0900Z.md",
                "evidence_sql": "select 1;",
                "incident_id": "INC-20250118T0900Z-A-2",
            },
        },
        "client": "rollout-assets", "client_url": "http://127.0.0.1:3000/runs/run-1",
        "links": [{"href": "http://127.0.0.1:3000/runs/run-1", "text": "Dagster run"}],
    }
    row = ledger(con)[msg.idempotency_key]
    assert (row["transport"], row["status"], row["response_code"]) == ("pagerduty", "sent", 202)
    assert "routing_key" not in json.loads(row["body"])
    assert_no_secret("ledger", json.dumps(row, default=str))


def test_event_text_is_escaped_so_no_mention_or_link_reaches_the_channel(home, con, endpoints):
    n = make_notifier(home, endpoints)
    evil = "<!channel> <https://evil.example|click> & <@U123>"
    msg = alert(text=f"[P2] A-2 {evil}", phase_title=evil,
                failed=[{**payload()["failed"][0], "slo": evil, "value_text": "<!here>"}])
    assert n.send(con, msg) == "sent"
    [req] = endpoints.of(SLACK_POST)
    body = json.dumps(req.body)
    for raw in ("<!channel>", "<!here>", "<https://evil", "<@U123>"):
        assert raw not in body
    assert "&lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; &lt;@U123&gt;" in (
        req.body["text"])
    assert "*&lt;!here&gt;*" in req.body["blocks"][2]["text"]["text"]


# ---- retries ----------------------------------------------------------------------------------

def test_429_waits_retry_after_then_sends_once(home, con, endpoints):
    endpoints.script(SLACK_POST, rate_limited(retry_after=1))
    n = make_notifier(home, endpoints)
    msg = alert()
    assert n.send(con, msg) == "sent"
    reqs = endpoints.of(SLACK_POST)
    assert [r.status for r in reqs] == [429, 200]
    assert reqs[1].at - reqs[0].at >= 1.0  # Retry-After honoured
    row = ledger(con)[msg.idempotency_key]
    assert (row["status"], row["attempts"], row["response_code"]) == ("sent", 2, 200)
    assert len(endpoints.delivered_posts()) == 1


def test_retry_after_beyond_the_wait_limit_fails_without_sleeping(home, con, endpoints):
    endpoints.script(SLACK_POST, rate_limited(retry_after=120))
    n = make_notifier(home, endpoints, max_backoff_seconds=2.0)
    assert n.send(con, alert()) == "failed"
    assert len(endpoints.of(SLACK_POST)) == 1
    row = ledger(con)[alert().idempotency_key]
    assert (row["status"], row["response_code"]) == ("failed", 429)
    assert "Retry-After 120s exceeds" in row["error"]


def test_5xx_backs_off_exponentially_then_records_the_failure(home, con, endpoints, pd_keys):
    endpoints.script(SLACK_POST, *[server_error(500)] * 4)
    n = make_notifier(home, endpoints, backoff_seconds=0.2, max_attempts=4)
    msg = alert(channel="#launch-autosave")
    assert n.send(con, msg) == "failed"
    reqs = endpoints.of(SLACK_POST)
    assert len(reqs) == 4
    gaps = [b.at - a.at for a, b in zip(reqs, reqs[1:], strict=False)]
    # jittered within [ceiling/2, ceiling], ceilings 0.2, 0.4, 0.8
    for gap, ceiling in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert ceiling / 2 - 0.02 <= gap <= ceiling + 0.5
    assert gaps[2] > gaps[0]
    row = ledger(con)[msg.idempotency_key]
    assert (row["status"], row["attempts"], row["response_code"]) == ("failed", 4, 500)
    with pytest.raises(DeliveryError) as exc:
        n.raise_for_failures()
    text = str(exc.value)
    assert msg.idempotency_key in text and "HTTP 500" in text and "4 attempts" in text
    assert_no_secret("the exception", text)
    n.raise_for_failures()  # reported once


def test_pagerduty_429_and_5xx_are_retried_400_is_not(home, con, endpoints, pd_keys):
    endpoints.script(PD_ENQUEUE, rate_limited(retry_after=0), server_error(503))
    n = make_notifier(home, endpoints)
    first = alert(channel=f"pagerduty:{AUTOSAVE}")
    assert n.send(con, first) == "sent"
    assert [r.status for r in endpoints.of(PD_ENQUEUE)] == [429, 503, 202]
    assert ledger(con)[first.idempotency_key]["attempts"] == 3

    endpoints.script(PD_ENQUEUE, bad_request("Event object is invalid"))
    second = alert(ws=W0900 + timedelta(minutes=15), channel=f"pagerduty:{AUTOSAVE}")
    assert n.send(con, second) == "failed"
    assert len(endpoints.of(PD_ENQUEUE)) == 4  # the 400 was not repeated
    row = ledger(con)[second.idempotency_key]
    assert (row["status"], row["attempts"], row["response_code"]) == ("failed", 1, 400)
    assert row["error"] == "HTTP 400: Event object is invalid"


# ---- escalation -----------------------------------------------------------------------------

def test_invalid_auth_is_final_and_slack_down_still_pages(home, con, endpoints, pd_keys):
    n = make_notifier(home, endpoints, token=WRONG_TOKEN)
    # a P2 batch: the Slack failure does not stop the page that follows it
    batch = [alert(), alert(channel=f"pagerduty:{AUTOSAVE}")]
    assert [n.send(con, m) for m in batch] == ["failed", "sent"]
    assert len(endpoints.of(SLACK_POST)) == 1  # invalid_auth is not retried
    row = ledger(con)[batch[0].idempotency_key]
    assert (row["status"], row["attempts"], row["response_code"], row["error"]) == (
        "failed", 1, 200, "invalid_auth")
    assert [e["event_action"] for e in endpoints.pd_events()] == ["trigger"]

    # a warning pages nobody normally; with Slack down it is paged as severity=warning
    warn = alert(ws=W0900 + timedelta(minutes=15), phase="A-1", level="warning",
                 text="[warning] A-1 breached autosave_p95")
    assert n.send(con, warn) == "failed"
    # the token was refused: Slack is not asked again in this run (each message would be)
    assert len(endpoints.of(SLACK_POST)) == 1
    esc = endpoints.pd_events()[-1]
    assert esc["routing_key"] == PD_AUTOSAVE and esc["event_action"] == "trigger"
    assert esc["payload"]["severity"] == "warning"
    assert esc["payload"]["summary"] == (
        "Slack delivery to #launch-autosave failed (not tried: slack failed earlier in this run "
        "(invalid_auth)): [warning] A-1 breached autosave_p95")
    assert ledger(con)[f"20250118T0915Z:A-1:pagerduty:{AUTOSAVE}:escalation"]["status"] == "sent"
    with pytest.raises(DeliveryError, match="invalid_auth") as exc:
        n.raise_for_failures()
    assert len(exc.value.failures) == 2
    assert_no_secret("the exception", str(exc.value))


def test_pagerduty_down_still_tells_the_incident_channel(home, con, endpoints, pd_keys):
    # nothing listens on the PagerDuty URL: connection refused, retried, then escalated
    n = Notifier(home=str(home.root),
                 slack=RolloutSlackResource(token=TOKEN, base_url=endpoints.slack_base_url),
                 pagerduty=PagerDutyEvents(url="http://127.0.0.1:9/v2/enqueue"),
                 max_attempts=2, backoff_seconds=0.01)
    msg = alert(channel=f"pagerduty:{AUTOSAVE}", incident="INC-20250118T0900Z-A-2")
    assert n.send(con, msg) == "failed"
    rows = ledger(con)
    row = rows[msg.idempotency_key]
    assert (row["status"], row["attempts"], row["response_code"]) == ("failed", 2, None)
    [post] = endpoints.delivered_posts()
    assert post["channel"] == "#incident"
    escaped = AUTOSAVE.replace("&", "&amp;")
    assert post["text"].startswith(f"PagerDuty could not be reached for {escaped} (")
    assert "page the on-call by hand" in post["text"]
    assert rows["20250118T0900Z:A-2:#incident:escalation"]["status"] == "sent"
    with pytest.raises(DeliveryError, match="pagerduty"):
        n.raise_for_failures()


# ---- threads, dedup, ledger -----------------------------------------------------------------

def test_incident_replies_in_thread_updates_status_and_resolves(home, con, endpoints, pd_keys):
    inc = "INC-20250118T0900Z-A-2"
    n = make_notifier(home, endpoints)
    windows = [W0900 + timedelta(minutes=15 * i) for i in range(3)]
    for ws in windows:
        for ch in ("#launch-autosave", f"pagerduty:{AUTOSAVE}"):
            assert n.send(con, alert(ws=ws, channel=ch, incident=inc)) == "sent"
    close = W0900 + timedelta(hours=1)
    for ch in ("#launch-autosave", f"pagerduty:{AUTOSAVE}"):
        assert n.send(con, Message(close, "A-2", ch, "resolve", "P2", f"[resolved] {inc}",
                                   {"dedup_key": inc}, inc)) == "sent"
    posts = endpoints.of(SLACK_POST)
    root_ts = ledger(con)[alert(incident=inc).idempotency_key]["message_ts"]
    assert "thread_ts" not in posts[0].body
    assert [p.body.get("thread_ts") for p in posts[1:]] == [root_ts] * 3
    updates = endpoints.of(SLACK_UPDATE)
    assert len(updates) == 3 and {u.body["ts"] for u in updates} == {root_ts}
    cid = FakeEndpoints.channel_id("#launch-autosave")
    root = endpoints.message(cid, root_ts)
    assert root["blocks"][-1]["elements"][0]["text"] == (
        "*Status:* resolved in window 20250118T1000Z · 3 breached windows, latest "
        "20250118T0930Z (P2)")
    events = [(e["event_action"], e["dedup_key"]) for e in endpoints.pd_events()]
    assert events == [("trigger", inc)] * 3 + [("resolve", inc)]  # one incident, resolved
    resolve = endpoints.pd_events()[-1]
    assert resolve == {"routing_key": PD_AUTOSAVE, "event_action": "resolve", "dedup_key": inc}


def test_a_thread_root_says_its_incident_was_escalated(home, con, endpoints):
    """A warning opens the incident's thread; a P2 breach joins it: the root's header and
    text say P2 now (they kept "[warning]"; found by an independent audit)."""
    inc = "INC-20250118T0900Z-A-2"
    n = make_notifier(home, endpoints)
    assert n.send(con, alert(level="warning", incident=inc)) == "sent"
    assert n.send(con, alert(ws=W0900 + timedelta(minutes=15), incident=inc)) == "sent"
    root_ts = ledger(con)[alert(incident=inc).idempotency_key]["message_ts"]
    root = endpoints.message(FakeEndpoints.channel_id("#launch-autosave"), root_ts)
    assert root["blocks"][0]["text"]["text"] == (
        ":warning: P2 SLO breach: A-2 (beta) (was warning)")
    assert root["text"].startswith("[P2, was warning] A-2 breached restore_success")


def test_rerun_never_sends_twice_and_retries_what_failed(home, con, endpoints):
    run1 = make_notifier(home, endpoints)
    first = alert(incident="INC-1")
    rollback = Message(W0900, "A-2", "#launch-autosave", "rollback", "P2",
                       "Rollback A-2 → A-1: ExitCode=0",
                       {"exit_code": 0, "status": "succeeded", "rollback_to": "A-1",
                        "command": "rollout flags rollback --phase A-1"}, "INC-1")
    assert run1.send(con, first) == "sent"
    endpoints.script(SLACK_POST, slack_error("invalid_auth"))
    assert run1.send(con, rollback) == "failed"  # scripted invalid_auth
    assert run1.send(con, first) == "duplicate"
    assert len(endpoints.of(SLACK_POST)) == 2

    # the next run regenerates the alert (a duplicate) and delivers the failed rollback reply
    # from the body recorded then, in the alert's thread
    run2 = make_notifier(home, endpoints)
    assert run2.send(con, first) == "duplicate"
    posts = endpoints.of(SLACK_POST)
    assert len(posts) == 3 and posts[2].ok
    assert posts[2].body["thread_ts"] == ledger(con)[first.idempotency_key]["message_ts"]
    row = ledger(con)[rollback.idempotency_key]
    assert (row["status"], row["attempts"]) == ("sent", 2)
    run3 = make_notifier(home, endpoints)
    assert run3.send(con, first) == "duplicate" and run3.send(con, rollback) == "duplicate"
    assert len(endpoints.of(SLACK_POST)) == 3
    run2.raise_for_failures()  # nothing failed in run 2


def test_ledger_rows_survive_the_callers_rollback(home, con, endpoints):
    n = make_notifier(home, endpoints)
    msg = alert()
    with pytest.raises(RuntimeError, match="later step"):
        with transaction(con):
            con.execute("insert into alert_reports values (?, 'x.md', ['A-2'], 'P2', now())",
                        [W0900])
            assert n.send(con, msg) == "sent"
            raise RuntimeError("a later step of the caller fails")
    assert con.execute("select count(*) from alert_reports").fetchone()[0] == 0
    assert ledger(con)[msg.idempotency_key]["status"] == "sent"
    assert n.send(con, msg) == "duplicate"  # so a re-run cannot send it again
    assert len(endpoints.of(SLACK_POST)) == 1


def test_without_credentials_the_outbox_is_the_transport(home, con, endpoints, monkeypatch):
    monkeypatch.setenv("ROLLOUT_SLACK_BASE_URL", endpoints.slack_base_url)
    monkeypatch.setenv("ROLLOUT_PAGERDUTY_URL", endpoints.pagerduty_url)
    n = notifier_from_env(str(home.root))
    assert n.slack is None and n.pagerduty.url == endpoints.pagerduty_url
    for m in (alert(), alert(channel=f"pagerduty:{AUTOSAVE}")):
        assert n.send(con, m) == "queued"
        assert n.send(con, m) == "duplicate"
        row = ledger(con)[m.idempotency_key]
        assert (row["transport"], row["status"], row["attempts"]) == ("outbox", "queued", 0)
        assert (home.root / row["path"]).is_file()
    assert endpoints.requests == []


def test_the_token_is_an_envvar_so_only_its_name_is_configuration(home, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("ROLLOUT_SLACK_BASE_URL", "http://127.0.0.1:9/api/")
    n = notifier_from_env(str(home.root))
    assert isinstance(n.slack.token, dg.EnvVar) and n.slack.token.env_var_name == (
        "SLACK_BOT_TOKEN")
    assert n.slack.base_url == "http://127.0.0.1:9/api/"
    assert n.pagerduty.url == "https://events.pagerduty.com/v2/enqueue"


# ---- the real pipeline ------------------------------------------------------------------------

def quiet_rollback_policy(home: RolloutHome, exit_code: int = 0) -> None:
    """A home-local policy whose rollback command only prints, with the flags at the last phase:
    these tests are about the messages, and every rollback runs (the flags stay past its
    target) and exits `exit_code`."""
    text = (PROJECT_ROOT / "governance" / "policy.yaml").read_text()
    start = text.index("  command: [")
    end = text.index("\n", start)
    (home.root / "governance").mkdir(exist_ok=True)
    (home.root / "governance" / "policy.yaml").write_text(
        text[:start] + '  command: ["{python}", "-c", "print(\'rolled back to {phase}\'); '
        f'raise SystemExit({exit_code})"]' + text[end:])
    policy = load_policy(home.policy_path)
    con = connect(home.db_path)
    try:
        for phase in policy.phase_names[1:]:
            flags.promote(con, policy, phase, reason="test: flags past every target", force=True)
    finally:
        con.close()


def window_events(phase: str, ws: datetime, kind: str, n: int = 20, bad: int = 0,
                  **kw) -> list[dict]:
    kw.setdefault("tenant", "beta")
    return [event(event_id=f"{phase}-{ws:%H%M}-{kind}-{i}", phase=phase, kind=kind,
                  ts=(ws + timedelta(seconds=10 + 20 * i)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                  ok=i >= bad, **kw) for i in range(n)]


def set_env(monkeypatch, ep: FakeEndpoints, token: str = TOKEN) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", token)
    monkeypatch.setenv("ROLLOUT_SLACK_BASE_URL", ep.slack_base_url)
    monkeypatch.setenv("ROLLOUT_PAGERDUTY_URL", ep.pagerduty_url)
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_AUTOSAVE", PD_AUTOSAVE)
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_MERGE", PD_MERGE)


def read_ledger(home: RolloutHome) -> dict[str, dict]:
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        return ledger(c)


def test_pipeline_routes_per_phase_threads_resolves_and_never_sends_twice(
        home, endpoints, monkeypatch, caplog, capfd):
    """Two breach windows (A-2 twice, B-0, B-1 at P1), then two green windows that close every
    incident; the range runs through Dagster twice."""
    caplog.set_level(logging.DEBUG)
    quiet_rollback_policy(home)
    w = [W0900 + timedelta(minutes=15 * i) for i in range(4)]
    write_canary(home, "A-2", window_events("A-2", w[0], "restore", bad=5)
                 + window_events("A-2", w[1], "restore", bad=5)
                 + window_events("A-2", w[2], "restore") + window_events("A-2", w[3], "restore"))
    write_canary(home, "B-0", window_events("B-0", w[0], "merge", bad=10)
                 + window_events("B-0", w[2], "merge") + window_events("B-0", w[3], "merge"))
    write_canary(home, "B-1", window_events("B-1", w[1], "autosave", latency_ms=5000.0)
                 + window_events("B-1", w[2], "autosave") + window_events("B-1", w[3], "autosave"))
    set_env(monkeypatch, endpoints)

    run_range(home, w[0], w[3] + timedelta(minutes=15), log=lambda m: None)
    rows = read_ledger(home)
    assert {r["transport"] for r in rows.values()} == {"slack", "pagerduty"}
    assert all(r["status"] == "sent" for r in rows.values()), rows
    alerts = {(f"{r['window_start']:%H%M}", r["phase"], r["channel"])
              for r in rows.values() if r["kind"] == "alert"}
    assert alerts == {
        ("0900", "A-2", "#launch-autosave"), ("0900", "A-2", f"pagerduty:{AUTOSAVE}"),
        ("0900", "B-0", "#merge-ops"), ("0900", "B-0", f"pagerduty:{MERGE}"),
        ("0915", "A-2", "#launch-autosave"), ("0915", "A-2", f"pagerduty:{AUTOSAVE}"),
        ("0915", "B-1", "#incident"), ("0915", "B-1", f"pagerduty:{AUTOSAVE}"),
    }
    # one request per delivered Slack ledger row: nothing sent twice, nothing unrecorded
    slack_rows = [r for r in rows.values() if r["transport"] == "slack"]
    assert len(endpoints.of(SLACK_POST)) == len(slack_rows)
    assert {p["channel"] for p in endpoints.slack_posts()} == {
        "#launch-autosave", "#merge-ops", "#incident"}

    def row(ws, phase, channel, kind="alert"):
        return rows[f"20250118T{ws}Z:{phase}:{channel}:{kind}"]

    a2_first, a2_second = row("0900", "A-2", "#launch-autosave"), row(
        "0915", "A-2", "#launch-autosave")
    inc_a2 = a2_first["incident_id"]
    assert inc_a2 and a2_second["incident_id"] == inc_a2
    assert a2_second["thread_ts"] == a2_first["message_ts"] != a2_second["message_ts"]
    assert row("0900", "A-2", "#launch-autosave", "rollback")["thread_ts"] == a2_first["message_ts"]

    # PagerDuty: routing key per service, severity per level, one dedup key per incident,
    # and each incident's resolve after all of its triggers
    events = endpoints.pd_events()
    by_incident: dict[str, list] = {}
    for e in events:
        by_incident.setdefault(e["dedup_key"], []).append(e)
    inc_b0 = row("0900", "B-0", "#merge-ops")["incident_id"]
    inc_b1 = row("0915", "B-1", "#incident")["incident_id"]
    assert set(by_incident) == {inc_a2, inc_b0, inc_b1}
    summary = {k: [(e["event_action"], e["routing_key"], e.get("payload", {}).get("severity"))
                   for e in v] for k, v in by_incident.items()}
    assert summary == {
        inc_a2: [("trigger", PD_AUTOSAVE, "error")] * 2 + [("resolve", PD_AUTOSAVE, None)],
        inc_b0: [("trigger", PD_MERGE, "error"), ("resolve", PD_MERGE, None)],
        inc_b1: [("trigger", PD_AUTOSAVE, "critical"), ("resolve", PD_AUTOSAVE, None)],
    }
    # the real Block Kit of the first A-2 alert: value vs threshold and sample size
    first_post = next(p for p in endpoints.slack_posts()
                      if p["text"].startswith("[P2] A-2") and "0900Z" in p["text"])
    assert first_post["blocks"][2]["text"]["text"] == (
        "*Failed SLOs*\n• *restore_success*: `restore_success_rate` = *0.75* vs "
        "`&gt;= 0.995` (sample 20, min 10)")
    root = endpoints.message(a2_first["channel_id"], a2_first["message_ts"])
    status = root["blocks"][-1]["elements"][0]["text"]
    assert status.startswith("*Status:* resolved in window 20250118T0945Z · 2 breached windows")
    assert "ExitCode=0 (succeeded)" in status

    # the same range again: nothing new reaches Slack or PagerDuty, the ledger is unchanged
    before = len(endpoints.requests)
    run_range(home, w[0], w[3] + timedelta(minutes=15), log=lambda m: None)
    assert len(endpoints.requests) == before
    assert read_ledger(home).keys() == rows.keys()
    # a Reporter run offers only what is still owed, not every incident history holds
    policy = load_policy(home.policy_path)
    with duckdb.connect(str(home.db_path)) as c:
        assert rca_messages(c, policy) == [] and resolve_messages(c, policy) == []
        c.execute("update notifications set status = 'failed' where idempotency_key = ?",
                  [f"20250118T0945Z:B-0:pagerduty:{MERGE}:resolve:{inc_b0}"])
        [owed] = resolve_messages(c, policy)
        assert (owed.channel, owed.incident_id) == (f"pagerduty:{MERGE}", inc_b0)
        assert {m.incident_id for m in rca_messages(c, policy)} == set()
        c.execute("update notifications set status = 'sent' where idempotency_key = ?",
                  [f"20250118T0945Z:B-0:pagerduty:{MERGE}:resolve:{inc_b0}"])

    # secrets: not in any file under the home, the ledger, or any captured log
    assert assert_home_clean(home.root) > 10
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        dump = c.execute("select * from notifications").fetchall()
    assert_no_secret("the notifications table", repr(dump))
    assert_no_secret("captured logs", "\n".join(r.getMessage() for r in caplog.records))
    out, err = capfd.readouterr()
    assert_no_secret("stdout/stderr", out + err)


def test_pipeline_slack_down_pages_fails_the_run_then_a_rerun_delivers_once(
        home, endpoints, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    quiet_rollback_policy(home)
    # A-1 autosave p95 breach: level warning (Slack only), rollback required
    write_canary(home, "A-1", window_events("A-1", W0900, "autosave", latency_ms=4000.0,
                                            tenant="qa"))
    set_env(monkeypatch, endpoints, token=WRONG_TOKEN)  # Slack answers invalid_auth
    with pytest.raises(RunError) as exc:
        run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    text = str(exc.value)
    assert "notification delivery failed" in text and "invalid_auth" in text
    assert "20250118T0900Z:A-1:#launch-autosave:alert" in text
    assert_no_secret("the run error", text)
    rows = read_ledger(home)
    assert rows["20250118T0900Z:A-1:#launch-autosave:alert"]["status"] == "failed"
    # escalated: PagerDuty paged as a warning although the level does not page
    [page] = endpoints.pd_events()
    assert (page["routing_key"], page["payload"]["severity"]) == (PD_AUTOSAVE, "warning")
    # the rollback still ran (the breach sensor is ticked although the Reporter failed)
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        assert c.execute("select status, exit_code from rollbacks").fetchall() == [
            ("succeeded", 0)]
    assert rows["20250118T0900Z:A-1:#launch-autosave:rollback"]["status"] == "failed"
    # the Reporter's failure skips the dashboard step, so the Reporter re-rendered the page
    instance = instance_of(home)
    try:
        renders = [r.asset_materialization.description for r in instance.fetch_materializations(
            dg.AssetKey("dashboard"), limit=10).records]
    finally:
        instance.dispose()
    assert "re-rendered by rollout_window_job" in renders
    assert (home.root / "reports" / "dashboard" / "index.html").is_file()

    # the token is fixed; the re-run delivers the alert and the rollback reply, once each
    # (the alert's third attempt: the rollback job re-publishes the window and tried it again;
    # after a refused token a run asks Slack nothing more, so the rest go out at their first)
    set_env(monkeypatch, endpoints, token=TOKEN)
    summary = run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    # the rollback run failed only on its reply: the rollback itself succeeded, and a re-run
    # (which `rollout run` turns into its exit code) says so
    assert [(rb.run_key, rb.success, rb.skipped) for rb in summary.rollbacks] == [
        ("20250118T0900Z:A-1", True, True)]
    rows = read_ledger(home)
    assert {k: (r["status"], r["attempts"]) for k, r in rows.items()} == {
        "20250118T0900Z:A-1:#launch-autosave:alert": ("sent", 3),
        "20250118T0900Z:A-1:#launch-autosave:rollback": ("sent", 1),
        f"20250118T0900Z:A-1:pagerduty:{AUTOSAVE}:escalation": ("sent", 1),
        # seed §8 steps 3-4 in #incident, whatever the level: the RCA draft, the rollback
        "20250118T0900Z:A-1:#incident:rca": ("sent", 1),
        "20250118T0900Z:A-1:#incident:rollback": ("sent", 1),
    }
    delivered = {p["channel"]: [] for p in endpoints.delivered_posts()}
    for post in endpoints.delivered_posts():
        delivered[post["channel"]].append(post)
    phase_ch, incident_ch = "#launch-autosave", "#incident"
    assert {ch: len(posts) for ch, posts in delivered.items()} == {phase_ch: 2, incident_ch: 2}
    alert, rollback = delivered[phase_ch]
    assert alert["text"].startswith("[warning] A-1 breached autosave_p95")
    assert rollback["text"].startswith("Rollback A-1 → A-0 for window 20250118T0900Z")
    assert rollback["thread_ts"] == rows["20250118T0900Z:A-1:#launch-autosave:alert"][
        "message_ts"]
    rca, rollback = delivered[incident_ch]
    assert rca["text"].startswith("[RCA] INC-20250118T0900Z-A-1 (warning, A-1): draft "
                                  "reports/rca/INC-20250118T0900Z-A-1.md, owner ")
    assert rollback["thread_ts"] == rows["20250118T0900Z:A-1:#incident:rca"]["message_ts"]
    assert len(endpoints.pd_events()) == 1
    assert_home_clean(home.root)
    assert_no_secret("captured logs", "\n".join(r.getMessage() for r in caplog.records))


def test_a_failed_rollback_pages_critical_after_a_slack_escalation_and_the_page_resolves(
        home, endpoints, monkeypatch):
    """Found by an independent audit: a warning breach is paged only by escalation (Slack
    down), then its rollback fails. The critical escalation shared the Slack one's ledger key
    and was dropped as a duplicate, and the incident's close resolved only pages sent as
    alerts: PagerDuty kept an open `warning` page for good."""
    quiet_rollback_policy(home, exit_code=3)
    ws = [W0900 + timedelta(minutes=15 * i) for i in range(3)]
    write_canary(home, "A-1", window_events("A-1", ws[0], "autosave", latency_ms=4000.0,
                                            tenant="qa")
                 + window_events("A-1", ws[1], "autosave", tenant="qa")
                 + window_events("A-1", ws[2], "autosave", tenant="qa"))
    set_env(monkeypatch, endpoints, token=WRONG_TOKEN)  # Slack answers invalid_auth
    with pytest.raises(RunError):
        run_range(home, ws[0], ws[1], log=lambda m: None)
    pages = [(r.body["event_action"], r.body["payload"]["severity"], r.body["dedup_key"])
             for r in endpoints.of(PD_ENQUEUE) if r.ok]
    incident = "INC-20250118T0900Z-A-1"
    assert pages == [("trigger", "warning", incident), ("trigger", "critical", incident)]
    rows = read_ledger(home)
    assert rows[f"20250118T0900Z:A-1:pagerduty:{AUTOSAVE}:escalation:rollback"][
        "status"] == "sent"
    # Slack is back; two green windows close the incident: its page is resolved
    set_env(monkeypatch, endpoints, token=TOKEN)
    for w in ws[1:]:
        try:
            run_range(home, w, w + timedelta(minutes=15), log=lambda m: None)
        except RunError:
            pass  # the failed rollback's run stays failed: it is not retried
    assert _delivered_pd(endpoints)[-1] == ("resolve", incident)
    assert [a for a, _ in _delivered_pd(endpoints)].count("resolve") == 1


def test_a_page_without_its_routing_key_while_slack_is_live_says_so(home, endpoints,
                                                                    monkeypatch):
    """Found by an independent audit: with Slack live and PAGERDUTY_ROUTING_KEY_MERGE unset,
    B-0's pages went to the outbox as if delivered, without a word."""
    quiet_rollback_policy(home)
    write_canary(home, "B-0", window_events("B-0", W0900, "merge", bad=10))
    set_env(monkeypatch, endpoints)
    monkeypatch.delenv("PAGERDUTY_ROUTING_KEY_MERGE")
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    row = read_ledger(home)["20250118T0900Z:B-0:pagerduty:Merge Duty:alert"]
    assert (row["transport"], row["status"]) == ("outbox", "queued")
    assert row["error"].startswith("PAGERDUTY_ROUTING_KEY_MERGE is not set: the P2 alert of "
                                   "20250118T0900Z B-0 for Merge Duty went to the outbox only")
    assert endpoints.pd_events() == []


def _delivered_pd(endpoints) -> list[tuple[str, str]]:
    return [(r.body["event_action"], r.body["dedup_key"]) for r in endpoints.of(PD_ENQUEUE)
            if r.ok]


def _outage(endpoints, endpoint: str, replies: int) -> None:
    """The next `replies` answers of `endpoint` are 429 with no wait (retried like a 5xx, but
    without the back-off that would slow the test), and none after them."""
    with endpoints._lock:
        endpoints._scripts[endpoint].clear()
    endpoints.script(endpoint, *[rate_limited(retry_after=0)] * replies)


def test_a_lost_page_goes_out_next_cycle_and_its_resolve_never_before_it(
        home, endpoints, monkeypatch):
    """One window a run, as the 15-minute cycle runs them. PagerDuty fails the breach's
    trigger (09:00) and each retry of it in the next two cycles, but would take the resolve
    when the incident closes (09:30): that resolve must wait for the trigger, or PagerDuty
    would see resolve then trigger and keep the incident open for good. The cycle after it
    delivers the trigger (no one re-ran 09:00), then the resolve."""
    quiet_rollback_policy(home)
    w = [W0900 + timedelta(minutes=15 * i) for i in range(4)]
    write_canary(home, "B-0", window_events("B-0", w[0], "merge", bad=10)
                 + window_events("B-0", w[1], "merge") + window_events("B-0", w[2], "merge"))
    set_env(monkeypatch, endpoints)
    alert, resolve = (f"20250118T0900Z:B-0:pagerduty:{MERGE}:alert",
                      f"20250118T0930Z:B-0:pagerduty:{MERGE}:resolve:INC-20250118T0900Z-B-0")
    for ws in w[:3]:
        _outage(endpoints, PD_ENQUEUE, 40)  # down for the whole run
        with pytest.raises(RunError, match=alert):
            run_range(home, ws, ws + timedelta(minutes=15), log=lambda m: None)
        _outage(endpoints, PD_ENQUEUE, 0)
    assert _delivered_pd(endpoints) == []
    assert read_ledger(home)[alert]["status"] == "failed"
    held = read_ledger(home)[resolve]
    assert held["status"] == "queued" and "held until the alert of 20250118T0900Z" in (
        held["error"])
    # PagerDuty is back: the next cycle (09:45, a window without events) catches up, in order
    run_range(home, w[3], w[3] + timedelta(minutes=15), log=lambda m: None)
    incident = "INC-20250118T0900Z-B-0"
    assert _delivered_pd(endpoints) == [("trigger", incident), ("resolve", incident)]
    assert {read_ledger(home)[k]["status"] for k in (alert, resolve)} == {"sent"}
    # seed §8 steps 3-5 in #incident for this P2 incident: RCA draft, rollback, closing notice,
    # in the thread of the incident's first message there (the "page by hand" escalation)
    posts = [p for p in endpoints.delivered_posts() if p["channel"] == "#incident"]
    assert [p["text"].split(" ")[0] for p in posts] == [
        "PagerDuty", "[RCA]", "Rollback", "[resolved]"]
    root = read_ledger(home)["20250118T0900Z:B-0:#incident:escalation"]["message_ts"]
    assert [p.get("thread_ts") for p in posts] == [None, root, root, root]
    run_range(home, w[3], w[3] + timedelta(minutes=15), log=lambda m: None)
    assert len(_delivered_pd(endpoints)) == 2  # nothing twice


def test_an_escalation_whose_page_went_out_since_is_superseded_not_sent(
        home, endpoints, monkeypatch):
    """Both Slack and PagerDuty are down for the breach's run: the alert, the page and the
    '#incident: page by hand' escalation all fail. When they are back, the window's re-run
    delivers the alert and the page; telling #incident to page by hand would be stale."""
    quiet_rollback_policy(home)
    write_canary(home, "B-0", window_events("B-0", W0900, "merge", bad=10))
    set_env(monkeypatch, endpoints)
    _outage(endpoints, SLACK_POST, 100)
    _outage(endpoints, PD_ENQUEUE, 100)
    with pytest.raises(RunError):
        run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    assert read_ledger(home)["20250118T0900Z:B-0:#incident:escalation"]["status"] == "failed"
    _outage(endpoints, SLACK_POST, 0)
    _outage(endpoints, PD_ENQUEUE, 0)
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    rows = read_ledger(home)
    assert rows[f"20250118T0900Z:B-0:pagerduty:{MERGE}:alert"]["status"] == "sent"
    assert rows["20250118T0900Z:B-0:#merge-ops:alert"]["status"] == "sent"
    assert rows["20250118T0900Z:B-0:#incident:escalation"]["status"] == "superseded"
    assert not [p for p in endpoints.delivered_posts()
                if "page the on-call by hand" in json.dumps(p)]


def test_an_incident_renamed_by_a_late_breach_is_resolved_and_keeps_its_draft(
        home, endpoints, monkeypatch):
    """B-0 breaches at 09:30 (INC-…0930Z) and closes at 10:00. A late file makes 09:15 a
    breach too: the incident is now INC-…0915Z. It was announced under the old id, and that page
    stands for it: no second PagerDuty incident, the late alert goes into the old id's Slack
    thread (found by independent audits: a second page and thread root, then a page that stayed
    open for good). Its RCA draft, with what people wrote, moves to the new id (the old draft
    was left behind)."""
    quiet_rollback_policy(home)
    w = [W0900 + timedelta(minutes=15 * i) for i in range(6)]
    write_canary(home, "B-0", [e for i, ws in enumerate(w) if i != 1  # 09:15 comes late
                               for e in window_events("B-0", ws, "merge", bad=10 * (i == 2))])
    set_env(monkeypatch, endpoints)
    run_range(home, w[0], w[5] + timedelta(minutes=15), log=lambda m: None)
    old, new = "INC-20250118T0930Z-B-0", "INC-20250118T0915Z-B-0"
    assert _delivered_pd(endpoints) == [("trigger", old), ("resolve", old)]
    draft = home.rca_dir / f"{old}.md"
    draft.write_text(draft.read_text() + "\nRoot cause: the merge worker pool was drained.\n")

    write_canary(home, "B-0", window_events("B-0", w[1], "merge", bad=10))  # the late file
    run_range(home, w[1], w[1] + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", old), ("resolve", old)]
    posts = [p for p in endpoints.delivered_posts() if p["channel"] == "#merge-ops"]
    root = next(p for p in posts if p["text"].startswith("[P2] B-0 breached") and "0930Z" in
                p["text"])
    (late,) = [p for p in posts if f"{new}, announced as {old}" in p["text"]]
    assert late["text"].startswith("[P2] B-0 breached") and "20250118T0915Z" in late["text"]
    rows = read_ledger(home)
    assert late["thread_ts"] == rows["20250118T0930Z:B-0:#merge-ops:alert"]["message_ts"]
    assert "thread_ts" not in root or not root["thread_ts"]
    assert sorted(p.name for p in home.rca_dir.iterdir()) == [f"{new}.md"]
    text = (home.rca_dir / f"{new}.md").read_text()
    assert text.startswith(f"# RCA draft: {new}\n\n> Renamed from {old}")
    assert "- Opened by window: 2025-01-18 09:15 UTC" in text
    assert text.endswith("Root cause: the merge worker pool was drained.\n")
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        # its alert was received when 09:30's went out, not when the late 09:15 one did
        assert c.execute("select incident_id, alert_received_at from incidents").fetchall() == [
            (new, c.execute("select min(created_at) from notifications where kind = 'alert' "
                            "and window_start = ?", [w[2]]).fetchone()[0])]
    run_range(home, w[0], w[5] + timedelta(minutes=15), log=lambda m: None)
    assert len(_delivered_pd(endpoints)) == 2  # nothing twice


def test_an_open_incident_renamed_by_a_late_breach_keeps_its_one_page_until_it_closes(
        home, endpoints, monkeypatch):
    """B-0 breaches at 09:30, paged and still open; a late file makes 09:15 breach: the
    incident is renamed, not paged again, and its one page is resolved when it closes."""
    quiet_rollback_policy(home)
    w = [W0900 + timedelta(minutes=15 * i) for i in range(6)]
    write_canary(home, "B-0", window_events("B-0", w[0], "merge")
                 + window_events("B-0", w[2], "merge", bad=10))
    set_env(monkeypatch, endpoints)
    run_range(home, w[0], w[2] + timedelta(minutes=15), log=lambda m: None)
    old, new = "INC-20250118T0930Z-B-0", "INC-20250118T0915Z-B-0"
    assert _delivered_pd(endpoints) == [("trigger", old)]
    write_canary(home, "B-0", window_events("B-0", w[1], "merge", bad=10))  # the late file
    run_range(home, w[1], w[1] + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", old)]
    write_canary(home, "B-0", window_events("B-0", w[3], "merge")
                 + window_events("B-0", w[4], "merge"))
    for ws in w[3:5]:
        run_range(home, ws, ws + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", old), ("resolve", old)]
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        assert c.execute("select incident_id, status from incidents").fetchall() == [
            (new, "closed")]
    # #incident keeps one thread: the new id's RCA post replies in the old one's (a second
    # root, found by an independent audit)
    rows = read_ledger(home)
    root = rows["20250118T0930Z:B-0:#incident:rca"]["message_ts"]
    (rca,) = [p for p in endpoints.delivered_posts() if p["channel"] == "#incident"
              and p["text"].startswith(f"[RCA] {new}")]
    assert rca["thread_ts"] == root and f"announced as {old}" in rca["text"]


def test_a_breach_withdrawn_by_late_data_resolves_its_page_and_keeps_the_rollback_report(
        home, endpoints, monkeypatch):
    """A-1 breaches at 09:00 (1 of 20 restores failed): paged, rolled back. 300 late successful
    restores make 09:00 a pass. The page must be resolved (it stayed open for good), the alert
    report that holds the rollback's exit code and log must stay, saying the breach was
    withdrawn (it was deleted), and the RCA draft says so (found by an independent audit)."""
    quiet_rollback_policy(home)
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", W0900, "restore", bad=1, tenant="qa"))
    set_env(monkeypatch, endpoints)
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    inc = "INC-20250118T0900Z-A-1"
    assert _delivered_pd(endpoints) == [("trigger", inc)]
    report = home.root / "reports" / "alerts" / "20250118T0900Z.md"
    assert "ExitCode=0" in report.read_text()

    late = [event(event_id=f"late-{i}", phase="A-1", kind="restore", ok=True, tenant="qa",
                  ts=f"2025-01-18T09:{10 + i % 4:02d}:00Z") for i in range(300)]
    write_canary(home, "A-1", late)
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", inc), ("resolve", inc)]
    withdrawn = {p["channel"]: p for p in endpoints.delivered_posts()
                 if p["text"].startswith("[withdrawn]")}
    # in the alert's thread, and in #incident, where its RCA draft and rollback were told (the
    # runbook's close step; found by an independent audit: #incident never heard of it again)
    assert set(withdrawn) == {"#launch-autosave", "#incident"}
    assert all(p.get("thread_ts") for p in withdrawn.values())
    text = report.read_text()
    assert "**Withdrawn**" in text and "ExitCode=0" in text
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        assert c.execute("select count(*) from incidents").fetchone() == (0,)
        assert c.execute("select count(*) from alert_reports").fetchone() == (1,)
    assert "**Withdrawn**" in (home.rca_dir / f"{inc}.md").read_text()
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    assert len(_delivered_pd(endpoints)) == 2  # nothing twice


def test_an_incident_whose_first_breach_is_withdrawn_keeps_its_page_until_it_closes(
        home, endpoints, monkeypatch):
    """A-1 breaches at 09:00 and 09:15 (one incident, paged under INC-…0900Z, rolled back).
    Late data makes 09:00 a pass: the incident carries on as INC-…0915Z, whose windows were
    paged under the old key. The old page must stand until the incident closes, then be
    resolved; the rollback stays on its checklist (it was withdrawn at once, the new incident
    was never paged, and its rollback showed as pending; found by an independent audit)."""
    quiet_rollback_policy(home)
    promote_to(home, "A-1")
    w = [W0900 + timedelta(minutes=15 * i) for i in range(4)]
    write_canary(home, "A-1", [e for i, ws in enumerate(w)
                               for e in window_events("A-1", ws, "restore", bad=int(i < 2),
                                                      tenant="qa")])
    set_env(monkeypatch, endpoints)
    run_range(home, w[0], w[1] + timedelta(minutes=15), log=lambda m: None)
    old, new = "INC-20250118T0900Z-A-1", "INC-20250118T0915Z-A-1"
    assert _delivered_pd(endpoints) == [("trigger", old), ("trigger", old)]
    late = [event(event_id=f"late-{i}", phase="A-1", kind="restore", ok=True, tenant="qa",
                  ts=f"2025-01-18T09:{10 + i % 4:02d}:00Z") for i in range(300)]
    write_canary(home, "A-1", late)
    run_range(home, w[0], w[0] + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", old)] * 2  # no resolve yet: it goes on
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        assert c.execute("select incident_id, status, rollback_exit_code, began_window "
                         "from incidents").fetchall() == [(new, "open", 0, w[0])]
    run_range(home, w[2], w[3] + timedelta(minutes=15), log=lambda m: None)  # two green
    assert _delivered_pd(endpoints) == [("trigger", old)] * 2 + [("resolve", old)]
    assert [p["text"] for p in endpoints.delivered_posts()
            if p["text"].startswith("[resolved] " + old)] == [
        f"[resolved] {old} (continued as {new}) closed"]


def test_a_withdrawn_breach_that_comes_back_is_paged_again(home, endpoints, monkeypatch):
    """Withdrawn by late successes, then more late failures make 09:00 breach again: its page
    was resolved and its alerts are in the ledger, so it is triggered again (nothing was
    sent: PagerDuty stayed resolved while the incident was open; found by an independent
    audit), the RCA draft's Withdrawn banner goes, and its close resolves it."""
    quiet_rollback_policy(home)
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", W0900, "restore", bad=1, tenant="qa"))
    set_env(monkeypatch, endpoints)
    one = timedelta(minutes=15)
    run_range(home, W0900, W0900 + one, log=lambda m: None)
    inc = "INC-20250118T0900Z-A-1"
    write_canary(home, "A-1", [event(event_id=f"ok-{i}", phase="A-1", kind="restore", ok=True,
                                     tenant="qa", ts=f"2025-01-18T09:{10 + i % 4:02d}:00Z")
                               for i in range(300)])
    run_range(home, W0900, W0900 + one, log=lambda m: None)
    assert "**Withdrawn**" in (home.rca_dir / f"{inc}.md").read_text()
    write_canary(home, "A-1", [event(event_id=f"bad-{i}", phase="A-1", kind="restore",
                                     ok=False, tenant="qa", ts="2025-01-18T09:12:00Z")
                               for i in range(20)])
    run_range(home, W0900, W0900 + one, log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", inc), ("resolve", inc), ("trigger", inc)]
    assert "**Withdrawn**" not in (home.rca_dir / f"{inc}.md").read_text()
    reopened = [(p["channel"], p["text"]) for p in endpoints.delivered_posts()
                if p["text"].startswith("[reopened]")]
    assert sorted(reopened) == [  # where the [withdrawn] went, #incident included
        (ch, f"[reopened] {inc}: late data made its windows breach again")
        for ch in ("#incident", "#launch-autosave")]
    write_canary(home, "A-1", [e for k in (1, 2) for e in window_events(
        "A-1", W0900 + k * one, "restore", tenant="qa")])
    run_range(home, W0900 + one, W0900 + 3 * one, log=lambda m: None)
    assert _delivered_pd(endpoints)[-1] == ("resolve", inc)
    run_range(home, W0900, W0900 + 3 * one, log=lambda m: None)
    assert len(_delivered_pd(endpoints)) == 4  # nothing twice


def test_a_breach_withdrawn_and_brought_back_twice_is_resolved_and_paged_each_time(
        home, endpoints, monkeypatch):
    """Late data withdraws A-1's 09:00 breach, brings it back, withdraws it again and brings it
    back again. The page must follow each turn: resolve, trigger, resolve, trigger, and the
    close resolves it (the second withdrawal sent nothing and the second return nothing: each
    was keyed once per incident; the page stayed open, then stayed resolved while the incident
    was open)."""
    quiet_rollback_policy(home)
    promote_to(home, "A-1")
    write_canary(home, "A-1", window_events("A-1", W0900, "restore", bad=1, tenant="qa"))
    set_env(monkeypatch, endpoints)
    one = timedelta(minutes=15)
    inc = "INC-20250118T0900Z-A-1"
    batches = 0

    def late(n: int, ok: bool) -> None:
        nonlocal batches
        batches += 1
        write_canary(home, "A-1", [event(event_id=f"late{batches}-{i}", phase="A-1",
                                         kind="restore", ok=ok, tenant="qa",
                                         ts=f"2025-01-18T09:{10 + i % 4:02d}:00Z")
                                   for i in range(n)])
        run_range(home, W0900, W0900 + one, log=lambda m: None)

    run_range(home, W0900, W0900 + one, log=lambda m: None)  # 19 / 20: breach
    late(300, ok=True)  # 319 / 320 >= 0.995: withdrawn
    late(20, ok=False)  # 319 / 340: back
    late(4000, ok=True)  # 4319 / 4340 = 0.99516: withdrawn again
    late(30, ok=False)  # 4319 / 4370: back again
    assert _delivered_pd(endpoints) == [("trigger", inc), ("resolve", inc)] * 2 + [
        ("trigger", inc)]
    for channel in ("#launch-autosave", "#incident"):
        texts = [p["text"].split(":")[0] for p in endpoints.delivered_posts()
                 if p["channel"] == channel and p["text"].startswith(("[withdrawn]",
                                                                       "[reopened]"))]
        assert texts == [f"[withdrawn] {inc}", f"[reopened] {inc}"] * 2, channel
    assert "**Withdrawn**" not in (home.rca_dir / f"{inc}.md").read_text()

    write_canary(home, "A-1", [e for k in (1, 2) for e in window_events(
        "A-1", W0900 + k * one, "restore", tenant="qa")])
    run_range(home, W0900 + one, W0900 + 3 * one, log=lambda m: None)  # two green: closed
    assert _delivered_pd(endpoints)[-2:] == [("trigger", inc), ("resolve", inc)]
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        keys = [k for (k,) in c.execute(
            "select idempotency_key from notifications where channel like 'pagerduty:%' "
            "and kind in ('resolve', 'reopen') order by created_at").fetchall()]
    assert [k.split(":", 4)[-1] for k in keys] == [
        f"resolve:{inc}", f"reopen:{inc}", f"resolve:{inc}:2", f"reopen:{inc}:2",
        f"resolve:{inc}:3"]
    run_range(home, W0900, W0900 + 3 * one, log=lambda m: None)
    assert len(_delivered_pd(endpoints)) == 6  # nothing twice


def test_a_range_run_resolves_an_incident_after_its_rollback_result(home, endpoints,
                                                                     monkeypatch):
    """Seed §8's order is alert, rollback, RCA, close. A range run closes A-1's 09:00 incident
    (two green windows) in its Reporter step, before the breach sensor runs the rollback: the
    resolve and "[resolved]" went out before "Rollback ... ExitCode=0" (found by an independent
    audit). The resolve now waits for the rollback, whose run sends it after its result."""
    quiet_rollback_policy(home)
    promote_to(home, "A-1")
    w = [W0900 + timedelta(minutes=15 * i) for i in range(3)]
    write_canary(home, "A-1", [e for i, ws in enumerate(w) for e in window_events(
        "A-1", ws, "restore", bad=3 * (i == 0), tenant="qa")])
    set_env(monkeypatch, endpoints)
    run_range(home, w[0], w[2] + timedelta(minutes=15), log=lambda m: None)
    inc = "INC-20250118T0900Z-A-1"
    assert _delivered_pd(endpoints) == [("trigger", inc), ("resolve", inc)]
    texts = [p["text"] for p in endpoints.delivered_posts() if p["channel"] == "#launch-autosave"]
    order = [next(i for i, t in enumerate(texts) if t.startswith(prefix))
             for prefix in ("[P2]", "Rollback A-1", "[resolved]")]
    assert order == sorted(order), texts
    # the page is resolved after the rollback reply went out, not before
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        kinds = [k for (k,) in c.execute(
            "select kind from notifications where channel like 'pagerduty:%' or "
            "channel = '#launch-autosave' order by created_at").fetchall()]
    assert kinds.index("rollback") < kinds.index("resolve"), kinds


def _b0_breach_while_pagerduty_is_down(home, endpoints, monkeypatch):
    """B-0 breaches at 09:00 while PagerDuty answers 429 to everything: the range run fails on
    the undelivered page (its rollback runs all the same). Returns the run's error."""
    quiet_rollback_policy(home)
    write_canary(home, "B-0", window_events("B-0", W0900, "merge", bad=10))
    set_env(monkeypatch, endpoints)
    _outage(endpoints, PD_ENQUEUE, 100)
    with pytest.raises(RunError) as exc:
        run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    return exc


def test_a_service_found_down_is_not_tried_again_by_the_next_runs_for_a_while(
        home, endpoints, monkeypatch):
    """PagerDuty fails every request. The window run waits out the page's retries; each
    rollback run of the breach then waited them out again (~90 s each with a slow endpoint;
    found by an independent audit). A service found down is not tried by any run for
    `ROLLOUT_OUTAGE_PAUSE_SECONDS` (`delivery_outages`): the rollback's report goes out at once,
    the page is retried by the next cycle's run, and the outage row goes when it succeeds."""
    monkeypatch.setenv("ROLLOUT_OUTAGE_PAUSE_SECONDS", "300")
    exc = _b0_breach_while_pagerduty_is_down(home, endpoints, monkeypatch)
    assert len(endpoints.of(PD_ENQUEUE)) == 4  # the window run's attempts; none after it
    assert "(HTTP 429, 4 attempts)" in str(exc.value)  # the window run's own try
    rows = read_ledger(home)
    assert rows["20250118T0900Z:B-0:#merge-ops:rollback"]["status"] == "sent"
    page = rows["20250118T0900Z:B-0:pagerduty:Merge Duty:alert"]
    assert page["status"] == "failed" and page["attempts"] == 4
    assert page["error"].startswith("not tried: pagerduty has failed since")  # the rollback run
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        assert c.execute("select transport, until > since from delivery_outages").fetchall() \
            == [("pagerduty", True)]
    _outage(endpoints, PD_ENQUEUE, 0)
    with pytest.raises(RunError):  # minutes later: still paused, not tried
        run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    assert len(endpoints.of(PD_ENQUEUE)) == 4
    with duckdb.connect(str(home.db_path)) as c:  # the next cycle, 15 minutes later
        c.execute("update delivery_outages set until = until - interval 15 minutes, "
                  "since = since - interval 15 minutes")
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", "INC-20250118T0900Z-B-0")]
    with duckdb.connect(str(home.db_path), read_only=True) as c:
        assert c.execute("select count(*) from delivery_outages").fetchone() == (0,)


def test_a_service_down_is_tried_once_per_run_so_the_rollback_report_is_not_held_back(
        home, endpoints, monkeypatch):
    """PagerDuty fails every request. The window run tries the page (4 attempts); the rollback
    run tried it twice more (the window's redelivery, then its re-publication: 8 attempts,
    87 s in a timeout outage) before posting the rollback's result. Now a run stops asking a
    service whose retries ran out, and the failure names each message once (found by an
    independent audit)."""
    exc = _b0_breach_while_pagerduty_is_down(home, endpoints, monkeypatch)
    assert len(endpoints.of(PD_ENQUEUE)) == 2 * 4  # one message's attempts in each run
    page = f"20250118T0900Z:B-0:pagerduty:{MERGE}:alert"
    assert str(exc.value).count(page) == 1
    rows = read_ledger(home)
    assert rows[page]["status"] == "failed"
    # the rollback's report went out in its thread all the same
    assert rows["20250118T0900Z:B-0:#merge-ops:rollback"]["status"] == "sent"
    _outage(endpoints, PD_ENQUEUE, 0)
    run_range(home, W0900, W0900 + timedelta(minutes=15), log=lambda m: None)
    assert _delivered_pd(endpoints) == [("trigger", "INC-20250118T0900Z-B-0")]


def test_rollout_demo_delivers_one_message_per_channel_per_breach(tmp_path):
    """The README's main job with real delivery switched on, as a user runs it."""
    root = tmp_path / "demo"
    root.mkdir()
    with FakeEndpoints(slack_token=TOKEN) as ep:
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
        env.update(SLACK_BOT_TOKEN=TOKEN, ROLLOUT_SLACK_BASE_URL=ep.slack_base_url,
                   ROLLOUT_PAGERDUTY_URL=ep.pagerduty_url,
                   PAGERDUTY_ROUTING_KEY_AUTOSAVE=PD_AUTOSAVE,
                   PAGERDUTY_ROUTING_KEY_MERGE=PD_MERGE, ROLLOUT_HOME=str(root))
        env.pop("DAGSTER_HOME", None)
        proc = subprocess.run([sys.executable, "-m", "rollout_assets.cli", "--home", str(root),
                               "demo"], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_no_secret("demo output", proc.stdout + proc.stderr)
        with duckdb.connect(str(root / "data" / "rollout.duckdb"), read_only=True) as c:
            breaches = c.execute("select window_start, phase, level from window_verdicts "
                                 "where breach").fetchall()
            rows = ledger(c)
        assert breaches, "the demo injects a breach"
        from rollout_assets.policy import load_policy
        policy = load_policy(PROJECT_ROOT / "governance" / "policy.yaml")
        expected = set()
        for ws, phase, level in breaches:
            expected.add((ws, phase, policy.phase(phase).slack_channel))
            if level in policy.notifications.incident_channel_levels:
                expected.add((ws, phase, policy.notifications.incident_channel))
        sent = [r for r in rows.values() if r["kind"] == "alert" and r["transport"] == "slack"]
        assert {(r["window_start"], r["phase"], r["channel"]) for r in sent} == expected
        assert all(r["status"] == "sent" for r in rows.values())
        # exactly one chat.postMessage per breach window and channel (plus the other kinds)
        alert_posts = [p for p in ep.slack_posts() if p["blocks"][0]["text"]["text"].split(
            " ")[1:3] in (["P1", "SLO"], ["P2", "SLO"], ["warning", "SLO"])]
        assert len(alert_posts) == len(expected)
        assert len(ep.of(SLACK_POST)) == sum(r["transport"] == "slack" for r in rows.values())
        # PagerDuty: one dedup key per paging incident, every resolve after its triggers
        events = ep.pd_events()
        assert events
        keys = {e["dedup_key"] for e in events}
        incidents = {r["incident_id"] for r in rows.values()
                     if r["transport"] == "pagerduty" and r["kind"] == "alert"}
        assert keys == incidents
        for k in keys:
            actions = [e["event_action"] for e in events if e["dedup_key"] == k]
            assert "resolve" not in actions[:-1] and actions[0] == "trigger"
        assert_home_clean(root)


def test_alerts_carry_the_evidence_excluded_counts_and_sql(home, con, endpoints, monkeypatch):
    monkeypatch.setenv("PAGERDUTY_ROUTING_KEY_AUTOSAVE", PD_AUTOSAVE)
    n = make_notifier(home, endpoints)
    sql = "select count(*) filter (where kind = 'restore' and ok) / nullif(count(*), 0) < 1"
    msg = alert(excluded={"staging": 3, "dry_run": 1}, evidence_sql=sql)
    assert n.send(con, msg) == "sent"
    [req] = endpoints.of(SLACK_POST)
    evidence = req.body["blocks"][4]["text"]["text"]
    assert evidence.startswith("*Excluded from judgement* dry_run=1, staging=3\n*Reproduce*")
    assert "nullif(count(*), 0) &lt; 1```" in evidence  # escaped like all event-derived text
    msg = alert(channel=f"pagerduty:{AUTOSAVE}", excluded={"staging": 3}, evidence_sql=sql)
    assert n.send(con, msg) == "sent"
    [page] = endpoints.of(PD_ENQUEUE)
    details = page.body["payload"]["custom_details"]
    assert details["excluded_events"] == {"staging": 3} and details["evidence_sql"] == sql


def test_an_older_ledger_gets_per_incident_resolve_keys_once(home):
    """Warehouses from before resolves named their incident are migrated on connect, so a
    resolve already sent is not sent again under its new key."""
    con = connect(home.db_path)
    now = datetime(2025, 1, 18, 10)
    con.execute("insert into notifications (idempotency_key, window_start, phase, channel, kind, "
                "level, transport, status, attempts, incident_id, created_at, updated_at) values "
                "(?, ?, 'B-0', '#merge-ops', ?, 'P2', 'slack', 'sent', 1, ?, ?, ?)",
                ["20250118T1000Z:B-0:#merge-ops:resolve", now, "resolve",
                 "INC-20250118T0900Z-B-0", now, now])
    con.execute("insert into notifications (idempotency_key, window_start, phase, channel, kind, "
                "level, transport, status, attempts, incident_id, created_at, updated_at) values "
                "(?, ?, 'B-0', '#merge-ops', ?, 'P2', 'slack', 'sent', 1, ?, ?, ?)",
                ["20250118T0900Z:B-0:#merge-ops:alert", now, "alert",
                 "INC-20250118T0900Z-B-0", now, now])
    con.execute("alter table ingest_files drop column rotated_from")  # as an older version left it
    con.close()
    con = connect(home.db_path)
    try:
        keys = sorted(r[0] for r in con.execute(
            "select idempotency_key from notifications").fetchall())
        resolve = Message(now, "B-0", "#merge-ops", "resolve", "P2", "[resolved]",
                          incident_id="INC-20250118T0900Z-B-0")
        assert keys == ["20250118T0900Z:B-0:#merge-ops:alert", resolve.idempotency_key]
        assert resolve.idempotency_key.endswith(":resolve:INC-20250118T0900Z-B-0")
    finally:
        con.close()
