"""Analyzer logic: score one window's metrics against its phase's SLOs, then decide the verdict.

Plain functions over plain values, so every boundary is unit-tested without Dagster:
a value exactly at its threshold passes; a NULL value (empty denominator) is not a pass;
a sample below the rule's minimum is not judged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from rollout_assets.metrics_catalog import METRICS
from rollout_assets.policy import LEVEL_ORDER, BurnRateRule, Phase, Policy, SloRule

# slo_scores.status values
PASS, FAIL, INSUFFICIENT, NO_DATA = "pass", "fail", "insufficient_data", "no_data"


@dataclass(frozen=True)
class SloScore:
    window_start: datetime
    phase: str
    slo: str
    metric: str
    value: float | None
    comparator: str
    threshold: float
    sample_size: int
    min_sample: int
    passed: bool | None
    status: str
    severity: str
    rollback: bool
    shadow: bool
    baseline: float | None = None


@dataclass(frozen=True)
class Verdict:
    window_start: datetime
    phase: str
    status: str  # pass | breach | insufficient_data | not_judged
    breach: bool
    rollback_required: bool
    rollback_to: str | None
    level: str
    failed_slos: list[str] = field(default_factory=list)


def _num(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f  # a NaN is no value, as NULL is


def metric_value(rule: SloRule, metrics: Mapping,
                 baseline_crash_rate: float | None) -> float | None:
    if rule.metric == "crash_rate_delta":
        rate = _num(metrics.get("crash_rate"))
        if rate is None or baseline_crash_rate is None:
            return None
        # absolute delta in crash-rate points: 0.05 means five percentage points above baseline
        return rate - baseline_crash_rate
    return _num(metrics.get(rule.metric))


def judge(rule: SloRule | BurnRateRule, sample: int, value: float | None
          ) -> tuple[bool | None, str]:
    """(passed, status): not judged below the minimum sample or without a value."""
    if sample < rule.min_sample:
        return None, INSUFFICIENT
    if value is None:
        return None, NO_DATA
    passed = rule.passes(value)
    return passed, PASS if passed else FAIL


def score_rule(rule: SloRule, window_start: datetime, phase: str, metrics: Mapping,
               baseline_crash_rate: float | None = None) -> SloScore:
    sample = int(_num(metrics.get(METRICS[rule.metric].sample_column)) or 0)
    value = metric_value(rule, metrics, baseline_crash_rate)
    passed, status = judge(rule, sample, value)
    return SloScore(
        window_start=window_start, phase=phase, slo=rule.name, metric=rule.metric, value=value,
        comparator=rule.comparator, threshold=rule.threshold, sample_size=sample,
        min_sample=rule.min_sample, passed=passed, status=status, severity=rule.severity,
        rollback=rule.rollback, shadow=rule.shadow,
        baseline=baseline_crash_rate if rule.metric == "crash_rate_delta" else None,
    )


def score_window(phase: Phase, window_start: datetime, metrics: Mapping,
                 baseline_crash_rate: float | None = None) -> list[SloScore]:
    return [score_rule(r, window_start, phase.name, metrics, baseline_crash_rate)
            for r in phase.slos]


def burn_rate(windows: Sequence[tuple[int, float | None]], objective: float) -> float | None:
    """Error-budget burn over (count, success_rate) windows; None without samples."""
    total = sum(n for n, _ in windows)
    if total == 0:
        return None
    errors = sum(n * (1.0 - r) for n, r in windows if r is not None)
    return (errors / total) / (1.0 - objective)


def score_burn(rule: BurnRateRule, window_start: datetime, phase: str,
               history: Mapping[datetime, tuple[int, float | None]]) -> SloScore:
    """Score a multi-window burn-rate rule at `window_start` from per-window (count, rate) of the
    phase. The value is min(long burn, short burn): the alert fires only when both reach the
    factor, so a short spike alone and a long-gone burn alone stay quiet."""
    def span(minutes: int) -> list[tuple[int, float | None]]:
        n = minutes // 15
        return [history[w] for i in range(n)
                if (w := window_start - i * timedelta(minutes=15)) in history]
    long_w, short_w = span(rule.long_minutes), span(rule.short_minutes)
    sample = sum(n for n, _ in long_w)
    b_long, b_short = burn_rate(long_w, rule.objective), burn_rate(short_w, rule.objective)
    value = None if b_long is None or b_short is None else min(b_long, b_short)
    passed, status = judge(rule, sample, value)
    return SloScore(
        window_start=window_start, phase=phase, slo=rule.name, metric=rule.metric_label,
        value=value, comparator=rule.comparator, threshold=rule.factor, sample_size=sample,
        min_sample=rule.min_sample, passed=passed, status=status, severity=rule.severity,
        rollback=rule.rollback, shadow=rule.shadow,
    )


def max_level(levels: Sequence[str]) -> str:
    return max(levels, key=LEVEL_ORDER.index, default="ok")


def decide(policy: Policy, phase: Phase, window_start: datetime,
           scores: Sequence[SloScore]) -> Verdict:
    """Breach = a non-shadow SLO failed. Rollback goes one phase back in policy order."""
    failed = [s for s in scores if s.passed is False and not s.shadow]
    breach = bool(failed)
    previous = policy.previous_phase(phase.name)
    rollback_required = (
        breach and phase.rollback_allowed and previous is not None
        and any(s.rollback for s in failed)
    )
    if not phase.slos:
        status = "not_judged"
    elif breach:
        status = "breach"
    elif all(s.passed is None for s in scores if not s.shadow):
        status = "insufficient_data"
    else:
        status = "pass"
    return Verdict(
        window_start=window_start, phase=phase.name, status=status, breach=breach,
        rollback_required=rollback_required,
        rollback_to=previous if rollback_required else None,
        level=max_level([s.severity for s in failed]),
        failed_slos=[s.slo for s in failed],
    )
