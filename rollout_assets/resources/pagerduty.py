"""PagerDuty Events API v2: one JSON POST to `/v2/enqueue`.

`dagster_pagerduty` wraps the unmaintained `pypd`; the Events API is a single request, so this is
a few lines of urllib. Routing keys are not configuration of this resource: the policy names the
environment variable of each service (`pagerduty_services.*.routing_key_env`) and the notifier
reads it at send time, so a key is never part of a run's config or snapshot.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import dagster as dg
from pydantic import Field

from rollout_assets.resources.slack import HttpOutcome, retry_after_seconds

DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"


class PagerDutyEvents(dg.ConfigurableResource):
    """Where Events v2 events go (`ROLLOUT_PAGERDUTY_URL`)."""

    url: str = Field(default=DEFAULT_PAGERDUTY_URL,
                     description="Events API v2 enqueue URL (ROLLOUT_PAGERDUTY_URL).")
    timeout_seconds: float = Field(default=10.0, description="Per-request timeout.")

    def enqueue(self, event: dict) -> HttpOutcome:
        """POST one event. 202 is success; 429 and 5xx may be retried; other 4xx are final."""
        if not self.url.lower().startswith(("http://", "https://")):
            return HttpOutcome(False, None, "ROLLOUT_PAGERDUTY_URL must be an http(s) URL")
        req = urllib.request.Request(
            self.url, data=json.dumps(event).encode(), method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     "User-Agent": "rollout-assets"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_seconds) as resp:  # noqa: S310
                body = _json(resp.read())
                return HttpOutcome(200 <= resp.status < 300, resp.status, data=body)
        except urllib.error.HTTPError as exc:
            body = _json(exc.read())
            reason = body.get("message") or body.get("status") or exc.reason
            retryable = exc.code == 429 or exc.code >= 500
            return HttpOutcome(False, exc.code, f"HTTP {exc.code}: {reason}", retryable,
                               retry_after_seconds(exc.headers), {})
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, DNS: try again
            return HttpOutcome(False, None, f"{type(exc).__name__}: {exc}", True)


def _json(raw: bytes) -> dict:
    try:
        out = json.loads(raw.decode("utf-8", "replace") or "{}")
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}
