"""Retention of canary events (`retention.canary_events_days` in the policy).

Every stored event is kept by default, and a window's run pays for that: the duplicate check
probes every stored event key (~4 ms per million), so a busy product's history would slowly
push a live window past its time slot. With `canary_events_days: N`, each Collector run first
deletes the events whose window lies before the day of the newest stored window minus N days
(the **purge horizon**), before it reads new lines, and never those of the run's own windows or
the history their verdicts read: a run never deletes what it is about to judge. Each purge is
a row of `event_retention` (horizon, events deleted, when), the audit of what is gone. DuckDB
drops the emptied row groups at its next checkpoint.

What the deleted events fed stays: `window_metrics`, `slo_scores`, `window_verdicts`, the
monitoring files, incidents and check history. But a window cannot be recomputed without its
events, nor judged without the history its verdict reads (`Policy.event_history_minutes`: the
crash baseline's lookback), so windows before the purge horizon plus that history are
**kept**: the window assets leave their rows as they are and say so, and `rollout run` refuses
a range that holds only kept windows. A late event of a kept window is stored and counted in
its file's totals like any other, and deleted by the next purge. Duplicate event ids are
recognised within the retained days: a line repeating an event deleted before is stored
again, in a window that is never recomputed, and deleted again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from rollout_assets.policy import Policy
from rollout_assets.warehouse import transaction


@dataclass(frozen=True)
class Purge:
    purged_before: datetime
    deleted_events: int
    newest_window: datetime
    unjudged_windows: int = 0  # of the windows whose events were deleted: never computed


def purge_events(con, policy: Policy, now: datetime, judging: datetime) -> Purge | None:
    """Delete the events before the purge horizon (see the module); None when the policy keeps
    every event or nothing is stored. `judging` is the first window of the calling run: the
    horizon never passes it, nor the history its verdict reads, so a run judges its own windows
    from their events even when newer ones are stored (a backfill of old files)."""
    days = policy.retention.canary_events_days
    if days is None:
        return None
    newest = con.execute("select max(window_start) from canary_events").fetchone()[0]
    if newest is None:
        return None
    horizon = min(datetime.combine(newest.date(), datetime.min.time()) - timedelta(days=days),
                  judging - timedelta(minutes=policy.event_history_minutes))
    with transaction(con):
        (unjudged,) = con.execute(
            "select count(distinct window_start) from canary_events where window_start < ? "
            "and window_start not in (select window_start from window_metrics)",
            [horizon]).fetchone()
        (deleted,) = con.execute("delete from canary_events where window_start < ?",
                                 [horizon]).fetchone()
        last = con.execute("select max(purged_before) from event_retention").fetchone()[0]
        if not deleted and last is not None and last >= horizon:
            return None
        con.execute("insert into event_retention values (?, ?, ?, ?, ?)",
                    [horizon, deleted, newest, days, now])
    return Purge(horizon, int(deleted), newest, int(unjudged))


# `kept_before` as of the Collector's latest run, on its materialization of the run's last window
# (what the late-data sensor reads: it never opens the warehouse a run may be writing)
KEPT_BEFORE_KEY = "retention/kept_before"


def kept_before(con, policy: Policy) -> datetime | None:
    """Windows starting before this are kept as they are (see the module); None when no event
    was ever deleted."""
    horizon = con.execute("select max(purged_before) from event_retention").fetchone()[0]
    if horizon is None:
        return None
    return horizon + timedelta(minutes=policy.event_history_minutes)


def split_kept(windows: list[datetime], kept: datetime | None) -> tuple[list, list]:
    """(windows to compute, windows kept as they are)."""
    if kept is None:
        return list(windows), []
    return [w for w in windows if w >= kept], [w for w in windows if w < kept]


def kept_note(kept: datetime) -> str:
    return (f"kept as it was: the events of windows before {kept:%Y-%m-%d %H:%M} UTC, or the "
            "history their verdicts read, were deleted by retention "
            "(retention.canary_events_days)")
