"""The DuckDB warehouse: every table's DDL in one place, and how to open the file safely.

DuckDB lets one process write a file at a time. Writers retry while another process holds the
lock (the webserver, a concurrent run); readers open read-only.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb

from rollout_assets.events import KINDS

DDL: dict[str, str] = {
    # ---- Collector -------------------------------------------------------------------------
    # One row per stored event, only what the metrics and their audit need: `event_id` is kept
    # as its 64-bit `event_key = hash(event_id)` (the dedup key: look an event up with
    # `where event_key = hash('7f3c…')`), its file and ingest time live once per committed range
    # in `ingest_batches`, and `phase`/`tenant`/`environment` are ENUMs that grow with the data
    # (`grow_labels`). Writing VARCHARs was ~70 % of the cost of storing 10M events.
    "canary_events": """
        create table if not exists canary_events (
            event_key UBIGINT NOT NULL, ts TIMESTAMP NOT NULL, window_start TIMESTAMP NOT NULL,
            phase {phase} NOT NULL, kind event_kind NOT NULL, latency_ms DOUBLE, ok BOOLEAN,
            conflict BOOLEAN, tenant {tenant}, environment {environment},
            observed_only BOOLEAN NOT NULL, dry_run BOOLEAN NOT NULL,
            batch_id BIGINT NOT NULL, line_no BIGINT NOT NULL
        )""",
    # `rollout replay`'s what-ifs (rollout_assets/replay.py): there before the first replay, so
    # a query of it answers "none yet" rather than failing
    "replay_diffs": """
        create table if not exists replay_diffs (
            replay_id VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL, phase VARCHAR NOT NULL,
            production_breach BOOLEAN, candidate_breach BOOLEAN NOT NULL,
            production_level VARCHAR, candidate_level VARCHAR NOT NULL,
            production_rollback_to VARCHAR, candidate_rollback_to VARCHAR,
            production_failed_slos VARCHAR[], candidate_failed_slos VARCHAR[] NOT NULL,
            production_policy_version VARCHAR, candidate_policy_version VARCHAR NOT NULL,
            replayed_at TIMESTAMP NOT NULL
        )""",
    "ingest_batches": """
        create table if not exists ingest_batches (
            batch_id BIGINT PRIMARY KEY, source_file VARCHAR NOT NULL,
            first_line BIGINT NOT NULL, lines BIGINT NOT NULL, byte_offset BIGINT NOT NULL,
            bytes BIGINT NOT NULL, loaded BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
        )""",
    "quarantine": """
        create table if not exists quarantine (
            source_file VARCHAR NOT NULL, line_no BIGINT NOT NULL, raw VARCHAR,
            reason VARCHAR NOT NULL, ingested_at TIMESTAMP NOT NULL
        )""",
    "ingest_files": """
        create table if not exists ingest_files (
            source_file VARCHAR PRIMARY KEY, byte_offset BIGINT NOT NULL,
            lines_read BIGINT NOT NULL,
            loaded BIGINT NOT NULL, duplicates BIGINT NOT NULL, quarantined BIGINT NOT NULL,
            size_bytes BIGINT NOT NULL, mtime DOUBLE NOT NULL, updated_at TIMESTAMP NOT NULL,
            tail_hash VARCHAR,
            -- set when the file was rotated (renamed) away from that name: an archive, read
            -- while it grows and never a collector fault when it goes (ingest.follow_rotations)
            rotated_from VARCHAR
        )""",
    "window_metrics": """
        create table if not exists window_metrics (
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, phase VARCHAR NOT NULL,
            events BIGINT NOT NULL, autosave_count BIGINT NOT NULL, autosave_p95_ms DOUBLE,
            autosave_error_count BIGINT NOT NULL, restore_count BIGINT NOT NULL,
            restore_success_rate DOUBLE, merge_count BIGINT NOT NULL,
            merge_auto_success_rate DOUBLE, merge_conflict_rate DOUBLE,
            session_count BIGINT NOT NULL, crash_count BIGINT NOT NULL, crash_rate DOUBLE,
            excluded_events BIGINT NOT NULL, computed_at TIMESTAMP NOT NULL,
            policy_version VARCHAR NOT NULL,
            PRIMARY KEY (window_start, phase)
        )""",
    "window_exclusions": """
        create table if not exists window_exclusions (
            window_start TIMESTAMP NOT NULL, phase VARCHAR NOT NULL, reason VARCHAR NOT NULL,
            events BIGINT NOT NULL, PRIMARY KEY (window_start, phase, reason)
        )""",
    # canary files the Collector could not read for a window (seed §7.4); the Analyzer turns
    # them into verdicts: retryable=false -> P1 + rollback_required, retryable=true -> P2
    "collector_faults": """
        create table if not exists collector_faults (
            window_start TIMESTAMP NOT NULL, phase VARCHAR NOT NULL, source_file VARCHAR NOT NULL,
            retryable BOOLEAN NOT NULL, reason VARCHAR NOT NULL, attempts INTEGER NOT NULL,
            detected_at TIMESTAMP NOT NULL, PRIMARY KEY (window_start, phase, source_file)
        )""",
    # canary files an operator said are gone for good (`rollout files forget`): the audit trail
    "forgotten_files": """
        create table if not exists forgotten_files (
            source_file VARCHAR NOT NULL, byte_offset BIGINT NOT NULL, lines_read BIGINT NOT NULL,
            loaded BIGINT NOT NULL, reason VARCHAR NOT NULL, actor VARCHAR NOT NULL,
            forgotten_at TIMESTAMP NOT NULL
        )""",
    "event_retention": """
        create table if not exists event_retention (
            purged_before TIMESTAMP NOT NULL, deleted_events BIGINT NOT NULL,
            newest_window TIMESTAMP NOT NULL, canary_events_days INTEGER NOT NULL,
            purged_at TIMESTAMP NOT NULL
        )""",
    # ---- Analyzer --------------------------------------------------------------------------
    "slo_scores": """
        create table if not exists slo_scores (
            window_start TIMESTAMP NOT NULL, phase VARCHAR NOT NULL, slo VARCHAR NOT NULL,
            metric VARCHAR NOT NULL, value DOUBLE, comparator VARCHAR NOT NULL,
            threshold DOUBLE NOT NULL, sample_size BIGINT NOT NULL, min_sample BIGINT NOT NULL,
            passed BOOLEAN, status VARCHAR NOT NULL, severity VARCHAR NOT NULL,
            rollback BOOLEAN NOT NULL, shadow BOOLEAN NOT NULL, baseline DOUBLE,
            policy_version VARCHAR NOT NULL, scored_at TIMESTAMP NOT NULL,
            PRIMARY KEY (window_start, phase, slo)
        )""",
    "window_verdicts": """
        create table if not exists window_verdicts (
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, phase VARCHAR NOT NULL,
            status VARCHAR NOT NULL, breach BOOLEAN NOT NULL, rollback_required BOOLEAN NOT NULL,
            rollback_to VARCHAR, level VARCHAR NOT NULL, failed_slos VARCHAR[] NOT NULL,
            policy_version VARCHAR NOT NULL, judged_at TIMESTAMP NOT NULL,
            PRIMARY KEY (window_start, phase)
        )""",
    # ---- Reporter & actions ----------------------------------------------------------------
    "alert_reports": """
        create table if not exists alert_reports (
            window_start TIMESTAMP PRIMARY KEY, path VARCHAR NOT NULL, phases VARCHAR[] NOT NULL,
            level VARCHAR NOT NULL, rendered_at TIMESTAMP NOT NULL
        )""",
    "notifications": """
        create table if not exists notifications (
            idempotency_key VARCHAR PRIMARY KEY, window_start TIMESTAMP NOT NULL,
            phase VARCHAR NOT NULL, channel VARCHAR NOT NULL, kind VARCHAR NOT NULL,
            level VARCHAR NOT NULL, transport VARCHAR NOT NULL, status VARCHAR NOT NULL,
            attempts INTEGER NOT NULL, response_code INTEGER, thread_ts VARCHAR,
            incident_id VARCHAR, path VARCHAR, created_at TIMESTAMP NOT NULL,
            updated_at TIMESTAMP NOT NULL,
            -- delivery: Slack ts/channel id of this message (thread_ts = its thread's root),
            -- PagerDuty dedup key, last error, and the payload sent (never a token or key)
            message_ts VARCHAR, channel_id VARCHAR, dedup_key VARCHAR, error VARCHAR, body JSON
        )""",
    # a transport whose retries ran out (or whose token was refused): later runs before `until`
    # do not wait out the same retries again (resources/notifier.py)
    "delivery_outages": """
        create table if not exists delivery_outages (
            transport VARCHAR PRIMARY KEY, since TIMESTAMP NOT NULL, until TIMESTAMP NOT NULL,
            error VARCHAR
        )""",
    "rollbacks": """
        create table if not exists rollbacks (
            rollback_id VARCHAR PRIMARY KEY, window_start TIMESTAMP NOT NULL,
            phase VARCHAR NOT NULL,
            rollback_to VARCHAR NOT NULL, status VARCHAR NOT NULL, command VARCHAR NOT NULL,
            exit_code INTEGER, log_tail VARCHAR, log_path VARCHAR, flags_before VARCHAR,
            flags_after VARCHAR, dagster_run_id VARCHAR, policy_version VARCHAR NOT NULL,
            started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP
        )""",
    "flag_state": """
        create table if not exists flag_state (
            singleton BOOLEAN PRIMARY KEY DEFAULT true, phase VARCHAR NOT NULL,
            flags JSON NOT NULL, updated_at TIMESTAMP NOT NULL
        )""",
    "flag_history": """
        create table if not exists flag_history (
            changed_at TIMESTAMP NOT NULL, action VARCHAR NOT NULL, from_phase VARCHAR,
            to_phase VARCHAR NOT NULL, flags JSON NOT NULL, reason VARCHAR,
            actor VARCHAR NOT NULL, policy_version VARCHAR NOT NULL,
            -- the latest judged window when the change was made: gates count windows after it
            effective_window TIMESTAMP
        )""",
    # ---- Governance (seed §5, §8) -----------------------------------------------------------
    "incidents": """
        create table if not exists incidents (
            incident_id VARCHAR PRIMARY KEY, phase VARCHAR NOT NULL, level VARCHAR NOT NULL,
            status VARCHAR NOT NULL, opened_window TIMESTAMP NOT NULL,
            last_breach_window TIMESTAMP NOT NULL, breach_windows INTEGER NOT NULL,
            failed_slos VARCHAR[] NOT NULL, rollback_required BOOLEAN NOT NULL,
            alert_received_at TIMESTAMP, escalation_decided_at TIMESTAMP,
            escalation_late BOOLEAN, rollback_executed_at TIMESTAMP, rollback_exit_code INTEGER,
            rca_path VARCHAR, rca_created_at TIMESTAMP, rca_due DATE, owner VARCHAR,
            green_cycles INTEGER NOT NULL, closed_window TIMESTAMP, closed_at TIMESTAMP,
            policy_version VARCHAR NOT NULL, updated_at TIMESTAMP NOT NULL,
            -- the first window of the incident's history: earlier than `opened_window` when
            -- late data withdrew its first breach (its rollback may have run for that window)
            began_window TIMESTAMP
        )""",
    "incident_timeline": """
        create table if not exists incident_timeline (
            incident_id VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL, step VARCHAR NOT NULL,
            detail VARCHAR
        )""",
    "sla_daily": """
        create table if not exists sla_daily (
            phase VARCHAR NOT NULL, day DATE NOT NULL, windows_judged BIGINT NOT NULL,
            windows_passed BIGINT NOT NULL, attainment DOUBLE, breaches BIGINT NOT NULL,
            rollbacks BIGINT NOT NULL, incidents BIGINT NOT NULL, major_incidents BIGINT NOT NULL,
            mean_time_to_restore_minutes DOUBLE, excluded_events BIGINT NOT NULL,
            drill_events BIGINT NOT NULL, shadow_failures BIGINT NOT NULL,
            policy_version VARCHAR NOT NULL, computed_at TIMESTAMP NOT NULL,
            PRIMARY KEY (phase, day)
        )""",
    "policy_versions": """
        create table if not exists policy_versions (
            policy_version VARCHAR PRIMARY KEY, content_hash VARCHAR NOT NULL,
            version_label VARCHAR NOT NULL, first_seen_at TIMESTAMP NOT NULL, source VARCHAR,
            content VARCHAR
        )""",
}

SAY_WAITING_AFTER = 2.0  # seconds of waiting for the lock before saying so on stderr
LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
# A new DuckDB file is created, then its headers (3 blocks of 4 KiB) are written: a process that
# opens it in between is told it "is not a valid DuckDB database file". Shorter than the
# headers, the file is being created; a longer file that does not open is really not one.
NOT_A_DATABASE = "not a valid DuckDB database file"
HEADER_BYTES = 3 * 4096


def _is_transient(exc: Exception, path: Path) -> bool:
    """Another process holds the lock, or is creating the file right now."""
    if any(m in str(exc) for m in LOCK_MARKERS):
        return True
    if NOT_A_DATABASE in str(exc):
        try:
            return path.stat().st_size < HEADER_BYTES
        except OSError:
            return False
    return False


def duckdb_path(path: Path | str) -> str:
    """`path` as DuckDB must be given it: the text its bytes spell in UTF-8. Python decodes a
    path's bytes with the locale's encoding, so under a non-UTF-8 locale (`LC_ALL=C` with
    `PYTHONUTF8=0`) a name such as "é" arrives as surrogate escapes, which DuckDB cannot
    encode."""
    return os.fsencode(path).decode("utf-8", "surrogateescape")


# how long anything that opens the warehouse waits for another process's lock: a run of a
# backfill, the UI's daemon, a reader's SQL session (the README's "up to 15 minutes")
LOCK_WAIT_SECONDS = 900.0


def connect(path: Path, read_only: bool = False, wait_seconds: float = LOCK_WAIT_SECONDS):
    """Open the warehouse, waiting while another process holds the single-writer lock.

    DuckDB allows one process to open the file for writing, and a read-only open fails while it
    does (and a writer's open fails while a reader has it): both sides retry with back-off until
    `wait_seconds` have passed, as they do while the first writer is still writing a new file's
    headers. Any other error is raised at once."""
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + wait_seconds
    delay = 0.05
    said = False
    while True:
        try:
            con = duckdb.connect(duckdb_path(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if not _is_transient(exc, path) or time.monotonic() > deadline:
                raise
            if not said and time.monotonic() - start > SAY_WAITING_AFTER:
                said = True  # once, so a long wait is not mistaken for a hang
                print(f"rollout: waiting for {path.name}: another process has it open (a run, "
                      "the UI's daemon, or a reader's SQL session); giving up after "
                      f"{wait_seconds:g} s", file=sys.stderr, flush=True)
            # jitter: two waiting processes must not retry in lockstep
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 1.0)
    if not read_only:
        ensure_schema(con)
    return con


VIEWS: dict[str, str] = {
    # each stored event with the file, line and time it was read from (SQL users, tests)
    "canary_event_sources": """
        create or replace view canary_event_sources as
        select e.*, b.source_file, b.ingested_at
        from canary_events e join ingest_batches b using (batch_id)""",
}

# Low-cardinality strings of `canary_events`, stored as ENUMs named `event_<column>_<version>`.
# DuckDB cannot add a value to an ENUM, so a value never seen before makes a new version of the
# type and the column is converted to it (~0.3 s for 10M rows, once per new value; the ingest
# gives `phase` every policy phase before it stores anything). A column that passes MAX_LABELS
# distinct values becomes VARCHAR for good.
LABEL_COLUMNS = ("phase", "tenant", "environment")
MAX_LABELS = 1000


def _label_types(con) -> dict[str, tuple[str, int]]:
    """column -> (type name, version) of the label ENUMs that exist."""
    out: dict[str, tuple[str, int]] = {}
    for name, in con.execute(
            "select type_name from duckdb_types() where database_name = current_database() "
            "and logical_type = 'ENUM' and type_name like 'event\\_%' escape '\\'").fetchall():
        column, _, version = name[len("event_"):].rpartition("_")
        if column in LABEL_COLUMNS and version.isdigit():
            if int(version) > out.get(column, ("", 0))[1]:
                out[column] = (name, int(version))
    return out


def _column_type(con, column: str) -> str:
    return con.execute(
        "select data_type from duckdb_columns() where database_name = current_database() "
        "and schema_name = 'main' and table_name = 'canary_events' and column_name = ?",
        [column]).fetchone()[0]


def grow_labels(con, column: str, values) -> str | None:
    """Make every value in `values` storable in `canary_events.<column>`: a new version of the
    column's ENUM when some are new (in the caller's transaction, before it inserts them).
    Returns the ENUM type the column holds afterwards, or None when it is VARCHAR."""
    if column not in LABEL_COLUMNS or _column_type(con, column) == "VARCHAR":
        return None
    name, version = _label_types(con)[column]
    known = con.execute(f"select enum_range(NULL::{name})").fetchone()[0]
    new = sorted({v for v in values if v is not None} - set(known))
    if not new:
        return name
    labels = sorted({*known, *new})  # an ENUM sorts by position: keep VARCHAR's order
    grown = None
    if len(labels) > MAX_LABELS:
        con.execute(f"alter table canary_events alter {column} type VARCHAR")
    else:
        grown = f"event_{column}_{version + 1}"
        con.execute(f"create type {grown} as enum (select unnest(?::VARCHAR[]))", [labels])
        # Named with its database: DuckDB (1.5) cannot replay from its WAL an ALTER to a type
        # named without one ("GetDefaultDatabase with no default database set"), and a file
        # whose WAL holds one no longer opens after a crash (test_warehouse_labels.py).
        catalog = con.execute("select current_database()").fetchone()[0]
        con.execute(f"alter table canary_events alter {column} type "
                    f"{sql_identifier(catalog)}.main.{grown}")
    con.execute(f"drop type {name}")
    return grown


def records(con, sql: str, params=()) -> list[dict]:
    """A query's rows as dicts by column name, in plain Python values (None for NULL,
    `datetime` for TIMESTAMP): what the assets pass around, without a DataFrame per call."""
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def insert_columns(con, table: str, names: Sequence[str], columns: Sequence[Sequence],
                   **constants) -> None:
    """Insert rows given column by column (`columns[i]` holds column `names[i]` of every row) in
    one statement: each list is bound as a DuckDB list of its column's type and unnested beside
    the others; `constants` give further columns one value for all the rows."""
    types = dict(con.execute("select name, type from pragma_table_info(?)", [table]).fetchall())
    exprs = [f"unnest(?::{types[n]}[])" for n in names] + ["?"] * len(constants)
    con.execute(f"insert into {table} ({', '.join([*names, *constants])}) "
                f"select {', '.join(exprs)}", [*map(list, columns), *constants.values()])


def sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def sql_identifier(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _schema_is_current(con) -> bool:
    """One catalog query instead of ~20 DDL statements on every writer's connect: every table
    and view exists and `canary_events` and `ingest_files` have today's columns."""
    names = ", ".join(f"'{t}'" for t in DDL)
    views = ", ".join(f"'{v}'" for v in VIEWS)
    tables, n_views, stale, tail = con.execute(f"""
        select (select count(*) from duckdb_tables() where database_name = current_database()
                    and schema_name = 'main' and table_name in ({names})),
               (select count(*) from duckdb_views() where database_name = current_database()
                    and schema_name = 'main' and view_name in ({views})),
               (select count(*) from duckdb_columns() where database_name = current_database()
                    and schema_name = 'main' and table_name = 'canary_events'
                    and column_name = 'event_id'),
               (select count(*) from duckdb_columns() where database_name = current_database()
                    and schema_name = 'main' and (table_name, column_name) in (
                        ('ingest_files', 'tail_hash'), ('ingest_files', 'rotated_from'),
                        ('incidents', 'began_window')))""").fetchone()
    return tables == len(DDL) and n_views == len(VIEWS) and stale == 0 and tail == 3


