"""The governance policy: `governance/policy.yaml` parsed into validated pydantic models.

The policy is the single source of phases, flag values, SLO thresholds, exclusions, channels and
services. An invalid policy fails at load time with the field path and the reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Hashable
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rollout_assets.metrics_catalog import METRICS
from rollout_assets.partitions import WINDOW

Comparator = Literal["<=", "<", ">=", ">"]
Severity = Literal["warning", "P2", "P1"]
LEVEL_ORDER: tuple[str, ...] = ("ok", "warning", "P2", "P1")
EXCLUSION_FIELDS = ("tags.dry_run", "tags.observed_only", "environment", "tenant")


class PolicyError(ValueError):
    """Raised when governance/policy.yaml cannot be used; the message names the field."""


class _Model(BaseModel):
    # strict: YAML's own types only. `threshold: "2500"`, `min_sample: "10"`, `rollback: "yes"`
    # or `threshold: true` (1.0) are refused, not converted; an int is still a valid float
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SloRule(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    metric: str
    comparator: Comparator
    # NaN would fail every comparison (a rollback storm); inf would pass every one
    threshold: float = Field(allow_inf_nan=False)
    min_sample: int = Field(ge=1)
    severity: Severity
    rollback: bool
    shadow: bool = False
    description: str | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(sorted(METRICS))}")
        return v

    @model_validator(mode="after")
    def _threshold_in_range(self) -> SloRule:
        lo, hi = METRICS[self.metric].bounds
        if not lo <= self.threshold <= hi:
            raise ValueError(f"threshold {self.threshold:g} is outside {self.metric}'s range "
                             f"[{lo:g}, {hi:g}] (a rate is a fraction: 0.995, not 99.5)")
        return self

    def passes(self, value: float) -> bool:
        """Compare with a tolerance of float rounding only (1e-12 relative, ~4,500 ulps at
        1.0), so a value computed exactly at the threshold passes: `0.07 - 0.02` is
        0.05000000000000001. A value truly past it fails, however close: 2500.000002 ms
        fails `<= 2500` (1e-9, the tolerance before, let it pass)."""
        tol = 1e-12 * max(1.0, abs(self.threshold))
        if self.comparator == "<=":
            return value <= self.threshold + tol
        if self.comparator == "<":
            return value < self.threshold - tol
        if self.comparator == ">=":
            return value >= self.threshold - tol
        return value > self.threshold + tol

    @property
    def rule_text(self) -> str:
        return f"{self.metric} {self.comparator} {self.threshold:g}"


BURN_RATE_METRICS = ("restore_success_rate", "merge_auto_success_rate")


class BurnRateRule(_Model):
    """Multi-window error-budget burn (Google SRE workbook): fires when the burn rate over both
    the long and the short window reaches `factor`. Burn = error rate / (1 - objective)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    metric: Literal["restore_success_rate", "merge_auto_success_rate"]
    objective: float = Field(gt=0, lt=1)
    long_minutes: int = Field(ge=15, le=24 * 60)
    short_minutes: int = Field(ge=15, le=24 * 60)
    factor: float = Field(gt=0)
    min_sample: int = Field(ge=1)
    severity: Severity
    rollback: bool = False
    shadow: bool = False

    @model_validator(mode="after")
    def _windows(self) -> BurnRateRule:
        if self.long_minutes % 15 or self.short_minutes % 15:
            raise ValueError("long_minutes and short_minutes must be multiples of 15")
        if self.short_minutes > self.long_minutes:
            raise ValueError("short_minutes must not exceed long_minutes")
        return self

    # the same shape as an SloRule where scores, checks and verdicts need it
    comparator: Literal["<"] = "<"

    @property
    def threshold(self) -> float:
        return self.factor

    @property
    def metric_label(self) -> str:
        return f"{self.metric}:burn_{self.long_minutes}m_{self.short_minutes}m"

    def passes(self, value: float) -> bool:
        return value < self.factor


class GaGate(_Model):
    consecutive_days: int = Field(ge=1)
    max_major_incidents: int = Field(ge=0)


class Phase(_Model):
    name: str = Field(pattern=r"^[A-Z]-[0-9]+$")
    title: str
    flags: dict[str, bool | str]
    slack_channel: str = Field(pattern=r"^#[a-z0-9_-]+$")
    pagerduty_service: str
    rollback_allowed: bool
    gate: GaGate | None = None
    slos: tuple[SloRule, ...] = ()
    burn_rate_alerts: tuple[BurnRateRule, ...] = ()

    @property
    def judged_against_baseline(self) -> bool:
        """Whether this phase's verdicts read the crash baseline (the baseline phase's events
        over `baseline.lookback_hours` before the window)."""
        return any(r.metric == "crash_rate_delta" for r in self.slos)

    @model_validator(mode="after")
    def _unique_slos(self) -> Phase:
        names = [s.name for s in self.slos] + [b.name for b in self.burn_rate_alerts]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate SLO names {sorted(dupes)}")
        return self


