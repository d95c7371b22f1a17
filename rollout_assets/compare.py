"""Canary vs baseline statistics (as Kayenta does): is the canary cohort significantly worse than
the traffic the policy keeps outside the canary in the same window and phase?

- restore success: two-proportion difference with a 95 % Wald interval; the SLO value is the
  interval's upper bound, so "canary - baseline >= -0.005" fails only when the canary is worse
  with confidence.
- AutoSave latency: Mann-Whitney U with ties averaged, as a z score (positive = canary slower);
  rank-based, so a few slow outliers in a small cohort do not decide it.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np

from rollout_assets.collect import exclusion_case_sql
from rollout_assets.partitions import WINDOW
from rollout_assets.policy import Policy

Z95 = 1.959963984540054
COMPARISON_METRICS = ("restore_success_vs_baseline", "autosave_latency_vs_baseline")


def two_proportion_upper(ok_c: int, n_c: int, ok_b: int, n_b: int) -> float | None:
    """Upper 95 % bound of p_canary - p_baseline; None without both samples."""
    if n_c == 0 or n_b == 0:
        return None
    p_c, p_b = ok_c / n_c, ok_b / n_b
    se = math.sqrt(p_c * (1 - p_c) / n_c + p_b * (1 - p_b) / n_b)
    return (p_c - p_b) + Z95 * se


def mann_whitney_z(canary: np.ndarray, baseline: np.ndarray) -> float | None:
    """z of the Mann-Whitney U statistic for canary > baseline (tie-corrected variance)."""
    n1, n2 = len(canary), len(baseline)
    values = np.concatenate([canary, baseline])
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    # the t values of a tie group hold ranks cum - t + 1 .. cum: each gets their average
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group]
    return _mw_z(n1, n2, float(ranks[:n1].sum()), float((counts**3 - counts).sum()))


def _mw_z(n1: int, n2: int, rank_sum: float, tie: float) -> float | None:
    """z from the canary's rank sum (ties averaged) and the tie term sum(t^3 - t). The ranks
    are halves and the terms integers, exact in a double: any exact way of summing them
    gives the same z."""
    if n1 == 0 or n2 == 0:
        return None
    u = rank_sum - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 0.0
    return float((u - n1 * n2 / 2) / math.sqrt(var))


_COMPARE_SQL = """
with cohorts as (  -- the canary (judged) and the baseline cohort, restores and AutoSaves
    select window_start, kind, ok, latency_ms, excluded_reason is null as canary
    from (select window_start, kind, ok, latency_ms, {exclusion} as excluded_reason
          from canary_events
          where phase = ? and window_start >= ? and window_start < ?
              and kind in ('restore', 'autosave'))
    where excluded_reason is null or excluded_reason = ?
), restores as (
    select window_start,
        count(*) filter (where canary) as n_c, count(*) filter (where canary and ok) as ok_c,
        count(*) filter (where not canary) as n_b,
        count(*) filter (where not canary and ok) as ok_b
    from cohorts where kind = 'restore' group by all
), ties as (  -- one row per distinct latency of a window: t values, t_c of them the canary's
    select window_start, latency_ms, count(*) as t, count(*) filter (where canary) as t_c
    from cohorts where kind = 'autosave' group by all
), ranked as (  -- a tie group holds ranks cum - t + 1 .. cum: its average is cum - (t - 1) / 2
    select window_start, t, t_c,
        sum(t) over (partition by window_start order by latency_ms
                     rows between unbounded preceding and current row) - (t - 1) / 2 as rank
    from ties
), saves as (
    select window_start, sum(t_c) as n1, sum(t - t_c) as n2, sum(t_c * rank) as rank_sum,
        sum(t * t * t - t) as tie
    from ranked group by all
)
select window_start, coalesce(n_c, 0), coalesce(ok_c, 0), coalesce(n_b, 0), coalesce(ok_b, 0),
    coalesce(n1, 0)::BIGINT, coalesce(n2, 0)::BIGINT, coalesce(rank_sum, 0)::DOUBLE,
    coalesce(tie, 0)::DOUBLE
from restores full join saves using (window_start)
"""


def no_comparison() -> dict:
    out: dict = {m: None for m in COMPARISON_METRICS}
    out.update(baseline_restore_count=0, baseline_autosave_count=0)
    return out


def compare_windows(con, policy: Policy, phase: str, first: datetime,
                    end: datetime) -> dict[datetime, dict]:
    """Values and sample sizes of the comparison metrics for every window of `phase` in
    [first, end) that has restores or AutoSaves, from one query (ranks included)."""
    cohort = policy.baseline.cohort_exclusion
    if not cohort:
        return {}
    rows = con.execute(_COMPARE_SQL.format(exclusion=exclusion_case_sql(policy)),
                       [phase, first, end, cohort]).fetchall()
    out = {}
    for ws, n_c, ok_c, n_b, ok_b, n1, n2, rank_sum, tie in rows:
        got = no_comparison()
        got["baseline_restore_count"] = int(min(n_c, n_b))
        got["restore_success_vs_baseline"] = two_proportion_upper(ok_c, n_c, ok_b, n_b)
        got["baseline_autosave_count"] = int(min(n1, n2))
        got["autosave_latency_vs_baseline"] = _mw_z(n1, n2, rank_sum, tie)
        out[ws] = got
    return out


def compare_window(con, policy: Policy, ws: datetime, phase: str) -> dict:
    """Values and sample sizes for the comparison metrics of one (window, phase)."""
    return compare_windows(con, policy, phase, ws, ws + WINDOW).get(ws) or no_comparison()


def needs_comparison(phase) -> bool:
    return any(r.metric in COMPARISON_METRICS for r in phase.slos)
