"""Deterministic canary traffic: `rollout simulate` writes `reports/canary/phase-<P>.jsonl`.

Vectorized with NumPy: log-normal AutoSave latencies, per-kind success probabilities, seed §4
observed-only traffic (tenant=standard in A-1, staging, observed_only, dry_run), a few duplicate
and malformed lines. `--simulate-breach METRIC` degrades that metric for one hour in the middle
of the first phase whose SLOs judge it (or `breach_phase`); `--simulate-latency MS` adds MS to
every AutoSave latency. Both are drills: refused in production mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from rollout_assets.home import RolloutHome
from rollout_assets.partitions import WINDOW, floor_window
from rollout_assets.policy import Policy

KIND_P = {"autosave": 0.40, "restore": 0.15, "merge": 0.15, "session": 0.2944, "crash": 0.0056}
HEALTHY = {"autosave_ok": 0.999, "restore_ok": 0.99999, "merge_ok": 0.95, "conflict": 0.05}
LATENCY_MEDIAN_MS, LATENCY_SIGMA = 600.0, 0.5
DEGRADED = {
    "autosave_p95_ms": {"latency_factor": 3.0},
    "autosave_error_count": {"autosave_ok": 0.80},
    "restore_success_rate": {"restore_ok": 0.90},
    "merge_auto_success_rate": {"merge_ok": 0.60},
    "merge_conflict_rate": {"conflict": 0.50},
    "crash_rate": {"crash_factor": 8.0},
    "crash_rate_delta": {"crash_factor": 8.0},
}
TENANTS = {"A-0": ("qa", 0.0), "A-1": ("qa", 0.2), "A-2": ("beta", 0.3)}  # cohort, standard share


class DrillRefused(RuntimeError):
    """A drill option was used in production mode."""


@dataclass
class SimulationResult:
    files: dict[str, int] = field(default_factory=dict)  # relative path -> lines written
    events: int = 0
    duplicates: int = 0
    malformed: int = 0
    breach: dict | None = None


def phase_schedule(policy: Policy, start: datetime, hours: float,
                   only_phase: str | None = None) -> list[tuple[str, datetime, datetime]]:
    """Split the span into contiguous, window-aligned segments, one per phase in policy order."""
    start = floor_window(start)
    n = max(1, int(round(hours * 60 / 15)))
    if only_phase:
        return [(only_phase, start, start + n * WINDOW)]
    names = list(policy.phase_names)
    per = max(1, n // len(names))
    out, w = [], 0
    for i, name in enumerate(names):
        count = n - w if i == len(names) - 1 else min(per, n - w)
        if count <= 0:
            break
        out.append((name, start + w * WINDOW, start + (w + count) * WINDOW))
        w += count
    return out


def breach_span(policy: Policy, schedule, metric: str,
                breach_phase: str | None) -> tuple[str, datetime, datetime]:
    judged_by = [p.name for p, r in policy.all_slos() if r.metric == metric]
    candidates = [s for s in schedule if s[0] == breach_phase] if breach_phase else [
        s for s in schedule if s[0] in judged_by]
    if not candidates:
        raise ValueError(
            f"no simulated phase judges {metric!r}" if not breach_phase
            else f"phase {breach_phase!r} is not in the simulated span")
    phase, s, e = candidates[0]
    windows = int((e - s) / WINDOW)
    mid = s + (windows // 2 - min(2, windows // 2)) * WINDOW
    return phase, mid, min(e, mid + 4 * WINDOW)


def _iso(ts_ms: np.ndarray, offset_mask: np.ndarray) -> list[str]:
    """ISO-8601 strings; a share of events carries a +09:00 offset for the same instant."""
    base = ts_ms.astype("datetime64[ms]")
    utc = np.datetime_as_string(base, unit="ms")
    jst = np.datetime_as_string(base + np.timedelta64(9, "h"), unit="ms")
    return [j + "+09:00" if m else u + "Z" for u, j, m in zip(utc, jst, offset_mask, strict=True)]


def plan(policy: Policy, start: datetime, hours: float, breach_metric: str | None = None,
         breach_phase: str | None = None, latency_ms: float = 0.0,
         only_phase: str | None = None) -> tuple[list, tuple | None]:
    """(phase schedule, breach span) of a simulation, refused as `simulate` would refuse it
    (a drill in production mode, an unknown metric or phase) before anything is written."""
    if policy.effective_mode() == "production":
        # made-up traffic in a production home's canary files is judged as real: with no
        # breach injected it still dilutes one (found by an independent audit)
        raise DrillRefused(
            "--simulate-breach / --simulate-latency are drills and are refused in production mode "
            "(policy mode or ROLLOUT_MODE=production)" if breach_metric or latency_ms else
            "rollout simulate writes made-up canary traffic, which runs judge as real: refused "
            "in production mode (policy mode or ROLLOUT_MODE=production)")
    if breach_metric and breach_metric not in DEGRADED:
        raise ValueError(f"unknown metric {breach_metric!r}; choose from {', '.join(DEGRADED)}")
    schedule = phase_schedule(policy, start, hours, only_phase)
    span = breach_span(policy, schedule, breach_metric, breach_phase) if breach_metric else None
    return schedule, span


def simulate(home: RolloutHome, policy: Policy, start: datetime, hours: float, rate: float = 60.0,
             seed: int = 7, breach_metric: str | None = None, breach_phase: str | None = None,
             latency_ms: float = 0.0, only_phase: str | None = None, noise: bool = True,
             progress=None) -> SimulationResult:
    """Append simulated traffic; `progress(phase, start, end, events)` is called per phase."""
    schedule, span = plan(policy, start, hours, breach_metric, breach_phase, latency_ms,
                          only_phase)
    rng = np.random.default_rng(seed)
    result = SimulationResult()
    if span:
        result.breach = {"metric": breach_metric, "phase": span[0],
                         "from": f"{span[1]:%Y-%m-%dT%H:%MZ}", "to": f"{span[2]:%Y-%m-%dT%H:%MZ}"}
    kinds = np.array(list(KIND_P))
    kind_p = np.array(list(KIND_P.values()))
    kind_p = kind_p / kind_p.sum()
    home.canary_dir.mkdir(parents=True, exist_ok=True)
    for phase, s, e in schedule:
        minutes = (e - s).total_seconds() / 60
        n = int(rng.poisson(rate * minutes))
        t0 = int(s.timestamp() * 1000) if s.tzinfo else int(
            (s - datetime(1970, 1, 1)).total_seconds() * 1000)
        ts = np.sort(rng.integers(t0, t0 + int(minutes * 60_000), size=n))
        kind = rng.choice(kinds, size=n, p=kind_p)
        p_auto = np.full(n, HEALTHY["autosave_ok"])
        p_restore = np.full(n, HEALTHY["restore_ok"])
        p_merge = np.full(n, HEALTHY["merge_ok"])
        p_conflict = np.full(n, HEALTHY["conflict"])
        lat_factor = np.ones(n)
        if span and span[0] == phase:
            b0 = (span[1] - datetime(1970, 1, 1)).total_seconds() * 1000
            b1 = (span[2] - datetime(1970, 1, 1)).total_seconds() * 1000
            inside = (ts >= b0) & (ts < b1)
            d = DEGRADED[breach_metric]
            p_auto[inside] = d.get("autosave_ok", HEALTHY["autosave_ok"])
            p_restore[inside] = d.get("restore_ok", HEALTHY["restore_ok"])
            p_merge[inside] = d.get("merge_ok", HEALTHY["merge_ok"])
            p_conflict[inside] = d.get("conflict", HEALTHY["conflict"])
            lat_factor[inside] = d.get("latency_factor", 1.0)
            if "crash_factor" in d:
                # turn some sessions into crashes inside the span
                flip = inside & (kind == "session") & (
                    rng.random(n) < KIND_P["crash"] * (d["crash_factor"] - 1) / KIND_P["session"])
                kind[flip] = "crash"
        u = rng.random(n)
        ok = np.where(kind == "autosave", u < p_auto,
                      np.where(kind == "restore", u < p_restore, u < p_merge))
        conflict = rng.random(n) < p_conflict
        latency = np.round(rng.lognormal(np.log(LATENCY_MEDIAN_MS), LATENCY_SIGMA, n)
                           * lat_factor + latency_ms, 1)
        cohort, standard_share = TENANTS.get(phase, ("standard", 1.0))
        tenant = np.where(rng.random(n) < standard_share, "standard", cohort)
        staging = rng.random(n) < (0.03 if noise else 0)
        observed = rng.random(n) < (0.02 if noise else 0)
        dry = rng.random(n) < (0.005 if noise else 0)
        jst = rng.random(n) < 0.05
        iso = _iso(ts, jst)
        lines = []
        for i in range(n):
            k = kind[i]
            ev = {"event_id": f"{seed:x}-{phase}-{t0:x}-{i:07d}", "ts": iso[i], "phase": phase,
                  "kind": str(k), "session_id": f"s-{int(rng.integers(1, 5000))}",
                  "tenant": str(tenant[i]),
                  "environment": "staging" if staging[i] else "production",
                  "tags": {"observed_only": bool(observed[i]), "dry_run": bool(dry[i])}}
            if k == "autosave":
                ev["latency_ms"] = float(latency[i])
            if k in ("autosave", "restore", "merge"):
                ev["ok"] = bool(ok[i])
            if k == "merge":
                ev["conflict"] = bool(conflict[i])
            lines.append(json.dumps(ev, separators=(",", ":")))
        if noise and n:
            for j in rng.choice(n, size=max(1, n // 300), replace=False):
                lines.append(lines[int(j)])  # a retried delivery: same event_id, counted once
                result.duplicates += 1
            junk = ['{"event_id": "broken", "ts": ', "not json at all",
                    json.dumps({"event_id": "x-tz", "ts": "2025-01-18T09:00:00", "phase": phase,
                                "kind": "session"}),
                    json.dumps({"event_id": "x-phase", "ts": iso[0], "phase": "Z-9",
                                "kind": "session"})]
            for j in range(max(1, n // 1000)):
                lines.insert(int(rng.integers(0, len(lines))), junk[j % len(junk)])
                result.malformed += 1
        path = home.canary_dir / f"phase-{phase}.jsonl"
        with open(home.inside(path), "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        rel = home.relative(path)
        result.files[rel] = result.files.get(rel, 0) + len(lines)
        result.events += n
        if progress is not None:
            progress(phase, s, e, n)
    return result
