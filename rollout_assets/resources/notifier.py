"""Notifications: Slack and PagerDuty messages, each delivered at most once per idempotency key and
recorded in the `notifications` ledger.

Transport per message:
- a Slack channel goes to Slack when `SLACK_BOT_TOKEN` is set, else to the outbox;
- `pagerduty:<service>` goes to the Events API v2 when the environment variable the policy names
  for that service (`pagerduty_services.*.routing_key_env`) is set, else to the outbox.
The outbox (a ledger row plus `reports/outbox/<key>.json`) is the embedded default: no secrets.

The ledger key is (window, phase, channel, kind). A key already `sent` (or `queued` in the outbox)
is never sent again, so re-materializing a window or re-running a range sends nothing twice; a
`failed` key is tried again by the next run. Ledger rows are written through their own DuckDB
connection and committed at once, so they survive the caller's transaction rolling back.

Failures are retried (429 honouring `Retry-After`, 5xx, connection errors; exponential backoff
with jitter), recorded, escalated (Slack down: PagerDuty is still paged, and a warning that does
not page is paged as `warning`; PagerDuty down: `#incident` is told), and collected so the step
can fail with one clear message after every other message went out: `raise_for_failures()`.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dagster as dg
from pydantic import PrivateAttr

from rollout_assets import messages
from rollout_assets.collect import atomic_write, now_utc
from rollout_assets.home import RolloutHome
from rollout_assets.partitions import WINDOW, window_stamp
from rollout_assets.policy import Policy, load_policy
from rollout_assets.resources.pagerduty import DEFAULT_PAGERDUTY_URL, PagerDutyEvents
from rollout_assets.resources.slack import (
    DEFAULT_SLACK_BASE_URL,
    HttpOutcome,
    RolloutSlackResource,
)
from rollout_assets.scoring import max_level

SLACK_TOKEN_ENV = "SLACK_BOT_TOKEN"
SLACK_BASE_URL_ENV = "ROLLOUT_SLACK_BASE_URL"
PAGERDUTY_URL_ENV = "ROLLOUT_PAGERDUTY_URL"
PAGERDUTY_PREFIX = "pagerduty:"
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"
DAGSTER_URL_ENV = "ROLLOUT_DAGSTER_URL"  # the UI's address in run links (`rollout ui` sets it)
OUTAGE_PAUSE_ENV = "ROLLOUT_OUTAGE_PAUSE_SECONDS"
DEFAULT_OUTAGE_PAUSE = 300.0  # under the 15-minute cycle: the next window's run tries again
# the Reporter also delivers what earlier windows' runs could not, this far back (a page lost
# to a PagerDuty outage goes out with the next cycle, not only when its window is re-run)
REDELIVERY_HORIZON = timedelta(hours=24)
REDACTED = "[redacted]"
RESOLVE_KEY_SEP = ":"  # a resolve's ledger key ends with it and its incident id


def delivered(status: str, transport: str) -> bool:
    """A ledger row whose message is never sent again: delivered, or written to the outbox."""
    return status == "sent" or (status == "queued" and transport == "outbox")


def delivered_sql(table: str) -> str:
    """SQL twin of `delivered` for a row of the ledger `table` (a name or alias)."""
    return (f"({table}.status = 'sent' or ({table}.status = 'queued' "
            f"and {table}.transport = 'outbox'))")


@dataclass(frozen=True)
class Message:
    window_start: datetime
    phase: str
    channel: str  # a Slack channel ("#merge-ops") or "pagerduty:<service name>"
    kind: str  # alert | rollback | resolve | reopen | acknowledge | escalation | rca
    level: str
    text: str
    payload: dict = field(default_factory=dict)
    incident_id: str | None = None
    cycle: int = 1  # a resolve or reopen: the how-manyth of its incident on its channel
    # what an escalation escalates, when not the delivery of its window's messages: e.g.
    # "rollback" (the rollback command failed), so that one is never taken for the other
    about: str = ""

    @property
    def _per_incident(self) -> str:
        """A resolve names its incident: one that a late breach renamed (its first window
        moved earlier) closes in the window the incident it replaced closed in, and its own
        PagerDuty trigger needs its own resolve. An incident that late data withdraws and
        brings back more than once is resolved and reopened again each time: from the
        second, the key ends with the cycle's number."""
        if self.kind not in ("resolve", "reopen") or not self.incident_id:
            return ""
        cycle = f"{RESOLVE_KEY_SEP}{self.cycle}" if self.cycle > 1 else ""
        return f"{RESOLVE_KEY_SEP}{self.incident_id}{cycle}"

    @property
    def _about(self) -> str:
        return f"{RESOLVE_KEY_SEP}{self.about}" if self.about else ""

    @property
    def idempotency_key(self) -> str:
        return (f"{window_stamp(self.window_start)}:{self.phase}:{self.channel}:{self.kind}"
                f"{self._about}{self._per_incident}")

    @property
    def file_stem(self) -> str:
        channel = re.sub(r"[^A-Za-z0-9_-]+", "-", self.channel).strip("-")
        tail = f"{self._about}{self._per_incident}".replace(RESOLVE_KEY_SEP, "-")
        return f"{window_stamp(self.window_start)}-{self.phase}-{channel}-{self.kind}{tail}"

    @property
    def is_pagerduty(self) -> bool:
        return self.channel.startswith(PAGERDUTY_PREFIX)

    @property
    def dedup_key(self) -> str | None:
        """PagerDuty's dedup key: the incident, so a storm of breaches is one page."""
        return self.incident_id or (self.payload or {}).get("dedup_key")


