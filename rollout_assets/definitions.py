"""Assembles the code location; computes nothing.

`defs` is built when Dagster loads the code location (`@dg.definitions`), not when this module is
imported: `rollout run` builds its own for the home it was given, and importing the module
costs no policy parse or check assembly."""

from __future__ import annotations

import dagster as dg

from rollout_assets.assets.governance import ga_gate_check
from rollout_assets.checks.etl_slots import build_etl_slot_checks, with_slot_freshness
from rollout_assets.checks.slo_checks import build_slo_checks
from rollout_assets.home import RolloutHome
from rollout_assets.jobs import DAILY_ASSETS, WINDOW_ASSETS, daily_job, rollback_job, window_job
from rollout_assets.policy import load_policy
from rollout_assets.progress import LOGGERS
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse
from rollout_assets.resources.home import HomeResource
from rollout_assets.resources.notifier import notifier_from_env
from rollout_assets.resources.rollback_runner import RollbackRunner
from rollout_assets.schedules import daily_schedule, window_schedule
from rollout_assets.sensors.breach_sensor import breach_sensor
from rollout_assets.sensors.canary_sensor import canary_late_data_sensor
from rollout_assets.sensors.sla_sensor import sla_refresh_sensor


def build_definitions(home: RolloutHome | None = None) -> dg.Definitions:
    home = home or RolloutHome.resolve()
    home.check_instance(claim=True)  # `dagster dev` over a DAGSTER_HOME another home uses
    policy = load_policy(home.policy_path)
    root = str(home.root)
    defs = dg.Definitions(
        assets=[*WINDOW_ASSETS, *DAILY_ASSETS],
        asset_checks=[*build_slo_checks(policy), *build_etl_slot_checks(policy), ga_gate_check],
        jobs=[window_job, daily_job, rollback_job],
        schedules=[window_schedule, daily_schedule],
        sensors=[breach_sensor, canary_late_data_sensor, sla_refresh_sensor],
        resources={
            "home": HomeResource(root=root),
            "warehouse": DuckDBWarehouse(path=str(home.db_path)),
            "notifier": notifier_from_env(root),  # Slack/PagerDuty from the environment
            "rollback_runner": RollbackRunner(home=root),
        },
        executor=dg.in_process_executor,
        loggers=LOGGERS,
    )
    return with_slot_freshness(defs, policy)


@dg.definitions
def defs() -> dg.Definitions:
    """The code location of the home `RolloutHome.resolve()` finds (`ROLLOUT_HOME`, else the
    repository root): what `dagster dev`, the webserver and the daemon load."""
    return build_definitions()