def ensure_schema(con) -> None:
    if _schema_is_current(con):
        return
    con.execute("begin transaction")  # a migration is all or nothing
    try:
        _create_schema(con)
    except BaseException:
        con.execute("rollback")
        raise
    con.execute("commit")


def _create_schema(con) -> None:
    if not con.execute("select count(*) from duckdb_types() where type_name = 'event_kind' "
                       "and database_name = current_database()").fetchone()[0]:
        # the event kinds are fixed by the event contract: an ENUM stores one byte a row
        kinds = ", ".join(f"'{k}'" for k in KINDS)
        con.execute(f"create type event_kind as enum ({kinds})")
    labels = _label_types(con)
    for column in LABEL_COLUMNS:
        if column not in labels:
            # DuckDB cannot bind a comparison with an empty ENUM: start with ''
            con.execute(f"create type event_{column}_1 as enum ('')")
            labels[column] = (f"event_{column}_1", 1)
    old = _old_canary_events(con)
    for table, ddl in DDL.items():
        if table == "canary_events":
            ddl = ddl.format(**{c: labels[c][0] for c in LABEL_COLUMNS})
        con.execute(ddl)
    if old:
        _migrate_canary_events(con, old)
    # added later: the cursor's fingerprint (NULL until a file's next ingest records it), and
    # the name an archive was rotated from
    con.execute("alter table ingest_files add column if not exists tail_hash VARCHAR")
    con.execute("alter table ingest_files add column if not exists rotated_from VARCHAR")
    con.execute("alter table incidents add column if not exists began_window TIMESTAMP")
    # resolves are keyed per incident since the same release as `rotated_from` (so every
    # older warehouse passes here once): `<window>:<phase>:<channel>:resolve:<incident>`
    con.execute("update notifications set idempotency_key = idempotency_key || ':' || "
                "incident_id where kind = 'resolve' and incident_id is not null "
                "and ends_with(idempotency_key, ':resolve')")
    for ddl in VIEWS.values():
        con.execute(ddl)


