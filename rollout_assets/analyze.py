"""Analyzer storage: read `window_metrics`, score with `scoring`, replace `slo_scores` and
`window_verdicts` for a range of windows in one transaction. What a window is judged against
beyond itself (the crash baseline's lookback, burn-rate history) comes from `canary_events`."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from itertools import accumulate

from rollout_assets.collect import exclusion_case_sql, sql_literal
from rollout_assets.collector_faults import apply_faults, load_faults
from rollout_assets.compare import compare_windows, needs_comparison, no_comparison
from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import WINDOW
from rollout_assets.policy import BurnRateRule, Policy
from rollout_assets.scoring import SloScore, Verdict, decide, score_burn, score_window
from rollout_assets.warehouse import insert_columns, records, transaction

SCORE_COLUMNS = (
    "window_start", "phase", "slo", "metric", "value", "comparator", "threshold", "sample_size",
    "min_sample", "passed", "status", "severity", "rollback", "shadow", "baseline",
)


# Judged events of one phase per window, by kind, straight from the stored events.
_HISTORY_SQL = """
select window_start, kind::VARCHAR, count(*), count(*) filter (where ok)
from canary_events
where phase = ? and window_start >= ? and window_start < ? and kind in ({kinds})
    and {exclusion} is null
group by all
"""


def judged_history(con, policy: Policy, phase: str, kinds: Sequence[str], start: datetime,
                   end: datetime) -> dict[datetime, dict[str, tuple[int, int]]]:
    """window -> kind -> (judged events, of them `ok`) of `phase` in [start, end), under
    `policy`'s exclusions.

    What a window is judged against beyond its own metrics (the crash baseline's lookback, a
    burn rate's earlier windows) is read from the stored events, not from `window_metrics`:
    that table holds only the windows someone has materialized, so the same events would be
    judged differently depending on which windows had been run before (and a window run
    before its late events arrived would keep hiding them)."""
    out: dict[datetime, dict[str, tuple[int, int]]] = {}
    sql = _HISTORY_SQL.format(kinds=", ".join(map(sql_literal, kinds)),
                              exclusion=exclusion_case_sql(policy))
    for ws, kind, n, ok in con.execute(sql, [phase, start, end]).fetchall():
        out.setdefault(ws, {})[kind] = (int(n), int(ok))
    return out


def baseline_rates(con, policy: Policy,
                   windows: Sequence[datetime]) -> dict[datetime, tuple[float, str]]:
    """window -> (baseline crash rate, "measured" | "pinned"): the crash rate of the baseline
    phase's judged sessions in the lookback, else the pinned value.

    The lookback is the windows *before* the one judged, `[start - lookback_hours, start)`: the
    contract's "previous 7 days", so the window being judged never moves its own baseline."""
    if not windows:
        return {}
    b = policy.baseline
    lookback = timedelta(hours=b.lookback_hours)
    history = judged_history(con, policy, b.phase, ("session", "crash"),
                             min(windows) - lookback, max(windows))
    starts = sorted(history)
    sessions = list(accumulate((history[w].get("session", (0, 0))[0] for w in starts),
                               initial=0))
    crashes = list(accumulate((history[w].get("crash", (0, 0))[0] for w in starts), initial=0))
    out = {}
    for ws in windows:
        i, j = bisect_left(starts, ws - lookback), bisect_left(starts, ws)
        n = sessions[j] - sessions[i]
        out[ws] = ((crashes[j] - crashes[i]) / n, "measured") if n >= b.min_sessions \
            else (b.pinned_crash_rate, "pinned")
    return out


def baseline_crash_rate(con, policy: Policy, window_start: datetime) -> tuple[float, str]:
    """The crash-rate baseline of one window (see `baseline_rates`)."""
    return baseline_rates(con, policy, [window_start])[window_start]


def burn_history(con, policy: Policy, phase: str, rule: BurnRateRule, first: datetime,
                 end: datetime) -> dict[datetime, tuple[int, float | None]]:
    """window -> (sample, success rate) of a burn-rate rule's metric, for every window its
    scores over [first, end) look back on."""
    kind = METRICS[rule.metric].success_of
    history = judged_history(con, policy, phase, (kind,),
                             first - timedelta(minutes=rule.long_minutes), end)
    return {ws: (n, ok / n) for ws, by_kind in history.items() for n, ok in [by_kind[kind]]}


def score_metrics(con, policy: Policy, metrics: Sequence[dict], first: datetime,
                  end: datetime) -> list[SloScore]:
    """Score `window_metrics` rows of windows in [first, end) under `policy`: each phase's SLOs
    (with the crash baseline and the canary-vs-baseline comparisons) and burn-rate rules. The
    production Analyzer and the what-if replay both score here, so the same policy over the
    same events gives the same scores."""
    judged = [rec for rec in metrics if rec["phase"] in policy.phase_names]
    baselines = baseline_rates(con, policy, sorted({
        rec["window_start"] for rec in judged
        if policy.phase(rec["phase"]).judged_against_baseline}))
    compared: dict[str, dict] = {}  # phase -> window -> comparison values, one query a phase
    burns: dict[tuple[str, str], dict] = {}  # (phase, rule) -> window -> (sample, rate)
    scores: list[SloScore] = []
    for rec in judged:  # a phase the policy does not know is not judged
        phase = policy.phase(rec["phase"])
        ws = rec["window_start"]
        baseline = baselines[ws][0] if phase.judged_against_baseline else None
        if needs_comparison(phase):
            if phase.name not in compared:
                compared[phase.name] = compare_windows(con, policy, phase.name, first, end)
            rec = {**rec, **(compared[phase.name].get(ws) or no_comparison())}
        scores.extend(score_window(phase, ws, rec, baseline))
        for rule in phase.burn_rate_alerts:
            key = (phase.name, rule.name)
            if key not in burns:
                burns[key] = burn_history(con, policy, phase.name, rule, first, end)
            scores.append(score_burn(rule, ws, phase.name, burns[key]))
    return scores


def score_range(con, policy: Policy, first: datetime, last: datetime,
                now: datetime) -> list[SloScore]:
    """Replace `slo_scores` for windows in [first, last] from `window_metrics`."""
    end = last + WINDOW
    metrics = records(con, "select * from window_metrics where window_start >= ? "
                      "and window_start < ? order by window_start, phase", [first, end])
    scores = score_metrics(con, policy, metrics, first, end)
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


def decide_windows(con, policy: Policy, scores: Sequence[SloScore],
                   windows: Iterable[tuple[datetime, str]], first: datetime,
                   end: datetime) -> list[Verdict]:
    """Verdicts of the (window, phase) pairs in [first, end) from their scores, escalated by the
    Collector's faults (a canary file it could not read); `windows` adds pairs that have
    metrics but no scores (a phase without SLOs gets a not_judged verdict)."""
    by_window: dict[tuple, list[SloScore]] = {}
    for s in scores:
        by_window.setdefault((s.window_start, s.phase), []).append(s)
    for key in windows:
        by_window.setdefault(key, [])
    faults = load_faults(con, first, end)
    for key in faults:
        by_window.setdefault(key, [])
    return apply_faults(policy, [
        decide(policy, policy.phase(phase), ws, window_scores)
        for (ws, phase), window_scores in sorted(by_window.items())
        if phase in policy.phase_names
    ], faults)


def judge_range(con, policy: Policy, first: datetime, last: datetime,
                now: datetime) -> list[Verdict]:
    """Replace `window_verdicts` for windows in [first, last] from `slo_scores`."""
    end = last + WINDOW
    windows = con.execute("select window_start, phase from window_metrics "
                          "where window_start >= ? and window_start < ?", [first, end]).fetchall()
    verdicts = decide_windows(con, policy, load_scores(con, first, last), windows, first, end)
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
