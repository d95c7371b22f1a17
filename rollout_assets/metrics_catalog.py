"""Which window metrics an SLO may judge, and which count is each metric's sample size.

This is vocabulary, not policy: thresholds and which phase judges what live in
governance/policy.yaml.
"""

from typing import NamedTuple


class MetricSpec(NamedTuple):
    sample_column: str
    description: str
    # aggregate over one window's judged events that reproduces the metric (evidence in alerts)
    sql: str
    # the values a threshold may take: a rate is a fraction, so `>= 99.5` is a typo for 0.995
    bounds: tuple[float, float] = (float("-inf"), float("inf"))
    # a success rate: the share of this kind's judged events with `ok` (burn-rate history)
    success_of: str | None = None


_CRASH_RATE = (
    "count(*) filter (where kind = 'crash') / nullif(count(*) filter (where kind = 'session'), 0)"
)

METRICS: dict[str, MetricSpec] = {
    "autosave_p95_ms": MetricSpec(
        "autosave_count", "95th percentile AutoSave latency (ms)",
        "quantile_cont(latency_ms, 0.95) filter (where kind = 'autosave')", (0.0, float("inf")),
    ),
    "autosave_error_count": MetricSpec(
        "autosave_count", "AutoSave events with ok=false",
        "count(*) filter (where kind = 'autosave' and not ok)", (0.0, float("inf")),
    ),
    "restore_success_rate": MetricSpec(
        "restore_count", "successful restores / restores",
        "count(*) filter (where kind = 'restore' and ok)"
        " / nullif(count(*) filter (where kind = 'restore'), 0)", (0.0, 1.0), "restore",
    ),
    "merge_auto_success_rate": MetricSpec(
        "merge_count", "merges resolved automatically / merges",
        "count(*) filter (where kind = 'merge' and ok)"
        " / nullif(count(*) filter (where kind = 'merge'), 0)", (0.0, 1.0), "merge",
    ),
    "merge_conflict_rate": MetricSpec(
        "merge_count", "merges that raised a conflict / merges",
        "count(*) filter (where kind = 'merge' and conflict)"
        " / nullif(count(*) filter (where kind = 'merge'), 0)", (0.0, 1.0),
    ),
    "crash_rate": MetricSpec("session_count", "crashes / sessions", _CRASH_RATE, (0.0, 1.0)),
    # canary vs baseline (Kayenta-style): the judged canary against the policy's baseline cohort
    # (baseline.cohort_exclusion) in the same window and phase; see rollout_assets/compare.py
    "restore_success_vs_baseline": MetricSpec(
        "baseline_restore_count",
        "upper 95 % bound of (canary - baseline) restore success rate (two-proportion Wald)",
        "-- computed by rollout_assets.compare from canary_events", (-1.0, 1.0),
    ),
    "autosave_latency_vs_baseline": MetricSpec(
        "baseline_autosave_count",
        "Mann-Whitney z of canary vs baseline AutoSave latency (positive = canary slower)",
        "-- computed by rollout_assets.compare from canary_events",
    ),
    "crash_rate_delta": MetricSpec(
        "session_count",
        "crash_rate minus the baseline crash rate (absolute: 0.05 = five percentage points)",
        f"({_CRASH_RATE}) - {{baseline}}", (-1.0, 1.0),
    ),
}
