"""Progress for people at a terminal: a Dagster logger that prints one line per finished step.

`rollout run` and `rollout demo` select it instead of the console logger, so a long range shows
what is done (Collector → Analyzer → Reporter) without Dagster's debug stream.
"""

import logging
import sys

import dagster as dg

STAGES = {
    "canary_events": "collector", "window_metrics": "collector", "slo_scores": "analyzer",
    "window_verdicts": "analyzer", "incidents": "governance", "alert_reports": "reporter",
    "sla_daily": "governance", "dashboard": "reporter", "execute_rollback": "rollback",
}


class ProgressHandler(logging.Handler):
    def __init__(self, stream=None):
        super().__init__(level=logging.DEBUG)
        self.stream = stream or sys.stdout

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        step = meta.get("step_key") or ""
        if event is None:
            if record.levelno >= logging.INFO and step:
                text = record.getMessage().rsplit(" - ", 1)[-1]
                self.stream.write(f"      {step}: {text}\n")
                self.stream.flush()
            return
        kind = event.event_type_value
        if kind == "STEP_SUCCESS":
            ms = getattr(event.event_specific_data, "duration_ms", None)
            took = f" ({ms / 1000:.1f}s)" if ms is not None else ""
            self.stream.write(f"  done  [{STAGES.get(step, 'step')}] {step}{took}\n")
        elif kind == "STEP_FAILURE":
            self.stream.write(f"  FAIL  [{STAGES.get(step, 'step')}] {step}\n")
        else:
            return
        self.stream.flush()


@dg.logger(description="One line per finished step, for the rollout CLI.")
def progress_logger(init_context) -> logging.Logger:
    log = logging.Logger("rollout.progress", level=logging.DEBUG)
    log.addHandler(ProgressHandler())
    return log


LOGGERS = {"console": dg.colored_console_logger, "progress": progress_logger}
PROGRESS_RUN_CONFIG = {"loggers": {"progress": {}}}