def _old_canary_events(con) -> set[str]:
    """The columns of a `canary_events` written by an earlier version (one that stored
    `event_id`), renamed out of the way; empty when there is none."""
    cols = {r[0] for r in con.execute(
        "select column_name from duckdb_columns() where database_name = current_database() "
        "and schema_name = 'main' and table_name = 'canary_events'").fetchall()}
    if "event_id" not in cols:
        return set()
    con.execute("drop view if exists canary_event_sources")
    con.execute("alter table canary_events rename to canary_events_old")
    return cols


def _migrate_canary_events(con, cols: set[str]) -> None:
    """Move the rows of an earlier `canary_events` (event_id, source_file and ingested_at on
    every row; `event_key`/`batch_id` maybe missing) into today's layout, in one transaction."""
    batch = "batch_id" if "batch_id" in cols else "0"
    con.execute(f"""
        create temp table _old_batches as
        select row_number() over (order by b, source_file) as new_batch, b, source_file,
            min(line_no) as first_line, count(*) as n, max(ingested_at) as ingested_at
        from (select {batch} as b, source_file, line_no, ingested_at from canary_events_old)
        group by b, source_file""")
    for column in LABEL_COLUMNS:
        grow_labels(con, column, [r[0] for r in con.execute(
            f"select distinct {column} from canary_events_old").fetchall()])
    con.execute("""
        insert into ingest_batches
        select new_batch, source_file, first_line, n, 0, 0, n, ingested_at from _old_batches""")
    con.execute("""
        insert into canary_events
        select hash(o.event_id), o.ts, o.window_start, o.phase, o.kind, o.latency_ms, o.ok,
            o.conflict, o.tenant, o.environment, o.observed_only, o.dry_run, b.new_batch,
            o.line_no
        from canary_events_old o join _old_batches b
            on b.source_file = o.source_file and b.b = {batch}""".replace(
        "{batch}", "o.batch_id" if batch == "batch_id" else "0"))
    con.execute("drop table _old_batches")
    con.execute("drop table canary_events_old")


