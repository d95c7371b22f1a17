"""The rollout home and its governance policy as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from rollout_assets.home import RolloutHome
from rollout_assets.policy import Policy, load_policy


class HomeResource(dg.ConfigurableResource):
    """Where everything lives (`--home`, `ROLLOUT_HOME`, or the working directory)."""

    root: str

    @property
    def home(self) -> RolloutHome:
        return RolloutHome(Path(self.root).resolve())

    def policy(self) -> Policy:
        """Loaded per call so a policy edit applies to the next run without a reload."""
        return load_policy(self.home.policy_path)
