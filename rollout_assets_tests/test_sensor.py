"""Breach sensor on a real on-disk instance: run key `<window>:<phase>`, a cursor that advances
and pages, no request twice for the same verdict, and `runner.tick_breach_sensor` never launching
a second rollback for the same key."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
import pytest
import yaml
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

import rollout_assets.sensors.breach_sensor as breach_module
from rollout_assets.definitions import build_definitions
from rollout_assets.home import PROJECT_ROOT
from rollout_assets.partitions import partition_key
from rollout_assets.runner import CURSOR_KEY, prepare_instance, tick_breach_sensor
from rollout_assets.sensors.breach_sensor import breach_sensor
from rollout_assets_tests.conftest import DAY
from rollout_assets_tests.pipeline_helpers import persistent_home, query
from rollout_assets_tests.reliability_helpers import promote_to

W0900, W0915, W0930 = (DAY.replace(hour=9, minute=m) for m in (0, 15, 30))


def required(phase: str, to: str, level: str = "P2", failed=("restore_success",)) -> dict:
    return {"phase": phase, "rollback_to": to, "level": level, "failed_slos": list(failed)}


def verdicts_materialized(instance, ws, rollbacks: list[dict]) -> None:
    """What a window_verdicts materialization of window `ws` records in the event log."""
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="window_verdicts", partition=partition_key(ws),
        metadata={"breaches": len(rollbacks),
                  "rollbacks_required": dg.MetadataValue.json(rollbacks)}))


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    with persistent_home(tmp_path_factory, "sensor") as home:
        # dedup is the sensor's business, not the flag CLI's: a rollback command that starts fast
        raw = yaml.safe_load((PROJECT_ROOT / "governance" / "policy.yaml").read_text())
        raw["rollback"]["command"] = ["{python}", "-c", "import sys; print('rollback to', "
                                      "sys.argv[1])", "{phase}"]
        (home.root / "governance").mkdir()
        (home.root / "governance" / "policy.yaml").write_text(yaml.safe_dump(raw))
        promote_to(home, "A-1")  # the command prints, the flags stay past every A-1 target
        yield home


@pytest.fixture(scope="module")
def instance(module_home):
    inst = prepare_instance(module_home)  # <home>/.dagster on disk
    yield inst
    inst.dispose()


@pytest.fixture(scope="module")
def defs(module_home):
    return build_definitions(module_home)


@pytest.fixture
def start(instance) -> str | None:
    """Each test reads only the events it wrote: the cursor as it stands when the test starts."""
    recs = instance.fetch_materializations(dg.AssetKey("window_verdicts"), limit=1).records
    return str(recs[0].storage_id) if recs else None


def evaluate(instance, defs, cursor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                  resources={"home": defs.resources["home"]})
    return breach_sensor.evaluate_tick(ctx)


def test_one_breach_one_run_request_keyed_window_phase(instance, defs, start):
    verdicts_materialized(instance, W0900, [])
    verdicts_materialized(instance, W0915, [required("A-2", "A-1", failed=["crash_rate_delta"])])
    data = evaluate(instance, defs, start)
    assert [rr.run_key for rr in data.run_requests] == ["20250118T0915Z:A-2"]
    rr = data.run_requests[0]
    assert rr.run_config["ops"]["execute_rollback"]["config"] == {
        "window": "20250118T0915Z", "phase": "A-2", "rollback_to": "A-1", "level": "P2",
        "failed_slos": ["crash_rate_delta"]}
    assert rr.tags["rollout/rollback_to"] == "A-1"
    # the cursor is the last event seen; evaluating again from it yields nothing
    last = instance.fetch_materializations(dg.AssetKey("window_verdicts"), limit=1).records[0]
    assert data.cursor == str(last.storage_id)
    again = evaluate(instance, defs, data.cursor)
    assert not again.run_requests and again.skip_message
    assert again.cursor == data.cursor


def test_a_rescored_window_asks_with_the_same_run_key(instance, defs, start):
    verdicts_materialized(instance, W0915, [required("A-1", "A-0")])
    first = evaluate(instance, defs, start)
    verdicts_materialized(instance, W0915, [required("A-1", "A-0")])  # window re-materialized
    second = evaluate(instance, defs, first.cursor)
    # Dagster deduplicates run keys per sensor forever: the same breach never starts two runs
    assert [r.run_key for r in first.run_requests] == [r.run_key for r in second.run_requests] \
        == ["20250118T0915Z:A-1"]
    assert int(second.cursor) > int(first.cursor)


def test_a_window_scored_twice_since_the_last_tick_asks_once_with_the_latest_verdict(
        instance, defs, start):
    """The daemon's run and `rollout run` both scored 09:15 before the next tick: one request
    (it asked twice, and `rollout run` printed the rollback twice; found by an independent
    audit), carrying the latest verdict's level."""
    verdicts_materialized(instance, W0915, [required("A-1", "A-0", "warning")])
    verdicts_materialized(instance, W0915, [required("A-1", "A-0", "P2")])
    data = evaluate(instance, defs, start)
    assert [r.run_key for r in data.run_requests] == ["20250118T0915Z:A-1"]
    assert data.run_requests[0].run_config["ops"]["execute_rollback"]["config"]["level"] == "P2"