@dataclass(frozen=True)
class Delivery:
    ok: bool
    attempts: int
    status: int | None = None
    error: str | None = None
    thread_ts: str | None = None
    message_ts: str | None = None
    channel_id: str | None = None
    down: bool = False  # the service, not this message, failed: retries ran out, bad token


# Slack errors that every message would meet (the token), not only this one
SLACK_AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive",
                               "token_revoked", "token_expired"})


@dataclass(frozen=True)
class DeliveryFailure:
    idempotency_key: str
    transport: str
    error: str
    status: int | None
    attempts: int

    def describe(self) -> str:
        code = f"HTTP {self.status}" if self.status is not None else "no response"
        return (f"{self.transport} {self.idempotency_key}: {self.error} ({code}, "
                f"{self.attempts} attempt{'s' if self.attempts != 1 else ''})")


class DeliveryError(RuntimeError):
    """Raised after a step has sent everything it could: some message could not be delivered."""

    def __init__(self, failures: list[DeliveryFailure]):
        self.failures = failures
        super().__init__(
            f"notification delivery failed for {len(failures)} message(s) (recorded in the "
            "notifications ledger, escalated; a re-run retries them): "
            + "; ".join(f.describe() for f in failures))


_LEDGER_COLUMNS = (
    "idempotency_key", "window_start", "phase", "channel", "kind", "level", "transport", "status",
    "attempts", "response_code", "thread_ts", "incident_id", "path", "created_at", "updated_at",
    "message_ts", "channel_id", "dedup_key", "error", "body",
)


