"""Helpers for the Dagster-level tests: a persistent rollout home per module, a small hand-written
data set with one breach, and snapshots of everything a run writes (tables and files)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from rollout_assets.home import RolloutHome
from rollout_assets.warehouse import connect
from rollout_assets_tests.conftest import DAY, event, write_canary

START = DAY.replace(hour=9)
END = DAY.replace(hour=10)
WINDOWS = [START + timedelta(minutes=15 * i) for i in range(4)]
BREACH_WINDOW = WINDOWS[1]  # 09:15: 6 of 12 restores fail in A-1
SMALL_WINDOW = WINDOWS[3]  # 09:45: only 5 restores (min_sample 10)
# delivery credentials would send real messages: the tests use the outbox
SECRET_ENV = ("SLACK_BOT_TOKEN", "PAGERDUTY_ROUTING_KEY_AUTOSAVE", "PAGERDUTY_ROUTING_KEY_MERGE",
              "ROLLOUT_MODE")


@contextmanager
def persistent_home(tmp_path_factory, name: str) -> Iterator[RolloutHome]:
    """A home (and `<home>/.dagster` instance) that lives for a whole module; the environment is
    restored afterwards, including what `runner.prepare_instance` writes to os.environ."""
    root = tmp_path_factory.mktemp(name) / "home"
    root.mkdir()
    mp = pytest.MonkeyPatch()
    saved = dict(os.environ)
    try:
        mp.setenv("ROLLOUT_HOME", str(root))
        mp.setenv("DAGSTER_HOME", str(root / ".dagster"))
        for var in SECRET_ENV:
            mp.delenv(var, raising=False)
        yield RolloutHome(root.resolve())
    finally:
        mp.undo()
        os.environ.clear()
        os.environ.update(saved)


def ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def write_breach_data(home: RolloutHome, phase: str = "A-1") -> None:
    """Four windows 09:00-10:00 of `phase` traffic plus A-0 sessions. Every window has 12
    autosaves (500..1600 ms, p95 1545) and 12 restores, except: 09:15 has 6 failed restores
    (0.5 < 0.995: a P2 breach) and 09:45 has only 5 restores (below min_sample)."""
    lines, a0 = [], []
    for w, ws in enumerate(WINDOWS):
        for i in range(12):
            lines.append(event(event_id=f"{phase}-{w}-as{i}", phase=phase, kind="autosave",
                               ts=ts(ws + timedelta(seconds=60 * i)), latency_ms=500.0 + 100 * i,
                               ok=True))
        for i in range(5 if ws == SMALL_WINDOW else 12):
            lines.append(event(event_id=f"{phase}-{w}-rs{i}", phase=phase, kind="restore",
                               ts=ts(ws + timedelta(seconds=60 * i + 30)),
                               ok=not (ws == BREACH_WINDOW and i < 6), drop=["latency_ms"]))
        # seed §4 traffic: stored and counted, never judged
        lines.append(event(event_id=f"{phase}-{w}-obs", phase=phase, kind="restore", ok=False,
                           ts=ts(ws + timedelta(minutes=14)), drop=["latency_ms"],
                           tags={"observed_only": True}))
        for i in range(20):
            a0.append(event(event_id=f"A-0-{w}-s{i}", phase="A-0", kind="session",
                            ts=ts(ws + timedelta(seconds=40 * i)),
                            drop=["latency_ms", "ok", "conflict"]))
    lines.append("this line is not JSON")
    write_canary(home, phase, lines)
    write_canary(home, "A-0", a0)


def breach_home_with_flags_at_a1(home: RolloutHome) -> None:
    """`write_breach_data` plus the flag store moved to A-1, as the canary phase starts."""
    from rollout_assets import flags
    from rollout_assets.policy import load_policy

    write_breach_data(home)
    policy = load_policy(home.policy_path)
    con = connect(home.db_path)
    try:
        flags.promote(con, policy, "A-1", reason="test: canary starts", actor="pytest")
    finally:
        con.close()


def judged_rules(policy, phase: str) -> set[str]:
    """Every rule that scores a row per window of `phase` (SLOs, shadow ones included, and
    burn-rate rules): the policy grows, the tests follow it instead of counting by hand."""
    p = policy.phase(phase)
    return {s.name for s in p.slos} | {b.name for b in getattr(p, "burn_rate_alerts", ())}


def table_counts(home: RolloutHome) -> dict[str, int]:
    con = connect(home.db_path, read_only=True)
    try:
        tables = [r[0] for r in con.execute(
            "select table_name from information_schema.tables where table_schema = 'main' "
            "order by 1").fetchall()]
        return {t: con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


def query(home: RolloutHome, sql: str, params=()) -> list[tuple]:
    con = connect(home.db_path, read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def files_under(home: RolloutHome, *dirs: str) -> dict[str, bytes]:
    out = {}
    for d in dirs:
        base = home.root / d
        for p in sorted(base.rglob("*")) if base.exists() else []:
            if p.is_file():
                out[str(p.relative_to(home.root))] = p.read_bytes()
    return out


def rel_paths(paths) -> set[str]:
    return {str(Path(p)) for p in paths}
