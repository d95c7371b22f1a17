"""Notifications: Slack and PagerDuty messages, each recorded once in the `notifications` ledger.

With no credentials configured (the embedded default) every message goes to the outbox: a row
in `notifications` plus a JSON file under `reports/outbox/`. The idempotency key
(window, phase, channel, kind) makes re-materializing a window or re-running a range send nothing
twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

import dagster as dg

from rollout_assets.collect import atomic_write, now_utc
from rollout_assets.home import RolloutHome
from rollout_assets.partitions import window_stamp


@dataclass(frozen=True)
class Message:
    window_start: datetime
    phase: str
    channel: str  # a Slack channel ("#merge-ops") or "pagerduty:<service name>"
    kind: str  # alert | rollback | resolve
    level: str
    text: str
    payload: dict = field(default_factory=dict)
    incident_id: str | None = None

    @property
    def idempotency_key(self) -> str:
        return f"{window_stamp(self.window_start)}:{self.phase}:{self.channel}:{self.kind}"

    @property
    def file_stem(self) -> str:
        channel = re.sub(r"[^A-Za-z0-9_-]+", "-", self.channel).strip("-")
        return f"{window_stamp(self.window_start)}-{self.phase}-{channel}-{self.kind}"


class Notifier(dg.ConfigurableResource):
    """Delivers messages; today every message goes to the outbox transport."""

    home: str

    def send(self, con, msg: Message) -> str:
        """Record and deliver `msg` once. Returns 'queued' or 'duplicate'."""
        exists = con.execute(
            "select status from notifications where idempotency_key = ?", [msg.idempotency_key]
        ).fetchone()
        if exists:
            return "duplicate"
        home = RolloutHome.resolve(self.home)
        path = home.inside(home.outbox_dir / f"{msg.file_stem}.json")
        body = {
            "idempotency_key": msg.idempotency_key, "channel": msg.channel, "kind": msg.kind,
            "level": msg.level, "phase": msg.phase, "text": msg.text, "payload": msg.payload,
            "incident_id": msg.incident_id,
        }
        atomic_write(path, json.dumps(body, indent=2, default=str) + "\n")
        now = now_utc()
        con.execute(
            "insert into notifications values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [msg.idempotency_key, msg.window_start, msg.phase, msg.channel, msg.kind, msg.level,
             "outbox", "queued", 0, None, None, msg.incident_id, home.relative(path), now, now],
        )
        return "queued"
