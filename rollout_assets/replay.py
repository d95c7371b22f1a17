"""Policy replay (what-if): re-score stored windows under a candidate policy.

Window metrics are recomputed from the stored `canary_events` with the candidate's exclusion
rules, then scored and decided under the candidate by the Analyzer's own code
(`analyze.score_metrics`, `analyze.decide_windows`). Nothing
in the production tables changes and nothing is sent; every (window, phase) whose verdict would
differ is printed and stored in `replay_diffs` with both sides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from rollout_assets.analyze import decide_windows, score_metrics
from rollout_assets.collect import WINDOW_METRICS_SQL, exclusion_case_sql, now_utc
from rollout_assets.policy import Policy
from rollout_assets.scoring import Verdict
from rollout_assets.warehouse import records, transaction


@dataclass(frozen=True)
class Diff:
    window_start: datetime
    phase: str
    production: tuple | None  # (breach, level, rollback_to, failed_slos, policy_version)
    candidate: Verdict

    @property
    def kind(self) -> str:
        was = bool(self.production and self.production[0])
        now = self.candidate.breach
        if now and not was:
            return "new breach"
        if was and not now:
            return "no longer a breach"
        return "changed"


def replay(con, candidate: Policy, start: datetime, end: datetime) -> tuple[str, list[Diff], int]:
    """Returns (replay_id, diffs, windows compared). Writes only `replay_diffs`."""
    metrics = records(con, WINDOW_METRICS_SQL.format(exclusion=exclusion_case_sql(candidate)),
                      [start, end, now_utc(), candidate.version])
    # scored and decided as the Analyzer does (baseline, comparisons, burn rates, the Collector's
    # faults): the production policy replayed over unchanged events changes nothing
    verdicts = decide_windows(con, candidate, score_metrics(con, candidate, metrics, start, end),
                              [(rec["window_start"], rec["phase"]) for rec in metrics], start, end)
    production = {
        (ws, ph): (b, lv, rb, list(f), pv)
        for ws, ph, b, lv, rb, f, pv in con.execute(
            "select window_start, phase, breach, level, rollback_to, failed_slos, policy_version "
            "from window_verdicts where window_start >= ? and window_start < ?", [start, end]
        ).fetchall()
    }
    diffs: list[Diff] = []
    for verdict in verdicts:
        prod = production.get((verdict.window_start, verdict.phase))
        same = prod is not None and (
            bool(prod[0]) == verdict.breach and prod[1] == verdict.level
            and prod[2] == verdict.rollback_to and sorted(prod[3]) == sorted(verdict.failed_slos))
        if (prod is None and verdict.breach) or (prod is not None and not same):
            diffs.append(Diff(verdict.window_start, verdict.phase, prod, verdict))
    compared = len(verdicts)
    replay_id = "replay-" + hashlib.sha256(
        f"{candidate.version}:{start}:{end}:{now_utc()}".encode()).hexdigest()[:10]
    now = now_utc()
    if not diffs:
        return replay_id, diffs, compared
    with transaction(con):
        con.executemany(
            "insert into replay_diffs values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [[replay_id, d.window_start, d.phase,
              d.production[0] if d.production else None, d.candidate.breach,
              d.production[1] if d.production else None, d.candidate.level,
              d.production[2] if d.production else None, d.candidate.rollback_to,
              d.production[3] if d.production else None, d.candidate.failed_slos,
              d.production[4] if d.production else None, candidate.version, now]
             for d in diffs],
        )
    return replay_id, diffs, compared


def describe(d: Diff) -> str:
    p = d.production
    before = ("no verdict" if p is None else
              f"breach={str(bool(p[0])).lower()} level={p[1]} failed={','.join(p[3]) or '-'}")
    c = d.candidate
    after = (f"breach={str(c.breach).lower()} level={c.level} "
             f"failed={','.join(c.failed_slos) or '-'}"
             + (f" rollback_to={c.rollback_to}" if c.rollback_to else ""))
    return f"{d.window_start:%Y-%m-%d %H:%M} {d.phase}: {d.kind}: production {before} -> " \
           f"candidate {after}"

