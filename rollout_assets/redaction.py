"""Secrets come only from the environment, and never leave it: not into a child process that does
not need them, not into a log, a report, metadata or an exception message.

`secret_env_names()` says which variables hold secrets (the contract's token variables, the
policy's PagerDuty routing-key variables, and anything named like a credential);
`scrubbed_env()` is the environment without them; `redact()` replaces their values in text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

# Contract variables (DESIGN.md "Notifications") plus anything that looks like a credential.
KNOWN_SECRET_ENV = ("SLACK_BOT_TOKEN", "PAGERDUTY_ROUTING_KEY_AUTOSAVE",
                    "PAGERDUTY_ROUTING_KEY_MERGE")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|ROUTING_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL",
                         re.IGNORECASE)
MIN_SECRET_LEN = 6  # shorter values ("1", "true") would redact ordinary words
REDACTED = "[redacted]"


def is_secret_name(name: str) -> bool:
    return name in KNOWN_SECRET_ENV or bool(SECRET_NAME.search(name))


def secret_env_names(env: Mapping[str, str] | None = None,
                     extra: Iterable[str] = ()) -> set[str]:
    env = os.environ if env is None else env
    return {k for k in env if is_secret_name(k)} | {k for k in extra if k in env}


def scrubbed_env(env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> dict:
    """A copy of the environment without any secret variable."""
    env = dict(os.environ if env is None else env)
    for name in secret_env_names(env, extra):
        env.pop(name, None)
    return env


def secret_values(env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> list[str]:
    env = os.environ if env is None else env
    values = {env[k] for k in secret_env_names(env, extra) if len(env[k]) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def redact(text: str, env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> str:
    """`text` with every secret value of the environment replaced by `[redacted]`."""
    for value in secret_values(env, extra):
        text = text.replace(value, REDACTED)
    return text