class Notifier(dg.ConfigurableResource):
    """Delivers messages to Slack / PagerDuty (or the outbox) once, with retries and escalation.

    Build it with `notifier_from_env(home)`: the Slack token is an `EnvVar`, so only the variable's
    name is part of the run config; routing keys are read from the environment at send time.
    """

    home: str
    slack: RolloutSlackResource | None = None
    pagerduty: PagerDutyEvents | None = None
    dagster_url: str = DEFAULT_DAGSTER_URL
    max_attempts: int = 4
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0
    # a transport found down is not tried again by any run for this long (`delivery_outages`)
    outage_pause_seconds: float = DEFAULT_OUTAGE_PAUSE

    _run_id: str | None = PrivateAttr(default=None)
    _failures: list = PrivateAttr(default_factory=list)
    _policy: Policy | None = PrivateAttr(default=None)
    _redelivered: set = PrivateAttr(default_factory=set)
    # transport -> why it is down for the rest of this run (see `_send`)
    _down: dict = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._run_id = context.run_id

    # ---- public API ----------------------------------------------------------------------
    def send(self, con, msg: Message) -> str:
        """Deliver `msg` once. Returns 'queued' (outbox), 'sent', 'failed' or 'duplicate'.

        Never raises for a delivery failure: it is recorded, escalated and kept for
        `raise_for_failures()`, so the caller still sends the rest (and pages PagerDuty when
        Slack is down)."""
        ledger = con.cursor()  # own connection: ledger rows commit now, whatever the caller does
        try:
            result = self._send(ledger, msg, escalate=True)
            if msg.window_start not in self._redelivered:
                # after `msg`, so a held-back rollback reply finds the alert's thread
                self._redelivered.add(msg.window_start)
                self._redeliver_failed(ledger, msg.window_start, msg.window_start + WINDOW,
                                       msg.idempotency_key)
            return result
        finally:
            ledger.close()

    def catch_up(self, con, before: datetime) -> None:
        """Deliver what runs of the windows in the REDELIVERY_HORIZON before `before` could
        not (PagerDuty or Slack was down), oldest first: the next cycle sends a lost page
        without anyone re-running its window, and a resolve held back for it follows it."""
        ledger = con.cursor()
        try:
            self._redeliver_failed(ledger, before - REDELIVERY_HORIZON, before, "")
        finally:
            ledger.close()

    def failures(self) -> list[DeliveryFailure]:
        return list(self._failures)

    def raise_for_failures(self) -> None:
        """Fail the step with one clear message if any delivery failed since the last call."""
        if self._failures:
            # once per message: a message retried in the same run failed once for the caller,
            # with the error of its last real try (not a later "not tried")
            by_key: dict[str, DeliveryFailure] = {}
            for f in self._failures:
                if f.attempts or f.idempotency_key not in by_key:
                    by_key[f.idempotency_key] = f
            failures = list(by_key.values())
            self._failures = []
            raise DeliveryError(failures)

    @property
    def run_url(self) -> str | None:
        return f"{self.dagster_url.rstrip('/')}/runs/{self._run_id}" if self._run_id else None

    # ---- routing -------------------------------------------------------------------------
    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = load_policy(RolloutHome.resolve(self.home).policy_path)
        return self._policy

    def _service_key(self, msg: Message) -> str:
        """The policy's service for a `pagerduty:<name>` channel (else the phase's service)."""
        policy = self.policy()
        name = msg.channel[len(PAGERDUTY_PREFIX):]
        for key, svc in policy.pagerduty_services.items():
            if svc.name == name or key == name:
                return key
        return policy.phase(msg.phase).pagerduty_service

    def _routing_key(self, msg: Message) -> str | None:
        env = self.policy().pagerduty_services[self._service_key(msg)].routing_key_env
        return os.environ.get(env) or None

    def _unrouted_page(self, msg: Message) -> str | None:
        """A page that goes to the outbox only because its service's routing key is unset while
        Slack is live: a deployment half configured, said in the run's log and the ledger row
        (found by an audit: such pages vanished without a word)."""
        if not msg.is_pagerduty or not self._slack_token():
            return None
        env = self.policy().pagerduty_services[self._service_key(msg)].routing_key_env
        return (f"{env} is not set: the {msg.level} {msg.kind} of {window_stamp(msg.window_start)}"
                f" {msg.phase} for {msg.channel[len(PAGERDUTY_PREFIX):]} went to the outbox only "
                "(reports/outbox/), while Slack is live")

    def _slack_token(self) -> str | None:
        if self.slack is None:
            return None
        token = self.slack.token
        if isinstance(token, dg.EnvVar):  # used outside a run: resolve it ourselves
            token = token.get_value()
        return token or None

    def transport(self, msg: Message) -> str:
        if msg.is_pagerduty:
            return "pagerduty" if self._routing_key(msg) else "outbox"
        return "slack" if self._slack_token() else "outbox"

    def _secrets(self) -> list[str]:
        out = [self._slack_token()]
        services = self.policy().pagerduty_services.values()
        out += [os.environ.get(s.routing_key_env) for s in services]
        return sorted({s for s in out if s}, key=len, reverse=True)

    def _scrub(self, text: str | None) -> str | None:
        if text is None:
            return None
        for secret in self._secrets():
            text = text.replace(secret, REDACTED)
        return text

    # ---- delivery ------------------------------------------------------------------------
    def _send(self, ledger, msg: Message, escalate: bool, prepared: dict | None = None) -> str:
        key = msg.idempotency_key
        row = ledger.execute(
            "select status, transport, attempts from notifications where idempotency_key = ?",
            [key]).fetchone()
        if row and delivered(*row[:2]):
            return "duplicate"
        transport = self.transport(msg)
        attempts_before = row[2] if row else 0
        now = now_utc()
        base = dict(window_start=msg.window_start, phase=msg.phase, channel=msg.channel,
                    kind=msg.kind, level=msg.level, transport=transport,
                    incident_id=msg.incident_id, dedup_key=msg.dedup_key, updated_at=now)
        if transport == "outbox":
            path = self._write_outbox(msg)
            gap = self._unrouted_page(msg)
            if gap:
                dg.get_dagster_logger("rollout_assets.notifier").warning(gap)
            self._upsert(ledger, key, row is not None, dict(
                base, status="queued", attempts=attempts_before, path=path, error=gap),
                created_at=now)
            self._release_resolves(ledger, msg)
            return "queued"
        thread = self._thread(ledger, msg) if transport == "slack" else None
        body = prepared or self._render(msg, transport, thread)
        waits_for = self._resolve_waits_for(ledger, msg)
        if waits_for is not None:
            # A range run judges the closing window before the Reporter has sent the last
            # breach's alert: hold the resolve until it has, so PagerDuty never sees
            # resolve → trigger (a re-opened incident) and Slack's thread starts with the alert.
            self._upsert(ledger, key, row is not None, dict(
                base, status="queued", attempts=attempts_before,
                body=json.dumps(body, default=str),
                error=f"held until the alert of {window_stamp(waits_for)} is out"),
                created_at=now)
            return "queued"
        # recorded as 'queued' with its body before the first byte goes out: a crash mid-send
        # leaves a row the next run delivers (at-least-once if interrupted, else exactly once)
        self._upsert(ledger, key, row is not None, dict(
            base, status="queued", attempts=attempts_before, body=json.dumps(body, default=str)),
            created_at=now)
        down = self._down.get(transport) or self._paused(ledger, transport)
        if down:
            # Down earlier in this run or a recent one (its retries ran out, or the token was
            # refused): every further message would wait out the same retries, holding back
            # the rest (a rollback's own report sat behind two passes over a failed page, and
            # each rollback run of a breach waited ~90 s again). Failed without a try; the
            # next window's run (after the pause) delivers it.
            d = Delivery(False, 0, None, f"not tried: {down}")
        elif transport == "slack":
            d = self._deliver_slack(ledger, msg, body, thread)
        else:
            d = self._deliver_pagerduty(msg, body)
        if d.down:
            self._mark_down(ledger, transport, self._scrub(d.error) or "failed")
        elif d.ok and transport in self._outages(ledger):
            ledger.execute("delete from delivery_outages where transport = ?", [transport])
        error = self._scrub(d.error)
        self._upsert(ledger, key, True, dict(
            status="sent" if d.ok else "failed", attempts=attempts_before + d.attempts,
            response_code=d.status, thread_ts=d.thread_ts, message_ts=d.message_ts,
            channel_id=d.channel_id, error=error, updated_at=now_utc()))
        log = dg.get_dagster_logger("rollout_assets.notifier")
        if d.ok:
            log.info(f"{transport} {key}: sent ({d.attempts} attempt(s), HTTP {d.status})")
        else:
            failure = DeliveryFailure(key, transport, error or "failed", d.status, d.attempts)
            self._failures.append(failure)
            log.error(f"delivery failed: {failure.describe()}")
            if escalate:
                self._escalate(ledger, msg, transport, error or "failed")
        self._release_resolves(ledger, msg)
        return "sent" if d.ok else "failed"

    # ---- outages ---------------------------------------------------------------------------
    def _mark_down(self, ledger, transport: str, error: str) -> None:
        self._down[transport] = f"{transport} failed earlier in this run ({error})"
        if self.outage_pause_seconds <= 0:
            return
        now = now_utc()
        ledger.execute(
            "insert into delivery_outages values (?, ?, ?, ?) on conflict (transport) do update "
            "set until = excluded.until, error = excluded.error",
            [transport, now, now + timedelta(seconds=self.outage_pause_seconds), error])

    @staticmethod
    def _outages(ledger) -> set[str]:
        return {t for (t,) in ledger.execute("select transport from delivery_outages").fetchall()}

    def _paused(self, ledger, transport: str) -> str | None:
        """Why `transport` is not tried now: a run found it down less than the pause ago."""
        row = ledger.execute("select since, until, error from delivery_outages where "
                             "transport = ? and until > ?", [transport, now_utc()]).fetchone()
        if row is None:
            return None
        self._down[transport] = (f"{transport} has failed since {row[0]:%Y-%m-%d %H:%M:%S} UTC "
                                 f"({row[2]}); tried again after {row[1]:%H:%M:%S} UTC")
        return self._down[transport]

    # ---- resolve ordering ----------------------------------------------------------------
    def _routes(self, phase: str, level: str) -> set[str]:
        """Where the policy sends an alert of `level` in `phase` (as `reporting` routes it)."""
        policy = self.policy()
        ph = policy.phase(phase)
        out = {ph.slack_channel}
        if level in policy.notifications.incident_channel_levels:
            out.add(policy.notifications.incident_channel)
        if level in policy.notifications.page_levels:
            out.add(PAGERDUTY_PREFIX + policy.pagerduty_services[ph.pagerduty_service].name)
        return out

    def _resolve_waits_for(self, ledger, msg: Message) -> datetime | None:
        """For a resolve: the phase's last breached window before it, if that window's alert
        on this channel has not been handled yet (no ledger row). Only windows from the
        incident's first alert on: an id late data replaced is resolved under its own alerts,
        and the breach that renamed it is never paged again (`reporting.announced_as`)."""
        if msg.kind != "resolve" or not msg.incident_id or msg.phase not in (
                self.policy().phase_names):
            return None
        last = ledger.execute(
            "select window_start, level from window_verdicts where phase = ? and breach and "
            "window_start < ? and window_start >= coalesce((select min(window_start) from "
            "notifications where incident_id = ? and kind = 'alert'), '-infinity'::TIMESTAMP) "
            "order by window_start desc limit 1",
            [msg.phase, msg.window_start, msg.incident_id]).fetchone()
        if last is None or msg.channel not in self._routes(msg.phase, last[1]):
            return None
        # delivered, not merely recorded: a trigger that failed goes out again later, and a
        # resolve sent before it would leave PagerDuty's incident open for good
        done = ledger.execute(
            "select 1 from notifications where window_start = ? and phase = ? and channel = ? "
            f"and kind = 'alert' and {delivered_sql('notifications')}",
            [last[0], msg.phase, msg.channel]).fetchone()
        return None if done else last[0]

    def _release_resolves(self, ledger, msg: Message) -> None:
        """After an incident's alert went out on a channel, send the resolves it held back."""
        if msg.kind != "alert" or not msg.incident_id:
            return
        held = ledger.execute(
            "select window_start, phase, channel, kind, level, incident_id, body from "
            "notifications where kind = 'resolve' and status = 'queued' and transport <> "
            "'outbox' and channel = ? and incident_id = ? and body is not null",
            [msg.channel, msg.incident_id]).fetchall()
        for row in held:
            self._send(ledger, self._message_from_row(row), escalate=True,
                       prepared=json.loads(row[-1]))

    @staticmethod
    def _message_from_row(row) -> Message:
        w, phase, channel, kind, level, incident, body = row
        prepared = json.loads(body)
        text = prepared.get("text") or (prepared.get("payload") or {}).get("summary") or ""
        return Message(w, phase, channel, kind, level, text,
                       {"dedup_key": prepared.get("dedup_key")}, incident)

    def _render(self, msg: Message, transport: str, thread) -> dict:
        """What the ledger keeps and the transport sends (a PagerDuty event without its key)."""
        if transport == "slack":
            status = "open: updates follow in this thread" if (
                thread is None and msg.kind == "alert") else None
            return messages.slack_message(msg, run_url=self.run_url, status=status)
        if not msg.dedup_key:
            raise ValueError(f"{msg.idempotency_key}: a PagerDuty message needs an incident_id "
                             "or payload['dedup_key']")
        return messages.redact(messages.pagerduty_event(
            msg, routing_key="", dedup_key=msg.dedup_key, run_url=self.run_url))

    def _redeliver_failed(self, ledger, start: datetime, end: datetime,
                          current_key: str) -> None:
        """Deliver the messages of windows in [start, end) an earlier run could not (failed,
        or interrupted mid-send) from the body recorded then: a rollback or escalation message
        is not regenerated by a re-run, so this is how it still arrives, once. An escalation
        whose cause has been delivered since (the page went out after all) is `superseded`,
        not sent."""
        rows = ledger.execute(
            "select window_start, phase, channel, kind, level, incident_id, body, "
            "idempotency_key from notifications where window_start >= ? and window_start < ? "
            "and transport <> 'outbox' and status in ('failed', 'queued') and body is not null "
            "and idempotency_key <> ? order by created_at", [start, end, current_key]).fetchall()
        for *row, key in rows:
            if row[3] == "escalation" and not self._still_undelivered(ledger, row):
                ledger.execute("update notifications set status = 'superseded', error = ?, "
                               "updated_at = ? where idempotency_key = ?",
                               ["what it escalated was delivered since", now_utc(), key])
                continue
            self._send(ledger, self._message_from_row(row), escalate=True,
                       prepared=json.loads(row[-1]))

    def _still_undelivered(self, ledger, row) -> bool:
        """Whether an escalation's cause is still undelivered: a message of its window and
        phase on the transport it stood in for (PagerDuty for `#incident`, Slack for a page)."""
        ws, phase, channel = row[0], row[1], row[2]
        escalated = "slack" if channel.startswith(PAGERDUTY_PREFIX) else "pagerduty"
        return ledger.execute(
            "select 1 from notifications where window_start = ? and phase = ? and "
            "transport = ? and status in ('failed', 'queued')",
            [ws, phase, escalated]).fetchone() is not None

    def _escalate(self, ledger, msg: Message, transport: str, error: str) -> None:
        """Slack down → PagerDuty still pages (a non-paging warning is paged as `warning`);
        PagerDuty down → `#incident` is told to page by hand."""
        policy = self.policy()
        if transport == "slack":
            if msg.kind != "alert" or msg.level in policy.notifications.page_levels:
                return  # a paging level's PagerDuty message is in the same batch
            service = policy.pagerduty_services[policy.phase(msg.phase).pagerduty_service]
            esc = Message(
                msg.window_start, msg.phase, f"{PAGERDUTY_PREFIX}{service.name}", "escalation",
                msg.level, f"Slack delivery to {msg.channel} failed ({error}): {msg.text}",
                {**msg.payload, "severity": "warning", "service": service.name},
                msg.incident_id)
        else:
            service = msg.channel[len(PAGERDUTY_PREFIX):]
            esc = Message(
                msg.window_start, msg.phase, policy.notifications.incident_channel, "escalation",
                msg.level, f"PagerDuty could not be reached for {service} ({error}); page the "
                f"on-call by hand. {msg.kind}: {msg.text}",
                {k: v for k, v in msg.payload.items() if k != "severity"}, msg.incident_id)
        self._send(ledger, esc, escalate=False)

    def _retry(self, call: Callable[[], HttpOutcome]) -> tuple[HttpOutcome, int]:
        """Call until success, a final error, or `max_attempts`. 429 waits `Retry-After` (plus
        jitter); 5xx and connection errors back off exponentially with jitter."""
        attempt = 0
        while True:
            attempt += 1
            out = call()
            if out.ok or not out.retryable or attempt >= self.max_attempts:
                return out, attempt
            if out.retry_after is not None:
                if out.retry_after > self.max_backoff_seconds:
                    return HttpOutcome(False, out.status, f"{out.error}; Retry-After "
                                       f"{out.retry_after:g}s exceeds the wait limit"), attempt
                delay = out.retry_after + random.uniform(0, self.backoff_seconds)
            else:
                ceiling = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1))
                delay = random.uniform(ceiling / 2, ceiling)
            time.sleep(delay)

    def _deliver_pagerduty(self, msg: Message, event: dict) -> Delivery:
        event = {"routing_key": self._routing_key(msg), **event}
        out, attempts = self._retry(lambda: (self.pagerduty or PagerDutyEvents()).enqueue(event))
        return Delivery(out.ok, attempts, out.status, out.error, down=not out.ok and out.retryable)

    # ---- Slack threads -------------------------------------------------------------------
    def _thread(self, ledger, msg: Message) -> tuple[str, str] | None:
        """(thread_ts, channel_id) to reply in: the incident's first message in this channel,
        else that of the id it was announced under before late data renamed it (`thread_of`),
        else, for a rollback/resolve, the window's alert."""
        q = ("select thread_ts, channel_id from notifications where transport = 'slack' and "
             "status = 'sent' and thread_ts is not null and channel = ? and idempotency_key <> ? ")
        for incident in (msg.incident_id, (msg.payload or {}).get("thread_of")):
            if not incident:
                continue
            row = ledger.execute(q + "and incident_id = ? order by created_at limit 1",
                                 [msg.channel, msg.idempotency_key, incident]).fetchone()
            if row:
                return row[0], row[1]
        if msg.kind != "alert":
            row = ledger.execute(
                q + "and window_start = ? and phase = ? and kind = 'alert' limit 1",
                [msg.channel, msg.idempotency_key, msg.window_start, msg.phase]).fetchone()
            if row:
                return row[0], row[1]
        return None

    def _deliver_slack(self, ledger, msg: Message, body: dict, thread) -> Delivery:
        assert self.slack is not None
        args: dict = {"channel": msg.channel, **body, "unfurl_links": False,
                      "unfurl_media": False}
        if thread:
            args["thread_ts"] = thread[0]
        out, attempts = self._retry(lambda: self.slack.call("chat.postMessage", **args))
        if not out.ok:
            return Delivery(False, attempts, out.status, out.error,
                            down=out.retryable or out.error in SLACK_AUTH_ERRORS)
        ts = out.data.get("ts")
        channel_id = out.data.get("channel") or (thread[1] if thread else None)
        if thread:
            self._update_thread_root(ledger, msg, thread[0], thread[1] or channel_id)
        return Delivery(True, attempts, out.status, None, thread[0] if thread else ts, ts,
                        channel_id)

    def _thread_status(self, ledger, msg: Message, thread_ts: str, channel_id: str) -> str:
        """The thread's state from the ledger (plus `msg`, about to be marked sent), so the root
        says the same whatever order a range run delivered things in."""
        rows = ledger.execute(
            "select kind, window_start, level, phase from notifications where transport = "
            "'slack' and status = 'sent' and thread_ts = ? and channel_id = ?",
            [thread_ts, channel_id]).fetchall()
        rows.append((msg.kind, msg.window_start, msg.level, msg.phase))
        alerts = sorted({(w, lvl, ph) for k, w, lvl, ph in rows if k == "alert"})
        resolved = sorted(w for k, w, _, _ in rows if k == "resolve")
        parts = [f"resolved in window {window_stamp(resolved[-1])}" if resolved else "open"]
        if alerts:
            w, lvl, _ = alerts[-1]
            parts.append(f"{len(alerts)} breached window{'s' if len(alerts) != 1 else ''}, "
                         f"latest {window_stamp(w)} ({lvl})")
            rb = ledger.execute(
                "select phase, rollback_to, status, exit_code from rollbacks where status <> "
                "'skipped' and phase = ? and list_contains(?::TIMESTAMP[], window_start) "
                "order by started_at desc limit 1",
                [alerts[-1][2], [a[0] for a in alerts]]).fetchone()
            if rb:
                parts.append(f"rollback {rb[0]} → {rb[1]}: ExitCode={rb[3]} ({rb[2]})")
        return " · ".join(parts)

    def _update_thread_root(self, ledger, msg: Message, thread_ts: str, channel_id: str) -> None:
        """`chat.update` the thread's first message so its status says where the incident is.
        A failed update loses no message (the reply went out): it is logged, not escalated."""
        root = ledger.execute(
            "select idempotency_key, body from notifications where transport = 'slack' and "
            "status = 'sent' and message_ts = ? and channel_id = ? limit 1",
            [thread_ts, channel_id]).fetchone()
        if not root or not root[1]:
            return
        status = self._thread_status(ledger, msg, thread_ts, channel_id)
        levels = [r[0] for r in ledger.execute(
            "select level from notifications where transport = 'slack' and status = 'sent' "
            "and kind = 'alert' and thread_ts = ? and channel_id = ?",
            [thread_ts, channel_id]).fetchall()]
        if msg.kind == "alert":
            levels.append(msg.level)
        body = messages.with_status(json.loads(root[1]), status, max_level(levels))
        out, attempts = self._retry(lambda: self.slack.call(
            "chat.update", channel=channel_id, ts=thread_ts, **body))
        if out.ok:
            ledger.execute("update notifications set body = ?, updated_at = ? where "
                           "idempotency_key = ?", [json.dumps(body), now_utc(), root[0]])
        else:
            dg.get_dagster_logger("rollout_assets.notifier").warning(
                f"chat.update of {root[0]} failed after {attempts} attempt(s): "
                f"{self._scrub(out.error)}")

    # ---- ledger & outbox -----------------------------------------------------------------
    def _write_outbox(self, msg: Message) -> str:
        home = RolloutHome.resolve(self.home)
        path = home.inside(home.outbox_dir / f"{msg.file_stem}.json")
        body = {
            "idempotency_key": msg.idempotency_key, "channel": msg.channel, "kind": msg.kind,
            "level": msg.level, "phase": msg.phase, "text": msg.text, "payload": msg.payload,
            "incident_id": msg.incident_id,
        }
        atomic_write(path, json.dumps(body, indent=2, default=str) + "\n")
        return home.relative(path)

    @staticmethod
    def _upsert(ledger, key: str, exists: bool, values: dict, created_at=None) -> None:
        if exists:
            cols = ", ".join(f"{c} = ?" for c in values)
            ledger.execute(f"update notifications set {cols} where idempotency_key = ?",
                           [*values.values(), key])
            return
        row = {c: None for c in _LEDGER_COLUMNS}
        row.update(values, idempotency_key=key, created_at=created_at)
        ledger.execute(
            f"insert into notifications ({', '.join(row)}) values "
            f"({', '.join('?' for _ in row)})", list(row.values()))


def notifier_from_env(home: str, environ: Mapping[str, str] | None = None) -> Notifier:
    """The notifier `definitions.py` wires: Slack when `SLACK_BOT_TOKEN` is set (as an `EnvVar`,
    resolved inside the run), base URLs from `ROLLOUT_SLACK_BASE_URL` / `ROLLOUT_PAGERDUTY_URL`,
    and the Dagster UI's address for run links from `ROLLOUT_DAGSTER_URL`."""
    env = os.environ if environ is None else environ
    slack = None
    if env.get(SLACK_TOKEN_ENV):
        slack = RolloutSlackResource(token=dg.EnvVar(SLACK_TOKEN_ENV),
                                     base_url=env.get(SLACK_BASE_URL_ENV) or DEFAULT_SLACK_BASE_URL)
    return Notifier(home=home, slack=slack,
                    pagerduty=PagerDutyEvents(url=env.get(PAGERDUTY_URL_ENV)
                                              or DEFAULT_PAGERDUTY_URL),
                    dagster_url=env.get(DAGSTER_URL_ENV) or DEFAULT_DAGSTER_URL,
                    outage_pause_seconds=float(env.get(OUTAGE_PAUSE_ENV)
                                               or DEFAULT_OUTAGE_PAUSE))
