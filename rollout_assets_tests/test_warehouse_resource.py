"""`DuckDBWarehouse`: a run's steps share one connection, which is closed when the run ends,
when a block raises, or on `release()`; outside an execution each block has its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from rollout_assets import warehouse as warehouse_module
from rollout_assets.resources.duckdb_warehouse import DuckDBWarehouse

_PROBE = """
import sys, duckdb
try:
    con = duckdb.connect(sys.argv[1], read_only=True)
except duckdb.IOException as exc:
    sys.exit(3 if "lock" in str(exc).lower() else 4)
print(con.execute("select count(*) from duckdb_tables()").fetchone()[0])
"""


def _other_process_can_read(path: Path) -> bool:
    """Whether another process can open the file now: False while this one holds the writer."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode == 0


@pytest.fixture
def opened(monkeypatch) -> list[bool]:
    """One entry per connection the resource opens (True for read-only)."""
    calls: list[bool] = []
    real = warehouse_module.connect

    def counting(path, read_only=False, wait_seconds=120.0):
        calls.append(read_only)
        return real(path, read_only=read_only, wait_seconds=wait_seconds)

    monkeypatch.setattr(warehouse_module, "connect", counting)
    return calls


def test_the_steps_of_a_run_share_one_connection_closed_when_it_ends(home, opened):
    seen = []

    @dg.asset
    def writes(warehouse: DuckDBWarehouse) -> None:
        with warehouse.connect() as con:
            con.execute("create table shared_probe as select 42 as x")
            seen.append(id(con))

    @dg.asset(deps=[writes])
    def reads(warehouse: DuckDBWarehouse) -> None:
        with warehouse.connect() as con:
            assert con.execute("select x from shared_probe").fetchone() == (42,)
            seen.append(id(con))
        # held between blocks and steps: the run owns the writer until it ends
        seen.append(_other_process_can_read(home.db_path))

    result = dg.materialize([writes, reads], resources={
        "warehouse": DuckDBWarehouse(path=str(home.db_path))})
    assert result.success
    assert opened == [False]
    assert seen[0] == seen[1] and seen[2] is False
    assert _other_process_can_read(home.db_path)  # closed by the run's teardown


def test_a_block_that_raises_discards_the_connection_and_its_transaction(home, opened):
    with dg.build_resources({"warehouse": DuckDBWarehouse(path=str(home.db_path))}) as res:
        wh = res.warehouse
        with wh.connect() as con:
            con.execute("create table kept (x INTEGER)")
        with wh.connect() as again:
            assert again is con
        with pytest.raises(RuntimeError, match="boom"), wh.connect() as con:
            con.execute("begin transaction")
            con.execute("insert into kept values (1)")
            raise RuntimeError("boom")
        assert _other_process_can_read(home.db_path)  # released at once
        with wh.connect() as fresh:
            assert fresh is not con
            assert fresh.execute("select count(*) from kept").fetchone() == (0,)
    assert opened == [False, False]
    assert _other_process_can_read(home.db_path)


def test_release_lets_another_process_open_the_file_mid_run(home, opened):
    with dg.build_resources({"warehouse": DuckDBWarehouse(path=str(home.db_path))}) as res:
        with res.warehouse.connect() as con:
            con.execute("create table t (x INTEGER)")
        assert not _other_process_can_read(home.db_path)
        res.warehouse.release()
        assert _other_process_can_read(home.db_path)
        with res.warehouse.connect() as con:
            con.execute("insert into t values (1)")
    assert opened == [False, False]


def test_outside_an_execution_every_block_opens_and_closes_its_own(home, opened):
    wh = DuckDBWarehouse(path=str(home.db_path))
    with wh.connect() as first:
        first.execute("create table t (x INTEGER)")
    assert _other_process_can_read(home.db_path)
    with wh.connect(read_only=True) as second:
        assert second is not first
        assert second.execute("select count(*) from t").fetchone() == (0,)
    assert opened == [False, True]


_HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_a_wait_for_the_write_lock_is_said_once_not_silent(tmp_path, capfd):
    """Another process holds the writer: the open waits (and then succeeds), and says so once
    on stderr after 2 s, so an operator does not take the pause for a hang (found by an
    independent audit: a CLI run waited behind the daemon's backfill without a word)."""
    path = tmp_path / "rollout.duckdb"
    warehouse_module.connect(path).close()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), "3.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        con = warehouse_module.connect(path, wait_seconds=60)
        con.close()
    finally:
        holder.wait(timeout=60)
    err = capfd.readouterr().err
    assert err.count("rollout: waiting for rollout.duckdb: another process") == 1
