"""`canary_events.phase/tenant/environment` are ENUMs that grow with the data (warehouse.py):
a value never seen before must be stored, not rejected; order and comparisons must behave like
VARCHAR; and a column that passes MAX_LABELS values becomes VARCHAR without losing a row."""

from __future__ import annotations

from datetime import timedelta

from rollout_assets import warehouse
from rollout_assets.ingest import ingest_canary
from rollout_assets_tests.conftest import DAY, event, write_canary

NOW = DAY + timedelta(days=1)


def _tenants(con) -> list:
    return [r[0] for r in con.execute(
        "select tenant from canary_events order by tenant nulls last, line_no").fetchall()]


def test_an_empty_warehouse_answers_label_queries(con):
    assert con.execute("select count(*) from canary_events where tenant = 'qa' "
                       "and phase in ('A-1', 'B-0') and environment <> 'staging'"
                       ).fetchone() == (0,)


def test_new_labels_are_stored_and_sort_like_text(home, policy, con):
    write_canary(home, "A-1", [event(event_id="1", tenant="qa"),
                               event(event_id="2", tenant="beta")])
    ingest_canary(con, home, policy, now=NOW)
    write_canary(home, "A-1", [event(event_id="3", tenant="zeta"),
                               event(event_id="4", tenant="Alpha", environment="canary-eu"),
                               event(event_id="5", drop=["tenant"])])
    (s,) = ingest_canary(con, home, policy, now=NOW)
    assert s.loaded == 3
    assert _tenants(con) == ["Alpha", "beta", "qa", "zeta", None]
    assert con.execute("select count(*) from canary_events where tenant in ('zeta', 'gold')"
                       ).fetchone() == (1,)
    assert con.execute("select environment, count(*) from canary_events group by all "
                       "order by all").fetchall() == [("canary-eu", 1), ("production", 4)]
    # one ENUM version per column is left behind, holding exactly the values seen (+ '')
    types = {t[0] for t in con.execute(
        "select type_name from duckdb_types() where type_name like 'event_tenant%'").fetchall()}
    assert len(types) == 1
    (values,) = con.execute(f"select enum_range(NULL::{types.pop()})").fetchone()
    assert values == ["", "Alpha", "beta", "qa", "zeta"]


def test_the_phase_enum_holds_every_policy_phase_before_any_is_stored(home, policy, con):
    """A file per phase would otherwise add one label per file, and each new label converts
    the column over every event stored before it: the first ingest gives the ENUM them all."""
    write_canary(home, "A-1", [event(event_id="1")])
    ingest_canary(con, home, policy, now=NOW)
    (phase_type,) = con.execute(
        "select data_type from duckdb_columns() where table_name = 'canary_events' "
        "and column_name = 'phase'").fetchone()
    (values,) = con.execute(f"select enum_range(NULL::{phase_type})").fetchone()
    assert set(policy.phase_names) <= set(values)
    write_canary(home, "B-1", [event(event_id="2", phase="B-1")])
    ingest_canary(con, home, policy, now=NOW)
    # no new version of the type: B-1 was already a label
    assert con.execute("select data_type from duckdb_columns() where table_name = "
                       "'canary_events' and column_name = 'phase'").fetchone() == (phase_type,)
    assert con.execute("select phase, count(*) from canary_events group by 1 order by 1"
                       ).fetchall() == [("A-1", 1), ("B-1", 1)]


def test_a_column_with_too_many_labels_becomes_text(home, policy, con, monkeypatch):
    monkeypatch.setattr(warehouse, "MAX_LABELS", 3)
    write_canary(home, "A-1", [event(event_id="1", tenant="qa")])
    ingest_canary(con, home, policy, now=NOW)
    write_canary(home, "A-1", [event(event_id=str(i), tenant=f"t{i}") for i in range(2, 6)])
    (s,) = ingest_canary(con, home, policy, now=NOW)
    assert s.loaded == 4
    assert con.execute("select data_type from duckdb_columns() where table_name = "
                       "'canary_events' and column_name = 'tenant'").fetchone() == ("VARCHAR",)
    assert _tenants(con) == ["qa", "t2", "t3", "t4", "t5"]
    write_canary(home, "A-1", [event(event_id="9", tenant="later")])
    assert ingest_canary(con, home, policy, now=NOW)[0].loaded == 1


_CRASH_AFTER_NEW_LABELS = """
import os, sys
from datetime import datetime
from pathlib import Path
from rollout_assets.home import RolloutHome
from rollout_assets.ingest import ingest_canary
from rollout_assets.policy import load_policy
from rollout_assets.warehouse import connect
home = RolloutHome(Path(sys.argv[1]))
con = connect(Path(sys.argv[2]))
con.execute("checkpoint")  # the schema is in the file; what follows is only in the WAL
now = datetime.fromisoformat(sys.argv[3])
(s,) = ingest_canary(con, home, load_policy(home.policy_path), now=now)
print(s.loaded, flush=True)
os._exit(0)  # dies without closing: no checkpoint, the committed ranges are in the WAL only
"""


def test_new_labels_survive_a_crash_before_any_checkpoint(home, tmp_path):
    """Replaying the WAL must reopen the file: DuckDB cannot replay an ALTER to an ENUM named
    without its database, so `grow_labels` names it with one. The file name needs quoting."""
    import subprocess
    import sys

    db = tmp_path / 'odd "name" dir' / 'rollout "x".duckdb'
    write_canary(home, "A-1", [event(event_id="1", tenant="qa"),
                               event(event_id="2", tenant="zeta", environment="canary-eu")])
    proc = subprocess.run([sys.executable, "-c", _CRASH_AFTER_NEW_LABELS, str(home.root),
                           str(db), NOW.isoformat()], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["2"], proc.stderr
    assert db.with_name(db.name + ".wal").stat().st_size > 0
    con = warehouse.connect(db)
    try:
        assert _tenants(con) == ["qa", "zeta"]
        assert con.execute("select environment from canary_events order by line_no"
                           ).fetchall() == [("production",), ("canary-eu",)]
    finally:
        con.close()
