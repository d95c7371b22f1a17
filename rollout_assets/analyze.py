"""Analyzer storage: read `window_metrics`, score with `scoring`, replace `slo_scores` and
`window_verdicts` for a range of windows in one transaction."""

from __future__ import annotations

from datetime import datetime, timedelta

from rollout_assets.collector_faults import apply_faults, load_faults
from rollout_assets.compare import compare_windows, needs_comparison, no_comparison
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import WINDOW
from rollout_assets.policy import Policy
from rollout_assets.scoring import SloScore, Verdict, decide, score_burn, score_window
from rollout_assets.warehouse import insert_columns, records, transaction

SCORE_COLUMNS = (
    "window_start", "phase", "slo", "metric", "value", "comparator", "threshold", "sample_size",
    "min_sample", "passed", "status", "severity", "rollback", "shadow", "baseline",
)


def baseline_crash_rate(con, policy: Policy, window_start: datetime) -> tuple[float, str]:
    """Crash rate of the baseline phase's judged sessions in the lookback, else the pinned value.

    The lookback is the windows *before* this one, `[start - lookback_hours, start)`: the
    contract's "previous 7 days", so the window being judged never moves its own baseline."""
    b = policy.baseline
    crashes, sessions = con.execute(
        """select coalesce(sum(crash_count), 0), coalesce(sum(session_count), 0)
           from window_metrics where phase = ? and window_start >= ? and window_start < ?""",
        [b.phase, window_start - timedelta(hours=b.lookback_hours), window_start],
    ).fetchone()
    if sessions >= b.min_sessions:
        return crashes / sessions, "measured"
    return b.pinned_crash_rate, "pinned"


def burn_scores(con, phase, ws: datetime) -> list[SloScore]:
    """Multi-window burn-rate rules of a phase at window `ws`, from its stored window metrics."""
    out = []
    for rule in phase.burn_rate_alerts:
        count_col = METRICS[rule.metric].sample_column
        rows = con.execute(
            f"select window_start, {count_col}, {rule.metric} from window_metrics "
            "where phase = ? and window_start > ? and window_start <= ?",
            [phase.name, ws - timedelta(minutes=rule.long_minutes), ws]).fetchall()
        history = {w: (int(n), r) for w, n, r in rows}
        out.append(score_burn(rule, ws, phase.name, history))
    return out


def _needs_baseline(phase) -> bool:
    return any(r.metric == "crash_rate_delta" for r in phase.slos)


def score_range(con, policy: Policy, first: datetime, last: datetime,
                now: datetime) -> list[SloScore]:
    """Replace `slo_scores` for windows in [first, last] from `window_metrics`."""
    end = last + WINDOW
    metrics = records(con, "select * from window_metrics where window_start >= ? "
                      "and window_start < ? order by window_start, phase", [first, end])
    scores: list[SloScore] = []
    compared: dict[str, dict] = {}  # phase -> window -> comparison values, one query a phase
    for rec in metrics:
        if rec["phase"] not in policy.phase_names:
            continue  # a phase the current policy no longer knows is not judged
        phase = policy.phase(rec["phase"])
        ws = rec["window_start"]
        baseline = baseline_crash_rate(con, policy, ws)[0] if _needs_baseline(phase) else None
        if needs_comparison(phase):
            if phase.name not in compared:
                compared[phase.name] = compare_windows(con, policy, phase.name, first, end)
            rec = {**rec, **(compared[phase.name].get(ws) or no_comparison())}
        scores.extend(score_window(phase, ws, rec, baseline))
        if phase.burn_rate_alerts:
            scores.extend(burn_scores(con, phase, ws))
    with transaction(con):
        con.execute("delete from slo_scores where window_start >= ? and window_start < ?",
                    [first, end])
        if scores:
            insert_columns(con, "slo_scores", SCORE_COLUMNS,
                           [[getattr(s, c) for s in scores] for c in SCORE_COLUMNS],
                           policy_version=policy.version, scored_at=now)
    return scores


def load_scores(con, first: datetime, last: datetime) -> list[SloScore]:
    return [SloScore(**rec) for rec in records(
        con, f"select {', '.join(SCORE_COLUMNS)} from slo_scores where window_start >= ? "
        "and window_start < ? order by window_start, phase, slo", [first, last + WINDOW])]


def judge_range(con, policy: Policy, first: datetime, last: datetime,
                now: datetime) -> list[Verdict]:
    """Replace `window_verdicts` for windows in [first, last] from `slo_scores`."""
    end = last + WINDOW
    by_window: dict[tuple, list[SloScore]] = {}
    for s in load_scores(con, first, last):
        by_window.setdefault((s.window_start, s.phase), []).append(s)
    # phases without SLOs have metrics but no scores: they get a not_judged verdict
    for ws, phase in con.execute(
        "select window_start, phase from window_metrics where window_start >= ? "
        "and window_start < ?", [first, end]
    ).fetchall():
        by_window.setdefault((ws, phase), [])
    faults = load_faults(con, first, end)  # canary files the Collector could not read
    for key in faults:
        by_window.setdefault(key, [])
    verdicts = apply_faults(policy, [
        decide(policy, policy.phase(phase), ws, scores)
        for (ws, phase), scores in sorted(by_window.items())
        if phase in policy.phase_names
    ], faults)
    with transaction(con):
        con.execute("delete from window_verdicts where window_start >= ? and window_start < ?",
                    [first, end])
        if verdicts:
            con.executemany(
                "insert into window_verdicts values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    [v.window_start, v.window_start + WINDOW, v.phase, v.status, v.breach,
                     v.rollback_required, v.rollback_to, v.level, v.failed_slos,
                     policy.version, now]
                    for v in verdicts
                ],
            )
    return verdicts
