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


_CRASH_RATE = (
    "count(*) filter (where kind = 'crash') / nullif(count(*) filter (where kind = 'session'), 0)"
)

METRICS: dict[str, MetricSpec] = {
    "autosave_p95_ms": MetricSpec(
        "autosave_count", "95th percentile AutoSave latency (ms)",
        "quantile_cont(latency_ms, 0.95) filter (where kind = 'autosave')",
    ),
    "autosave_error_count": MetricSpec(
        "autosave_count", "AutoSave events with ok=false",
        "count(*) filter (where kind = 'autosave' and not ok)",
    ),
    "restore_success_rate": MetricSpec(
        "restore_count", "successful restores / restores",
        "count(*) filter (where kind = 'restore' and ok)"
        " / nullif(count(*) filter (where kind = 'restore'), 0)",
    ),
    "merge_auto_success_rate": MetricSpec(
        "merge_count", "merges resolved automatically / merges",
        "count(*) filter (where kind = 'merge' and ok)"
        " / nullif(count(*) filter (where kind = 'merge'), 0)",
    ),
    "merge_conflict_rate": MetricSpec(
        "merge_count", "merges that raised a conflict / merges",
        "count(*) filter (where kind = 'merge' and conflict)"
        " / nullif(count(*) filter (where kind = 'merge'), 0)",
    ),
    "crash_rate": MetricSpec("session_count", "crashes / sessions", _CRASH_RATE),
    "crash_rate_delta": MetricSpec(
        "session_count",
        "crash_rate minus the baseline crash rate (absolute: 0.05 = five percentage points)",
        f"({_CRASH_RATE}) - {{baseline}}",
    ),
}
