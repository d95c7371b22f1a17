"""The flag store: the current phase and its flag values in DuckDB, with an append-only history.

`rollout flags rollback --phase P` (the seed's `flags:rollback`) moves the flags back to phase P;
`rollout flags promote --phase P` moves one phase forward. Flag values always come from the
policy's phase definition, never from the caller.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from rollout_assets.collect import atomic_write, now_utc
from rollout_assets.home import RolloutHome
from rollout_assets.policy import Policy
from rollout_assets.warehouse import transaction

PHASE_PATTERN = re.compile(r"^[A-Z]-[0-9]{1,3}$")


class FlagError(ValueError):
    """A flag change that the policy or the phase order does not allow."""


@dataclass(frozen=True)
class FlagState:
    phase: str
    flags: dict
    updated_at: datetime

    def describe(self) -> str:
        return f"{self.phase} (" + ", ".join(f"{k}={v}" for k, v in self.flags.items()) + ")"


def validate_phase(policy: Policy, phase: str) -> str:
    """Reject anything that is not exactly a phase of the policy (no paths, no shell text)."""
    if not isinstance(phase, str) or not PHASE_PATTERN.fullmatch(phase):
        raise FlagError(f"invalid phase {phase!r}: expected one of {', '.join(policy.phase_names)}")
    if phase not in policy.phase_names:
        raise FlagError(f"unknown phase {phase!r}: expected one of {', '.join(policy.phase_names)}")
    return phase


def _flags_for(policy: Policy, phase: str) -> dict:
    return dict(policy.phase(phase).flags)


def current_state(con, policy: Policy) -> FlagState:
    row = con.execute("select phase, flags, updated_at from flag_state").fetchone()
    if row is None:
        first = policy.phase_names[0]
        _write(con, policy, None, first, "init", "flag store initialised", "rollout")
        row = con.execute("select phase, flags, updated_at from flag_state").fetchone()
    return FlagState(row[0], json.loads(row[1]), row[2])


def read_state(con) -> FlagState | None:
    """Read-only view (no initialisation) for readers that open the file read-only."""
    try:
        row = con.execute("select phase, flags, updated_at from flag_state").fetchone()
    except Exception:  # the table does not exist yet in a fresh read-only file
        return None
    return FlagState(row[0], json.loads(row[1]), row[2]) if row else None


def _write(con, policy: Policy, from_phase: str | None, to_phase: str, action: str,
           reason: str | None, actor: str) -> None:
    flags = json.dumps(_flags_for(policy, to_phase))
    now = now_utc()
    # gates count judged windows after the newest window judged when the flags changed; the
    # store's first state is no change (NULL: it would depend on which windows ran before)
    effective = None if action == "init" else con.execute(
        "select max(window_start) from window_verdicts").fetchone()[0]
    with transaction(con):
        con.execute("insert or replace into flag_state values (true, ?, ?, ?)",
                    [to_phase, flags, now])
        con.execute(
            "insert into flag_history values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [now, action, from_phase, to_phase, flags, reason, actor, policy.version, effective],
        )


def nothing_to_roll_back(policy: Policy, before: FlagState, target: str) -> str | None:
    """Why a rollback to `target` changes nothing (the flags are at or behind it), else None:
    a rollback never moves the flags forward."""
    cur_i, tgt_i = policy.phase_index(before.phase), policy.phase_index(target)
    if tgt_i == cur_i:
        return f"flags already at {target}; nothing to roll back"
    if tgt_i > cur_i:
        # e.g. an A-2 breach handled after an earlier rollback to A-0: already safe
        return f"flags already behind {target} (at {before.phase}); nothing to roll back"
    return None


def rollback(con, policy: Policy, target: str, reason: str | None = None,
             actor: str = "rollout") -> tuple[FlagState, FlagState, str]:
    """Move the flags back to `target`. Returns (before, after, message). When the flags are
    already at or behind `target` nothing changes: a rollback never moves them forward."""
    validate_phase(policy, target)
    before = current_state(con, policy)
    nothing = nothing_to_roll_back(policy, before, target)
    if nothing:
        return before, before, nothing
    _write(con, policy, before.phase, target, "rollback", reason, actor)
    after = current_state(con, policy)
    return before, after, f"rolled back {before.describe()} -> {after.describe()}"


def promote(con, policy: Policy, target: str, reason: str | None = None,
            actor: str = "rollout", force: bool = False) -> tuple[FlagState, FlagState, str]:
    """Move the flags one phase forward, to `target`, when the promotion gate holds (no open
    incident, enough green windows since the last change, the GA gate for GA). `force` records
    an override with its reason instead of refusing."""
    from rollout_assets.governance import gate_span, promotion_gate

    validate_phase(policy, target)
    before = current_state(con, policy)
    expected = policy.next_phase(before.phase)
    if target != expected:
        raise FlagError(
            f"cannot promote to {target}: the flags are at {before.phase}; the next phase is "
            f"{expected or 'none (already at the last phase)'}"
        )
    gate = promotion_gate(con, policy, before.phase, target)
    if not gate.ok and not force:
        raise FlagError(f"cannot promote to {target}: " + "; ".join(gate.reasons))
    if not gate.ok and not reason:
        raise FlagError("a forced promotion needs --reason")
    action = "promote" if gate.ok else "promote_forced"
    _write(con, policy, before.phase, target, action, reason, actor)
    after = current_state(con, policy)
    msg = f"promoted {before.describe()} -> {after.describe()}"
    if not gate.ok:  # said, not only recorded: the gate did not hold
        msg += f" (forced past the gate: {'; '.join(gate.reasons)}; reason: {reason})"
    gate_day = gate.details.get("ga_gate_day")
    if gate_day is not None:
        msg += (f"; the GA gate held over the {gate_span(policy)} UTC days ending {gate_day}, "
                "the last day with data")
        age = (datetime.now(UTC).date() - gate_day).days
        if age > 1:
            msg += f" ({age} days ago: check that this evidence is current)"
    restarting = gate.details.get("restarting_from_the_canary")
    if restarting:
        msg += (f"; restarting from the canary: {', '.join(restarting)} stays open until "
                f"{target}'s windows are green again")
    return before, after, msg


def refuse_drill(policy: Policy) -> None:
    if policy.effective_mode() == "production":
        raise FlagError("dry-run rollbacks are drills and are refused in production mode "
                        "(policy mode or ROLLOUT_MODE=production)")


def write_rehearsal(home: RolloutHome, policy: Policy, before: FlagState, target: str,
                    when: datetime | None = None, reason: str | None = None,
                    actor: str | None = None) -> str:
    """A dry-run rollback drill: record what would change in docs/rehearsal/, change nothing.
    Drills are refused in production mode, as the simulator's are."""
    refuse_drill(policy)
    validate_phase(policy, target)
    when = when or now_utc()
    nothing = nothing_to_roll_back(policy, before, target)
    after_flags = before.flags if nothing else _flags_for(policy, target)
    lines = [
        f"# Rollback drill {when.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "",
        "Dry run (`dry_run=true`): no flag was changed. Seed §4: drills are never judged.",
        "",
        f"- Policy version: `{policy.version}` ({policy.version_label})",
        f"- Current phase: `{before.phase}`",
        f"- Rollback target: `{target}`",
        f"- The real rollback: {nothing or f'moves the flags {before.phase} -> {target}'}",
        f"- Actor: {actor or '-'}",
        f"- Reason: {reason or '-'}",
        "",
        "| flag | now | after rollback |",
        "| --- | --- | --- |",
    ]
    for k, v in before.flags.items():
        lines.append(f"| `{k}` | `{v}` | `{after_flags.get(k)}` |")
    path = _new_file(home, home.rehearsal_dir, when.strftime("%Y%m%dT%H%M%SZ"), ".md")
    atomic_write(path, "\n".join(lines) + "\n")
    return home.relative(path)


def _new_file(home: RolloutHome, directory, stem: str, suffix: str):
    """`<stem><suffix>` in `directory`, or `<stem>-2<suffix>`, ... if taken: two drills in the
    same second each keep their record. The name is claimed (created) before it is returned."""
    home.inside(directory).mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = home.inside(directory / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            n += 1