# Crash-test hook, used only by rollout_assets_tests/test_reliability_atomic.py (documented in
# docs/guarantees.md): ROLLOUT_TEST_PAUSE_IN_TRANSACTION="WHERE:PATH" makes a transaction of this
# process create PATH and sleep before it commits, so a test can SIGKILL it mid-write. WHERE is
# the name of the function that opened the transaction (`judge_range`), optionally `#k` for its
# k-th one, or a number N for the N-th transaction of the process. Read once at import and
# removed from the environment, so child processes never inherit it.
PAUSE_ENV = "ROLLOUT_TEST_PAUSE_IN_TRANSACTION"
_pause_at: tuple[str, int, str] | None = None
if os.environ.get(PAUSE_ENV):
    _where, _, _marker = os.environ.pop(PAUSE_ENV).partition(":")
    _name, _, _k = _where.partition("#")
    _pause_at = ("", int(_name), _marker) if _name.isdigit() else (_name, int(_k or 1), _marker)
_transactions: dict[str, int] = {}


def _maybe_pause() -> None:
    caller = sys._getframe(3).f_code.co_name  # the function that opened the transaction
    for key in ("", caller):
        _transactions[key] = _transactions.get(key, 0) + 1
    if _pause_at is not None and _transactions.get(_pause_at[0]) == _pause_at[1]:
        Path(_pause_at[2]).write_text(f"{caller} {os.getpid()}\n")
        time.sleep(600)