def test_several_phases_and_windows(instance, defs, start):
    verdicts_materialized(instance, W0900, [required("A-1", "A-0"), required("B-0", "A-2")])
    verdicts_materialized(instance, W0930, [required("B-1", "B-0", "P1")])
    data = evaluate(instance, defs, start)
    assert sorted(r.run_key for r in data.run_requests) == [
        "20250118T0900Z:A-1", "20250118T0900Z:B-0", "20250118T0930Z:B-1"]


def test_nothing_new_keeps_the_cursor(instance, defs, start):
    data = evaluate(instance, defs, start)
    assert not data.run_requests and data.cursor == start


def test_the_cursor_pages_through_a_backlog(instance, defs, start, monkeypatch):
    monkeypatch.setattr(breach_module, "BATCH", 2)
    windows = [W0900 + timedelta(minutes=15 * i) for i in range(5)]
    for ws in windows:
        verdicts_materialized(instance, ws, [required("A-1", "A-0")])
    keys, cursor, ticks = [], start, 0
    while True:
        data = evaluate(instance, defs, cursor)
        ticks += 1
        keys += [r.run_key for r in data.run_requests or []]
        if data.cursor == cursor:
            break
        cursor = data.cursor
    assert ticks == 4  # 2 + 2 + 1, then nothing new
    assert keys == [f"{ws:%Y%m%dT%H%MZ}:A-1" for ws in windows]


def test_tick_never_launches_a_second_rollback_for_the_same_key(module_home, instance, defs,
                                                                start, monkeypatch):
    monkeypatch.setattr(breach_module, "BATCH", 1)  # and it pages until it has seen everything
    # the CLI's stored cursor, as a previous tick would have left it (skips the other tests)
    if start is not None:
        instance.run_storage.set_cursor_values({CURSOR_KEY: start})
    verdicts_materialized(instance, W0900, [])
    verdicts_materialized(instance, W0915, [required("A-1", "A-0")])
    first = tick_breach_sensor(instance, defs, log=lambda m: None)
    assert [(r.run_key, r.success, r.skipped) for r in first] == [
        ("20250118T0915Z:A-1", True, False)]
    runs = instance.get_runs(dg.RunsFilter(job_name="rollback_job"))
    assert len(runs) == 1
    # the tags the daemon would set: a later daemon tick sees the run key as used
    assert runs[0].tags[RUN_KEY_TAG] == "20250118T0915Z:A-1"
    assert runs[0].tags[SENSOR_NAME_TAG] == "breach_sensor"
    assert tick_breach_sensor(instance, defs, log=lambda m: None) == []  # cursor kept
    # the window is re-scored and still breaches: the request comes again, nothing relaunches
    verdicts_materialized(instance, W0915, [required("A-1", "A-0")])
    again = tick_breach_sensor(instance, defs, log=lambda m: None)
    assert [(r.run_key, r.skipped) for r in again] == [("20250118T0915Z:A-1", True)]
    assert again[0].run_id == runs[0].run_id
    assert len(instance.get_runs(dg.RunsFilter(job_name="rollback_job"))) == 1
    assert query(module_home, "select rollback_id, exit_code, log_tail from rollbacks") == [
        ("20250118T0915Z:A-1", 0, "rollback to A-0")]
