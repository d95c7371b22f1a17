"""Shared fixtures: a real rollout home on disk, its policy, its DuckDB file, event builders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from rollout_assets.home import PROJECT_ROOT, RolloutHome
from rollout_assets.policy import Policy, load_policy
from rollout_assets.warehouse import connect

# A fixed, already-closed day so partition keys exist and tests never depend on "now".
DAY = datetime(2025, 1, 18)


@pytest.fixture(autouse=True)
def no_outage_pause(monkeypatch):
    """A delivery that failed is retried by the very next run here, as by the next 15-minute
    cycle in production (`Notifier.outage_pause_seconds`, 300 s by default, keeps a run minutes
    after an outage from waiting out the same retries again); the test of the pause sets it."""
    monkeypatch.setenv("ROLLOUT_OUTAGE_PAUSE_SECONDS", "0")


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> RolloutHome:
    """An empty rollout home; Dagster's instance lives under it, never in the developer's."""
    root = tmp_path / "home"
    root.mkdir()
    monkeypatch.setenv("ROLLOUT_HOME", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(root / ".dagster"))
    monkeypatch.delenv("ROLLOUT_MODE", raising=False)
    return RolloutHome(root.resolve())


@pytest.fixture
def policy() -> Policy:
    return load_policy(PROJECT_ROOT / "governance" / "policy.yaml")


@pytest.fixture
def con(home: RolloutHome) -> Iterator:
    c = connect(home.db_path)
    yield c
    c.close()


def stored_events(con, columns: str, ids) -> dict[str, tuple]:
    """Stored events by `event_id` (`canary_events` keeps `event_key = hash(event_id)`), with
    `columns` of `canary_event_sources`."""
    return {r[0]: r[1:] for r in con.execute(
        f"select i.id, {columns} from canary_event_sources e "
        "join unnest(?::VARCHAR[]) as i(id) on e.event_key = hash(i.id)", [list(ids)]).fetchall()}


def event(**overrides) -> dict:
    """A valid judged event; override any field, or pass field=None... to drop it via `drop`."""
    base = {
        "event_id": "e-1", "ts": "2025-01-18T09:03:12.123Z", "phase": "A-1", "kind": "autosave",
        "latency_ms": 812.5, "ok": True, "conflict": False, "session_id": "s-42",
        "tenant": "qa", "environment": "production",
        "tags": {"observed_only": False, "dry_run": False},
    }
    drop = overrides.pop("drop", ())
    base.update(overrides)
    for k in drop:
        base.pop(k, None)
    return base


def write_canary(home: RolloutHome, phase: str, lines: list, mode: str = "a") -> Path:
    """Append events (dicts are JSON-encoded, str/bytes written as-is) to phase-<phase>.jsonl."""
    home.canary_dir.mkdir(parents=True, exist_ok=True)
    path = home.canary_dir / f"phase-{phase}.jsonl"
    with open(path, mode + "b") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode()
            f.write(line + b"\n")
    return path
