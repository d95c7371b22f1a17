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
import pandas as pd

from rollout_assets.collect import exclusion_case_sql
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
    if n1 == 0 or n2 == 0:
        return None
    values = np.concatenate([canary, baseline])
    ranks = pd.Series(values).rank(method="average").to_numpy()
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    n = n1 + n2
    _, counts = np.unique(values, return_counts=True)
    tie = float((counts**3 - counts).sum())
    var = n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 0.0
    return float((u - n1 * n2 / 2) / math.sqrt(var))


def compare_window(con, policy: Policy, ws: datetime, phase: str) -> dict:
    """Values and sample sizes for the comparison metrics of one (window, phase)."""
    cohort = policy.baseline.cohort_exclusion
    out = {m: None for m in COMPARISON_METRICS}
    out.update(baseline_restore_count=0, baseline_autosave_count=0)
    if not cohort:
        return out
    excl = exclusion_case_sql(policy)
    rows = con.execute(
        f"""select kind, ok, latency_ms, {excl} as excluded_reason from canary_events
            where window_start = ? and phase = ? and kind in ('restore', 'autosave')""",
        [ws, phase]).df()
    canary = rows[rows["excluded_reason"].isna()]
    base = rows[rows["excluded_reason"] == cohort]
    rc, rb = canary[canary["kind"] == "restore"], base[base["kind"] == "restore"]
    out["baseline_restore_count"] = int(min(len(rc), len(rb)))
    out["restore_success_vs_baseline"] = two_proportion_upper(
        int(rc["ok"].sum()), len(rc), int(rb["ok"].sum()), len(rb))
    ac, ab = canary[canary["kind"] == "autosave"], base[base["kind"] == "autosave"]
    out["baseline_autosave_count"] = int(min(len(ac), len(ab)))
    out["autosave_latency_vs_baseline"] = mann_whitney_z(
        ac["latency_ms"].to_numpy(dtype=float), ab["latency_ms"].to_numpy(dtype=float))
    return out


def needs_comparison(phase) -> bool:
    return any(r.metric in COMPARISON_METRICS for r in phase.slos)
