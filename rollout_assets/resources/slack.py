"""Slack: dagster-slack's `SlackResource` with a configurable Web API base URL.

dagster-slack's resource always talks to https://slack.com/api/; tests and staging point
`ROLLOUT_SLACK_BASE_URL` at another server, so this subclass builds the same `WebClient` with a
`base_url`. slack_sdk's own retry handlers are switched off: the notifier owns retries (backoff,
jitter, `Retry-After`) and counts every attempt in the ledger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field
from slack_sdk.errors import SlackApiError
from slack_sdk.web.client import WebClient

DEFAULT_SLACK_BASE_URL = "https://slack.com/api/"

# Slack error codes worth another try; anything else (invalid_auth, channel_not_found, ...) is
# final: repeating the same request cannot fix a token or a channel name.
RETRYABLE_SLACK_ERRORS = frozenset({
    "ratelimited", "rate_limited", "internal_error", "fatal_error", "service_unavailable",
    "request_timeout",
})


@dataclass(frozen=True)
class HttpOutcome:
    """One HTTP attempt, reduced to what the retry loop and the ledger need (never a secret)."""

    ok: bool
    status: int | None  # HTTP status; None when no response arrived
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    data: dict = field(default_factory=dict)


def retry_after_seconds(headers) -> float | None:
    if not headers:
        return None
    for k, v in dict(headers).items():
        if k.lower() == "retry-after":
            v = v[0] if isinstance(v, list | tuple) else v
            try:
                return max(0.0, float(v))
            except (TypeError, ValueError):
                return None
    return None


class RolloutSlackResource(SlackResource):
    """`SlackResource` (token from `EnvVar("SLACK_BOT_TOKEN")`) plus `base_url`."""

    base_url: str = Field(default=DEFAULT_SLACK_BASE_URL,
                          description="Slack Web API base (ROLLOUT_SLACK_BASE_URL).")
    timeout_seconds: float = Field(default=10.0, description="Per-request timeout.")

    def get_client(self) -> WebClient:
        base = self.base_url if self.base_url.endswith("/") else self.base_url + "/"
        token = self.token
        if isinstance(token, dg.EnvVar):  # outside a run the field still holds the EnvVar
            token = token.get_value()
        logger = logging.getLogger("rollout_assets.slack_sdk")
        return WebClient(token=token, base_url=base, timeout=int(self.timeout_seconds),
                         retry_handlers=[], logger=logger)

    def call(self, method: str, **kwargs) -> HttpOutcome:
        """One Web API call (`chat.postMessage`, `chat.update`) as an `HttpOutcome`.

        Exceptions are reduced to status and Slack's error code: a `SlackApiError` carries the
        request (and so the Authorization header) and must not travel further."""
        client = self.get_client()
        try:
            resp = client.api_call(method, json=kwargs)
            return HttpOutcome(True, resp.status_code, data=dict(resp.data))
        except SlackApiError as exc:
            r = exc.response
            status = getattr(r, "status_code", None)
            data = r.data if isinstance(getattr(r, "data", None), dict) else {}
            code = str(data.get("error") or f"HTTP {status}")
            retryable = status == 429 or (status is not None and status >= 500) or (
                code in RETRYABLE_SLACK_ERRORS)
            return HttpOutcome(False, status, code, retryable,
                               retry_after_seconds(getattr(r, "headers", None)), {})
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, DNS: try again
            return HttpOutcome(False, None, f"{type(exc).__name__}: {exc}", True)
