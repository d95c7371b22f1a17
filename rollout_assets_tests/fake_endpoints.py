"""A real HTTP server on 127.0.0.1 that speaks just enough Slack Web API and PagerDuty Events v2.

- `POST /api/chat.postMessage` and `POST /api/chat.update` (JSON or form body, bearer token):
  `{"ok": true, "channel": "C…", "ts": "…"}` like Slack; a wrong or missing token answers
  `{"ok": false, "error": "invalid_auth"}` / `not_authed` with HTTP 200, as Slack does; updating
  an unknown message answers `message_not_found`.
- `POST /v2/enqueue`: 202 `{"status": "success", "dedup_key": …}`; an event without a routing
  key, a valid `event_action` or (for trigger) `payload.summary/source/severity` gets 400.

Every request is recorded (path, headers, parsed body, arrival time). `script(endpoint, ...)`
queues answers for the next requests to an endpoint: `rate_limited(retry_after)`,
`server_error()`, `slack_error("invalid_auth")`, or any `Reply`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

SLACK_POST = "chat.postMessage"
SLACK_UPDATE = "chat.update"
PD_ENQUEUE = "enqueue"
PD_ACTIONS = {"trigger", "acknowledge", "resolve"}
PD_SEVERITIES = {"critical", "error", "warning", "info"}


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict | str
    headers: dict = field(default_factory=dict)


def rate_limited(retry_after: float | int = 1) -> Reply:
    return Reply(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)})


def server_error(status: int = 500) -> Reply:
    return Reply(status, "<html>upstream unavailable</html>")


def slack_error(error: str = "invalid_auth") -> Reply:
    return Reply(200, {"ok": False, "error": error})


def bad_request(message: str = "Event object is invalid") -> Reply:
    return Reply(400, {"status": "invalid event", "message": message, "errors": [message]})


@dataclass(frozen=True)
class Recorded:
    endpoint: str
    path: str
    headers: dict
    body: dict
    raw: bytes
    at: float  # time.monotonic() on arrival
    status: int  # what the server answered
    ok: bool  # whether the answer was a success (Slack ok=true, PagerDuty status=success)


class FakeEndpoints:
    """Start with `with FakeEndpoints(slack_token=...) as ep:`; point the notifier at
    `ep.slack_base_url` and `ep.pagerduty_url`."""

    def __init__(self, slack_token: str | None = None):
        self.slack_token = slack_token
        self.requests: list[Recorded] = []
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._ts = 0
        self._messages: dict[tuple[str, str], dict] = {}  # (channel id, ts) -> message
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> FakeEndpoints:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def slack_base_url(self) -> str:
        return f"{self.url}/api/"

    @property
    def pagerduty_url(self) -> str:
        return f"{self.url}/v2/enqueue"

    # ---- scripting and inspection ------------------------------------------------------------
    def script(self, endpoint: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[endpoint].extend(replies)

    def of(self, endpoint: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def slack_posts(self) -> list[dict]:
        return [r.body for r in self.of(SLACK_POST)]

    def delivered_posts(self) -> list[dict]:
        """Bodies of chat.postMessage requests Slack accepted."""
        return [r.body for r in self.of(SLACK_POST) if r.ok]

    def pd_events(self) -> list[dict]:
        return [r.body for r in self.of(PD_ENQUEUE)]

    @staticmethod
    def channel_id(name: str) -> str:
        return "C" + hashlib.sha1(name.encode()).hexdigest()[:8].upper()

    def message(self, channel_id: str, ts: str) -> dict | None:
        with self._lock:
            return self._messages.get((channel_id, ts))

    # ---- the server ----------------------------------------------------------------------------
    def _answer(self, endpoint: str, headers: dict, body: dict) -> Reply:
        with self._lock:
            if self._scripts[endpoint]:
                return self._scripts[endpoint].popleft()
        if endpoint == PD_ENQUEUE:
            return self._pagerduty(body)
        return self._slack(endpoint, headers, body)

    def _slack(self, endpoint: str, headers: dict, body: dict) -> Reply:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer "):]:
            return slack_error("not_authed")
        if self.slack_token is not None and auth != f"Bearer {self.slack_token}":
            return slack_error("invalid_auth")
        channel = body.get("channel")
        if not channel:
            return slack_error("channel_not_found")
        if not (body.get("text") or body.get("blocks")):
            return slack_error("no_text")
        with self._lock:
            if endpoint == SLACK_UPDATE:
                key = (channel, str(body.get("ts")))
                if key not in self._messages:
                    return slack_error("message_not_found")
                self._messages[key] = {**self._messages[key], "text": body.get("text"),
                                       "blocks": body.get("blocks")}
                return Reply(200, {"ok": True, "channel": channel, "ts": key[1],
                                   "text": body.get("text")})
            if endpoint != SLACK_POST:
                return slack_error("unknown_method")
            cid = channel if channel.startswith("C") else self.channel_id(channel)
            thread = body.get("thread_ts")
            if thread and (cid, str(thread)) not in self._messages:
                return slack_error("thread_not_found")
            self._ts += 1
            ts = f"{1700000000 + self._ts}.{self._ts:06d}"
            self._messages[(cid, ts)] = {"text": body.get("text"), "blocks": body.get("blocks"),
                                         "thread_ts": thread, "channel_name": channel}
            return Reply(200, {"ok": True, "channel": cid, "ts": ts,
                               "message": {"text": body.get("text"), "ts": ts}})

    @staticmethod
    def _pagerduty(event: dict) -> Reply:
        if not event.get("routing_key"):
            return bad_request("'routing_key' is missing")
        action = event.get("event_action")
        if action not in PD_ACTIONS:
            return bad_request("'event_action' is invalid")
        if action != "trigger" and not event.get("dedup_key"):
            return bad_request("'dedup_key' is required")
        if action == "trigger":
            payload = event.get("payload") or {}
            if not payload.get("summary") or not payload.get("source") or (
                    payload.get("severity") not in PD_SEVERITIES):
                return bad_request("'payload' is invalid")
        return Reply(202, {"status": "success", "message": "Event processed",
                           "dedup_key": event.get("dedup_key") or "generated"})

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                arrived = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = _parse(raw, headers.get("content-type", ""))
                path = self.path.split("?", 1)[0]
                if path.startswith("/api/"):
                    endpoint = path[len("/api/"):]
                elif path == "/v2/enqueue":
                    endpoint = PD_ENQUEUE
                else:
                    endpoint = path
                reply = outer._answer(endpoint, headers, body)
                ok = isinstance(reply.body, dict) and (
                    reply.body.get("ok") is True or reply.body.get("status") == "success")
                with outer._lock:
                    outer.requests.append(Recorded(endpoint, path, headers, body, raw,
                                                   arrived, reply.status, ok))
                data = (json.dumps(reply.body) if isinstance(reply.body, dict)
                        else reply.body).encode()
                self.send_response(reply.status)
                ctype = "application/json" if isinstance(reply.body, dict) else "text/html"
                self.send_header("Content-Type", f"{ctype}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _parse(raw: bytes, content_type: str) -> dict:
    text = raw.decode("utf-8", "replace")
    if "json" in content_type:
        try:
            out = json.loads(text or "{}")
            return out if isinstance(out, dict) else {"_body": out}
        except ValueError:
            return {"_unparsed": text}
    return {k: v[0] for k, v in parse_qs(text).items()}
