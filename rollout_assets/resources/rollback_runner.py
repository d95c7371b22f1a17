"""Runs the rollback command: an argv list (never a shell), a timeout, captured output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import dagster as dg

from rollout_assets.flags import validate_phase
from rollout_assets.policy import Policy

TIMEOUT_EXIT_CODE = 124  # what coreutils `timeout` returns


@dataclass(frozen=True)
class RollbackOutcome:
    argv: list[str]
    exit_code: int
    output: str
    timed_out: bool
    seconds: float

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


class RollbackRunner(dg.ConfigurableResource):
    """Builds the rollback argv from the policy's template and runs it."""

    home: str

    def argv(self, policy: Policy, target_phase: str) -> list[str]:
        validate_phase(policy, target_phase)
        subs = {"{python}": sys.executable, "{home}": self.home, "{phase}": target_phase}
        out = []
        for arg in policy.rollback.command:
            for k, v in subs.items():
                arg = arg.replace(k, v)
            out.append(arg)
        return out

    def run(self, policy: Policy, target_phase: str, extra_env: dict | None = None) -> RollbackOutcome:
        argv = self.argv(policy, target_phase)
        env = {**os.environ, "ROLLOUT_HOME": self.home, **(extra_env or {})}
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=policy.rollback.timeout_seconds,
                env=env, shell=False, check=False, stdin=subprocess.DEVNULL,
            )
            output = (proc.stdout or "") + (proc.stderr or "")
            return RollbackOutcome(argv, proc.returncode, output, False,
                                   time.monotonic() - started)
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or b""
            if isinstance(partial, bytes):
                partial = partial.decode("utf-8", "replace")
            msg = f"{partial}\nrollback timed out after {policy.rollback.timeout_seconds:g}s; killed"
            return RollbackOutcome(argv, TIMEOUT_EXIT_CODE, msg, True, time.monotonic() - started)
        except OSError as exc:
            return RollbackOutcome(argv, 127, f"could not start rollback: {exc}", False,
                                   time.monotonic() - started)
