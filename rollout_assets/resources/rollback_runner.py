"""Runs the rollback command: an argv list (never a shell), a timeout, captured output.

- The target phase is validated against the policy before anything is built: `A-1; rm -rf /`,
  `../../x` or `A-1\\n` never reach a process.
- The command runs in its own process group; at the timeout the whole group is killed, so a
  script's children cannot outlive it (or keep its output pipe open and hang the run).
- The child gets the environment without secrets (no Slack token or PagerDuty key: rolling back
  flags needs neither), and its output is redacted before it is logged or stored anywhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import dagster as dg

from rollout_assets.flags import validate_phase
from rollout_assets.policy import Policy
from rollout_assets.redaction import redact, scrubbed_env
from rollout_assets.warehouse import READERS_COPY_BY_CALLER_ENV

TIMEOUT_EXIT_CODE = 124  # what coreutils `timeout` returns
NOT_STARTED_EXIT_CODE = 127  # what a shell returns for a command it cannot run
MAX_OUTPUT_CHARS = 256 * 1024  # keep the tail of a very chatty command
KILL_GRACE_SECONDS = 5.0


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


def _secret_vars(policy: Policy) -> list[str]:
    return [s.routing_key_env for s in policy.pagerduty_services.values()]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


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

    def run(self, policy: Policy, target_phase: str,
            extra_env: dict | None = None) -> RollbackOutcome:
        argv = self.argv(policy, target_phase)
        secrets = _secret_vars(policy)
        env = {**scrubbed_env(extra=secrets), "ROLLOUT_HOME": self.home,
               READERS_COPY_BY_CALLER_ENV: "1",  # the rollback job writes it once, after
               **(extra_env or {})}
        timeout = policy.rollback.timeout_seconds
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, shell=False, start_new_session=True,
            )
        except OSError as exc:
            return RollbackOutcome(argv, NOT_STARTED_EXIT_CODE,
                                   redact(f"could not start rollback: {exc}", extra=secrets),
                                   False, time.monotonic() - started)
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:  # a child escaped the group and holds the pipe
                proc.kill()
                out = b""
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            if proc.poll() is None:
                proc.wait()
        output = (out or b"").decode("utf-8", "replace")[-MAX_OUTPUT_CHARS:]
        if timed_out:
            output += f"\nrollback timed out after {timeout:g}s; killed"
        return RollbackOutcome(
            argv, TIMEOUT_EXIT_CODE if timed_out else proc.returncode,
            redact(output, extra=secrets), timed_out, time.monotonic() - started)