class Exclusion(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    field: Literal["tags.dry_run", "tags.observed_only", "environment", "tenant"]
    equals: bool | str
    phases: Literal["all"] | tuple[str, ...]

    @model_validator(mode="after")
    def _typed_value(self) -> Exclusion:
        # tags are booleans, environment/tenant strings: a mismatch would fail in SQL at run time
        want = bool if self.field.startswith("tags.") else str
        if not isinstance(self.equals, want):
            raise ValueError(
                f"equals: {self.field} compares with a {want.__name__}, got {self.equals!r}")
        return self

    def applies_to(self, phase: str) -> bool:
        return self.phases == "all" or phase in self.phases


class PagerDutyService(_Model):
    name: str
    routing_key_env: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")


RunbookStep = Literal["rollback", "rca", "close"]


class Notifications(_Model):
    incident_channel: str = Field(pattern=r"^#[a-z0-9_-]+$")
    page_levels: tuple[Severity, ...]
    incident_channel_levels: tuple[Severity, ...]
    # the incident runbook's steps (seed §8) also reported in `incident_channel`, whatever the
    # level: the rollback's result, the RCA draft with its owner and due date, the closing notice
    incident_channel_steps: tuple[RunbookStep, ...] = ()


class Baseline(_Model):
    phase: str
    lookback_hours: int = Field(ge=1)
    min_sessions: int = Field(ge=1)
    pinned_crash_rate: float = Field(gt=0, lt=1)
    # canary-vs-baseline statistics compare the judged canary with the events this exclusion
    # keeps out of judgement in the same window and phase (the non-canary tenants)
    cohort_exclusion: str | None = None


class RollbackCommand(_Model):
    command: tuple[str, ...] = Field(min_length=1)
    timeout_seconds: float = Field(gt=0, le=3600)
    # no promotion into a phase until a window this many minutes after its last rollback's is
    # judged
    cooldown_minutes: int = Field(default=0, ge=0)
    # a rollback run that failed (the command failed or timed out, its process died) is
    # launched again by the breach sensor this many times, this long after the last attempt
    retries: int = Field(default=3, ge=0, le=20)
    retry_after_minutes: float = Field(default=5.0, ge=0, le=24 * 60)

    @field_validator("command")
    @classmethod
    def _has_phase(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not any("{phase}" in a for a in v):
            raise ValueError("the rollback command must pass the target phase as {phase}")
        return v


class EtlSlots(_Model):
    collector: int = Field(ge=1, le=15)
    analyzer: int = Field(ge=1, le=15)
    reporter: int = Field(ge=1, le=15)

    @model_validator(mode="after")
    def _ordered(self) -> EtlSlots:
        if not self.collector <= self.analyzer <= self.reporter:
            raise ValueError("slots must be ordered collector <= analyzer <= reporter")
        return self


class Incidents(_Model):
    close_after_green_cycles: int = Field(ge=1)
    escalation_deadline_minutes: int = Field(ge=1)
    rca_business_days: int = Field(ge=0)
    oncall: dict[str, tuple[str, ...]]


class Promotion(_Model):
    min_green_windows: int = Field(ge=0)


class Retention(_Model):
    # days of canary events kept, counted back from the day of the newest stored window; None
    # keeps every event (see rollout_assets/retention.py)
    canary_events_days: int | None = Field(default=None, ge=1)


class Policy(_Model):
    version_label: str
    document_id: str
    mode: Literal["production", "rehearsal"]
    window_minutes: Literal[15]
    etl_slots: EtlSlots
    flags: dict[str, str]
    pagerduty_services: dict[str, PagerDutyService]
    notifications: Notifications
    incidents: Incidents
    promotion: Promotion
    baseline: Baseline
    rollback: RollbackCommand
    exclusions: tuple[Exclusion, ...]
    phases: tuple[Phase, ...] = Field(min_length=1)
    retention: Retention = Retention()
    # content hash and text of the YAML this policy was parsed from (set by parse_policy)
    content_hash: str = ""
    source_text: str = Field(default="", repr=False)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: duplicate phase names in {names}")
        flag_names = set(self.flags.values())
        for p in self.phases:
            if set(p.flags) != flag_names:
                raise ValueError(
                    f"phases.{p.name}.flags: must set exactly {sorted(flag_names)}, "
                    f"got {sorted(p.flags)}"
                )
            if p.pagerduty_service not in self.pagerduty_services:
                raise ValueError(
                    f"phases.{p.name}.pagerduty_service: {p.pagerduty_service!r} is not one of "
                    f"{sorted(self.pagerduty_services)}"
                )
        for ex in self.exclusions:
            if ex.phases != "all":
                unknown = set(ex.phases) - set(names)
                if unknown:
                    raise ValueError(
                        f"exclusions.{ex.name}.phases: unknown phases {sorted(unknown)}")
        missing_oncall = set(self.pagerduty_services) - set(self.incidents.oncall)
        if missing_oncall:
            raise ValueError(f"incidents.oncall: no on-call list for {sorted(missing_oncall)}")
        if self.baseline.cohort_exclusion and self.baseline.cohort_exclusion not in {
                ex.name for ex in self.exclusions}:
            raise ValueError(f"baseline.cohort_exclusion: no exclusion named "
                             f"{self.baseline.cohort_exclusion!r}")
        if self.baseline.phase not in names:
            raise ValueError(f"baseline.phase: unknown phase {self.baseline.phase!r}")
        days = self.retention.canary_events_days
        if days is not None and days * 24 * 60 < self.event_history_minutes + 24 * 60:
            raise ValueError(
                f"retention.canary_events_days: {days} day(s) cannot keep the "
                f"{self.event_history_minutes / 60:g} h of events a verdict reads (the crash "
                "baseline's lookback_hours, the longest burn-rate long_minutes) and one day of "
                "windows that can be re-run")
        return self

    @property
    def event_history_minutes(self) -> int:
        """How far before a window its verdict reads the stored events: the crash baseline's
        lookback or the longest burn-rate window."""
        return max([self.baseline.lookback_hours * 60]
                   + [b.long_minutes for _, b in self.all_burn_rules()])

    def read_later(self, phase: str) -> timedelta:
        """How far after a window the verdicts of later windows read the events of `phase`
        stored in it: windows `(w, w + this]` are judged against them too. The crash
        baseline's lookback when `phase` is the baseline phase and some phase is judged
        against it; the longest of the phase's own burn-rate windows, which end with the
        window judged (`long_minutes` less one window). Zero when no later verdict reads them."""
        reach = [timedelta(minutes=b.long_minutes) - WINDOW
                 for p in self.phases if p.name == phase for b in p.burn_rate_alerts]
        if phase == self.baseline.phase and any(p.judged_against_baseline
                                                for p in self.phases):
            reach.append(timedelta(hours=self.baseline.lookback_hours))
        return max(reach, default=timedelta(0))

    # ---- lookups -------------------------------------------------------------------------
    @cached_property
    def phase_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases)

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"unknown phase {name!r}; the policy knows {', '.join(self.phase_names)}")

    def previous_phase(self, name: str) -> str | None:
        i = self.phase_names.index(name)
        return self.phase_names[i - 1] if i > 0 else None

    def next_phase(self, name: str) -> str | None:
        i = self.phase_names.index(name)
        return self.phase_names[i + 1] if i + 1 < len(self.phase_names) else None

    def phase_index(self, name: str) -> int:
        return self.phase_names.index(name)

    @property
    def version(self) -> str:
        """Short content hash identifying the thresholds in force."""
        return self.content_hash[:12]

    def effective_mode(self) -> str:
        """The policy's mode; `ROLLOUT_MODE=production` makes a rehearsal policy production
        (e.g. on the production host), but nothing makes a production policy a rehearsal: the
        drills it refuses could otherwise be let in by one variable (found by an audit)."""
        env = os.environ.get("ROLLOUT_MODE")
        if env and env not in ("production", "rehearsal"):
            raise PolicyError(f"ROLLOUT_MODE must be production or rehearsal, got {env!r}")
        return "production" if "production" in (env, self.mode) else self.mode

    def all_slos(self) -> list[tuple[Phase, SloRule]]:
        return [(p, s) for p in self.phases for s in p.slos]

    def all_burn_rules(self) -> list[tuple[Phase, BurnRateRule]]:
        return [(p, b) for p in self.phases for b in p.burn_rate_alerts]


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc or '<root>'}: {e['msg']}")
    return "; ".join(parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML would silently keep the
    last one, so a reviewer could read one threshold while another one is in force."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # explicit scalar keys only: a key overriding one merged in with `<<:` is fine
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line: where (line, column) and what, so the CLI can print it as its reason."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {_yaml_error(exc)}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the policy must be a mapping")
    raw = _tuples(raw)  # YAML lists are the models' tuples (strict mode takes no list for one)
    raw["content_hash"] = hashlib.sha256(text.encode()).hexdigest()
    raw["source_text"] = text
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"{source}: invalid policy: {_format_errors(exc)}") from None


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def load_policy(path: Path) -> Policy:
    """The policy in `path`, parsed again only when its text changes (every asset and every
    breached window asks for it; an edit applies to the next call, no reload needed)."""
    if not path.is_file():
        raise PolicyError(f"policy file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot be read ({exc.strerror})") from None
    return _parse_cached(text, str(path))


@functools.lru_cache(maxsize=8)
def _parse_cached(text: str, source: str) -> Policy:
    return parse_policy(text, source)
