"""Live mode: every 15 minutes (UTC) materialize the window that just closed."""

import dagster as dg

from rollout_assets.jobs import window_job

window_schedule = dg.build_schedule_from_partitioned_job(
    window_job,
    name="every_15_minutes",
    description="Seed §6: Collector → Analyzer → Reporter for the window that just closed.",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