@contextmanager
def transaction(con) -> Iterator:
    """One transaction: a window's rows are replaced all at once or not at all."""
    con.execute("begin transaction")
    try:
        yield con
        _maybe_pause()
    except BaseException:
        con.execute("rollback")
        raise
    con.execute("commit")


# ---- the readers' copy -----------------------------------------------------------------------

NOT_FOR_READERS = frozenset({"canary_events"})  # the raw events: 70 MB a 10M-event day
# set for a command whose caller writes the readers' copy after it (the rollback job's command)
READERS_COPY_BY_CALLER_ENV = "ROLLOUT_READERS_COPY_BY_CALLER"


def publish_reader_copy(con, path: Path) -> int:
    """Write every table of `con`'s warehouse but the raw events to a new DuckDB file and move
    it over `path` at once; returns the tables copied.

    DuckDB lets one process write a file and no other open it meanwhile, readers included: an
    SQL session on the warehouse fails while a run writes, and one held open stalls the runs and
    can make a rollback time out. Readers query this copy instead. A run writes it beside and
    renames it over the old one, so it never waits for them: a session keeps the copy it opened,
    the next one opens the newest. Called at the end of each run that changes tables (outside
    a transaction: ATTACH cannot run in one)."""
    tables = [t for (t,) in con.execute(
        "select table_name from duckdb_tables() where database_name = current_database() "
        "and schema_name = 'main' order by 1").fetchall() if t not in NOT_FOR_READERS]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # a killed run's (and its .wal):
        stale.unlink(missing_ok=True)  # this process holds the writer's lock, none publishes
    # A log beside the copy (a session that opened it read-write, the `duckdb` shell's
    # default) would be replayed onto the next copy, deleting rows by number (found by an
    # independent audit): it goes before and after the rename. The copy itself is read-only
    # on disk, so such a session fails to open it unless it asks for `-readonly`.
    wal = path.with_name(path.name + ".wal")
    try:
        con.execute(f"attach {sql_string(duckdb_path(tmp))} as _reader_copy")
        try:
            for t in tables:
                name = sql_identifier(t)
                con.execute(f"create table _reader_copy.{name} as select * from main.{name}")
            con.execute("checkpoint _reader_copy")
        finally:
            con.execute("detach _reader_copy")
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
        os.chmod(tmp, 0o444)
        wal.unlink(missing_ok=True)
        os.replace(tmp, path)
        wal.unlink(missing_ok=True)
    except BaseException:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
        raise
    return len(tables)


def refresh_reader_copy(con, path: Path, warn: Callable[[str], None]) -> int | None:
    """`publish_reader_copy` once a run's or command's writes are done; a copy that cannot be
    written is a warning (the writes stand, readers keep the previous copy). Returns the tables
    copied, None when it was not written."""
    try:
        return publish_reader_copy(con, path)
    except (duckdb.Error, OSError) as exc:
        warn(f"readers' copy {path} not refreshed: {exc}")
        return None
