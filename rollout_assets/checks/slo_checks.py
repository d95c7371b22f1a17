"""One asset check per SLO in the policy, evaluated for every window a run materializes.

Each evaluation carries the window, value, threshold, sample size and policy version, so the
check history in the Dagster UI reads as the governance audit trail. A window in which the phase
had no traffic gets no evaluation; a sample below the rule's minimum is a WARN-level
"insufficient data" result, never a pass.

The `slo_scores` asset emits these evaluations itself, one per scored (window, phase, SLO):
selecting the checks in the window job would make Dagster plan one evaluation per check per
window (8 checks x 96 windows of events per day), most for phases with no traffic. The check
definition stays in the code location so the UI lists every SLO with its rule, and running it by
hand re-evaluates the stored scores of the selected windows.
"""

from collections.abc import Iterable, Iterator

import dagster as dg

from rollout_assets.analyze import load_scores
from rollout_assets.assets.common import WAREHOUSE_POOL, run_windows
from rollout_assets.partitions import partition_key, window_partitions
from rollout_assets.policy import BurnRateRule, Phase, Policy, SloRule
from rollout_assets.reporting import value_text
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.scoring import SloScore

SEED_SECTION = "seed §3"
SLO_SCORES_KEY = dg.AssetKey("slo_scores")


def check_name(phase: str, slo: str) -> str:
    return f"{phase.lower().replace('-', '')}_{slo}"


def describe(phase: Phase, rule: SloRule) -> str:
    return (
        f"{SEED_SECTION}, phase {phase.name} ({phase.title}): {rule.metric} {rule.comparator} "
        f"{rule.threshold:g} per 15-minute window, minimum sample {rule.min_sample}; "
        f"severity {rule.severity}; a failure {'requires' if rule.rollback else 'does not require'}"
        f" rollback{' (shadow: never breaches)' if rule.shadow else ''}."
    )


def describe_burn(phase: Phase, rule: BurnRateRule) -> str:
    return (
        f"Multi-window burn rate, phase {phase.name} ({phase.title}): {rule.metric} against a "
        f"{rule.objective:g} objective; fires when the budget burns {rule.factor:g}x over both "
        f"{rule.long_minutes} and {rule.short_minutes} minutes (minimum sample "
        f"{rule.min_sample}); severity {rule.severity}; "
        f"{'requires' if rule.rollback else 'does not require'} rollback."
    )


def _failure_is_an_error(s: SloScore) -> bool:
    """A failure is an ERROR when it pages (P1/P2) or requires a rollback; a failed rule of
    severity `warning` that requires neither (a slow burn, a shadow statistic) is a WARN."""
    return not s.shadow and (s.rollback or s.severity != "warning")


def slo_check_evaluations(scores: Iterable[SloScore], policy_version: str,
                          selected: set[str] | None = None) -> Iterator[dg.AssetCheckEvaluation]:
    for s in scores:
        name = check_name(s.phase, s.slo)
        if selected is not None and name not in selected:
            continue
        judged = s.passed is not None
        severity = (dg.AssetCheckSeverity.ERROR if judged and _failure_is_an_error(s)
                    else dg.AssetCheckSeverity.WARN)
        yield dg.AssetCheckEvaluation(
            asset_key=SLO_SCORES_KEY, check_name=name,
            passed=bool(s.passed) if judged else False, severity=severity,
            partition=partition_key(s.window_start),
            description=(f"{s.status}: {s.metric} = {value_text(s.value, s.threshold)}, "
                         f"required {s.comparator} {s.threshold:g} (sample {s.sample_size}, "
                         f"min {s.min_sample})"),
            metadata={
                "window_start": f"{s.window_start:%Y-%m-%d %H:%M} UTC", "phase": s.phase,
                "status": s.status, "value": s.value, "threshold": s.threshold,
                "comparator": s.comparator, "sample_size": s.sample_size,
                "min_sample": s.min_sample, "policy_version": policy_version,
            },
        )


def build_slo_checks(policy: Policy) -> list[dg.AssetChecksDefinition]:
    def spec(phase: Phase, rule: SloRule | BurnRateRule, description: str, metric: str):
        return dg.AssetCheckSpec(
            name=check_name(phase.name, rule.name), asset=SLO_SCORES_KEY,
            description=description, partitions_def=window_partitions,
            metadata={"phase": phase.name, "metric": metric, "threshold": rule.threshold,
                      "comparator": rule.comparator, "severity": rule.severity},
        )

    specs = [spec(p, r, describe(p, r), r.metric) for p, r in policy.all_slos()] + [
        spec(p, r, describe_burn(p, r), r.metric_label) for p, r in policy.all_burn_rules()]
    if not specs:
        return []

    @dg.multi_asset_check(
        specs=specs, can_subset=True, name="slo_threshold_checks",
        description="Re-evaluates every SLO of governance/policy.yaml from the stored scores of "
                    "the selected windows (slo_scores emits the same evaluations as it scores).",
        pool=WAREHOUSE_POOL,
    )
    def slo_threshold_checks(context, home: HomeResource, warehouse: DuckDBWarehouse):
        windows = run_windows(context)
        with warehouse.connect() as con:
            scores = load_scores(con, windows[0], windows[-1])
        yield from slo_check_evaluations(
            scores, home.policy().version, {k.name for k in context.selected_asset_check_keys})

    return [slo_threshold_checks]
