"""Live mode: every 15 minutes (UTC) materialize the window that just closed."""

import dagster as dg

from rollout_assets.jobs import daily_job, window_job

window_schedule = dg.build_schedule_from_partitioned_job(
    window_job,
    name="every_15_minutes",
    description="Seed §6: Collector → Analyzer → Reporter for the window that just closed.",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)

daily_schedule = dg.build_schedule_from_partitioned_job(
    daily_job,
    name="daily_sla",
    description="SLA rows, daily summary and GA gate for the UTC day that just ended.",
    hour_of_day=0,
    minute_of_hour=20,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
