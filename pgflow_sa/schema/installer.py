"""Install pgmq, a realtime.send publisher and the pinned pgflow schema.

Everything runs in the caller's transaction (one transaction for the whole
install) behind a transaction-scoped advisory lock, so two installers running
at once serialise and the second finds nothing to do.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import psycopg
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from .._db import database_errors, sync_engine
from ..exceptions import InstallError
from . import indexes
from .migrations import LATEST_VERSION, PINNED_VERSIONS, Migration, migrations
from .names import NOTIFY_CHANNEL, PGFLOW_SA_SCHEMA, PGFLOW_SCHEMA

# pg_advisory_xact_lock key: "pgflow-sa install" (any fixed bigint would do)
INSTALL_LOCK_KEY = 0x7067_666C_6F77_5341
PGMQ_MIN_VERSION = (1, 5)
REALTIME_SEND = "realtime.send(jsonb,text,text,boolean)"
# Our publisher's COMMENT starts with the mark; from the second version on the mark is
# followed by "v<N> " (queries.notifications_enabled relies on the "pgflow-sa:" prefix).
_OUR_PUBLISHER_MARK = "pgflow-sa:"
_PUBLISHER_VERSION = 2  # the version of sql/realtime_send.sql
_PUBLISHER_VERSION_RE = re.compile(r"pgflow-sa: v(\d+)\b")
#: The entry ``SchemaStatus.pending`` lists (first) while our realtime.send is outdated;
#: ``install(upto=PUBLISHER_UPDATE)`` replaces it and applies no migration.
PUBLISHER_UPDATE = "realtime.send"
#: The entry ``SchemaStatus.pending`` lists (last) while any of pgflow-sa's own tables
#: (schedules, run control) is missing (a database installed before they existed).
TABLES_UPDATE = "pgflow_sa tables"
#: pgflow-sa's own tables, each created by one of its SQL scripts (``tables_sql``)
OUR_TABLES = (
    "pgflow_sa.schedules",
    "pgflow_sa.schedule_runs",
    "pgflow_sa.run_cancellations",
    "pgflow_sa.run_retries",
    "pgflow_sa.flow_limits",
    "pgflow_sa.admitted_runs",
)
_PGFLOW_CREATE_PGMQ = 'CREATE EXTENSION IF NOT EXISTS "pgmq" WITH SCHEMA "pgmq";'

_PGMQ_OPTIONS = (
    "either install the pgmq extension on the server (it must then be available to "
    "CREATE EXTENSION pgmq) or install the SQL-only pgmq with `pip install pgmq` "
    "(a dependency of pgflow-sa)"
)


class SchemaState(str, enum.Enum):
    """What ``check`` found. The CLI's ``install --check`` exits with ``exit_code``."""

    INSTALLED = "installed"
    MISSING = "missing"
    OUTDATED = "outdated"

    @property
    def exit_code(self) -> int:
        return {"installed": 0, "missing": 3, "outdated": 4}[self.value]


@dataclass(frozen=True)
class SchemaStatus:
    """The pgflow, pgmq and realtime state of one database."""

    state: SchemaState
    target_version: str
    installed_version: str | None
    managed_by: str | None  # "pgflow-sa", "external" or None when absent
    pending: tuple[str, ...]  # migration names, after PUBLISHER_UPDATE when that is due
    pgmq: str  # "extension 1.13.0", "sql-only", "available as extension 1.13.0", "missing"
    realtime_send: str  # "pgflow-sa", "pgflow-sa (outdated)", "external" or "missing"
    tables: str = "installed"  # pgflow-sa's own tables: "installed" or "missing"
    runs_index: str = "installed"  # indexes.RUNS_BY_START: "installed" or "missing"

    def describe(self) -> list[str]:
        lines = [f"pgflow: {self.state.value}"]
        if self.installed_version:
            lines[0] += f" (version {self.installed_version}, managed by {self.managed_by})"
        elif self.managed_by == "external":
            lines[0] += " (installed by another tool, older than the pinned version)"
        if self.state is not SchemaState.INSTALLED:
            lines.append(f"target: pgflow {self.target_version}")
        pending = [n for n in self.pending if n not in (PUBLISHER_UPDATE, TABLES_UPDATE)]
        if pending:
            span = pending[0] if len(pending) == 1 else f"{pending[0]} .. {pending[-1]}"
            lines.append(f"pending migrations: {len(pending)} ({span})")
        lines.append(f"pgmq: {self.pgmq}")
        lines.append(f"realtime.send: {self.realtime_send}")
        lines.append(f"pgflow-sa tables: {self.tables}")
        if self.state is not SchemaState.MISSING:
            lines.append(_runs_index_line(self.runs_index, self.managed_by))
        return lines


@dataclass
class InstallReport:
    """What ``install`` did."""

    status_before: SchemaStatus
    status_after: SchemaStatus
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


@dataclass(frozen=True)
class _Probe:
    has_plpgsql: bool
    pgmq_extension: str | None
    pgmq_available: str | None
    pgmq_sql_present: bool
    pgmq_has_headers: bool
    realtime_send_comment: str | None
    has_realtime_send: bool
    has_pgflow: bool
    has_tables: bool
    has_record: bool
    external_fingerprint: bool
    supabase_versions: frozenset[str] | None


_PROBE_SQL = """
SELECT
  EXISTS (SELECT 1 FROM pg_language WHERE lanname = 'plpgsql') AS has_plpgsql,
  (SELECT extversion FROM pg_extension WHERE extname = 'pgmq') AS pgmq_extension,
  (SELECT default_version FROM pg_available_extensions WHERE name = 'pgmq') AS pgmq_available,
  to_regclass('pgmq.meta') IS NOT NULL AS pgmq_sql_present,
  EXISTS (
    SELECT 1 FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
    JOIN pg_attribute a ON a.attrelid = t.typrelid
    WHERE n.nspname = 'pgmq' AND t.typname = 'message_record'
      AND a.attname = 'headers' AND a.attnum > 0 AND NOT a.attisdropped
  ) AS pgmq_has_headers,
  to_regprocedure(:realtime_send) IS NOT NULL AS has_realtime_send,
  obj_description(to_regprocedure(:realtime_send), 'pg_proc') AS realtime_send_comment,
  to_regclass('pgflow.flows') IS NOT NULL AS has_pgflow,
  (SELECT bool_and(to_regclass(t) IS NOT NULL) FROM unnest(CAST(:our_tables AS text[])) AS t)
    AND to_regprocedure('pgflow_sa.reused_output(uuid,text,integer)') IS NOT NULL
    AS has_tables,
  to_regclass(:record_table) IS NOT NULL AS has_record,
  coalesce(
    pg_get_function_result(to_regprocedure('pgflow.set_vt_batch(text,bigint[],integer[])'))
      LIKE '%headers jsonb%',
    false
  ) AS external_fingerprint,
  to_regclass('supabase_migrations.schema_migrations') IS NOT NULL AS has_supabase
"""


def _probe(conn: Connection) -> _Probe:
    row = conn.execute(
        text(_PROBE_SQL),
        {
            "realtime_send": REALTIME_SEND,
            "record_table": f"{PGFLOW_SA_SCHEMA}.schema_migrations",
            "our_tables": list(OUR_TABLES),
        },
    ).one()
    supabase_versions = None
    if row.has_supabase:
        supabase_versions = frozenset(
            conn.execute(
                text("SELECT version FROM supabase_migrations.schema_migrations")
            ).scalars()
        )
    return _Probe(
        has_plpgsql=row.has_plpgsql,
        pgmq_extension=row.pgmq_extension,
        pgmq_available=row.pgmq_available,
        pgmq_sql_present=row.pgmq_sql_present,
        pgmq_has_headers=row.pgmq_has_headers,
        realtime_send_comment=row.realtime_send_comment,
        has_realtime_send=row.has_realtime_send,
        has_pgflow=row.has_pgflow,
        has_tables=row.has_tables,
        has_record=row.has_record,
        external_fingerprint=row.external_fingerprint,
        supabase_versions=supabase_versions,
    )


def _recorded(conn: Connection, probe: _Probe) -> set[str]:
    if not probe.has_record:
        return set()
    return set(
        conn.execute(text(f"SELECT name FROM {PGFLOW_SA_SCHEMA}.schema_migrations")).scalars()
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _pgmq_description(probe: _Probe) -> str:
    if probe.pgmq_extension:
        return f"extension {probe.pgmq_extension}"
    if probe.pgmq_sql_present:
        return "sql-only" if probe.pgmq_has_headers else "sql-only (older than 1.5)"
    if probe.pgmq_available:
        return f"missing (available as extension {probe.pgmq_available})"
    return "missing"


def _publisher_description(probe: _Probe) -> str:
    comment = probe.realtime_send_comment or ""
    if not probe.has_realtime_send:
        return "missing"
    if not comment.startswith(_OUR_PUBLISHER_MARK):
        return "external"  # e.g. Supabase Realtime's: never ours to change
    found = _PUBLISHER_VERSION_RE.match(comment)
    # the first publisher's comment had no version; a newer one is left as it is
    if (int(found.group(1)) if found else 1) < _PUBLISHER_VERSION:
        return "pgflow-sa (outdated)"
    return "pgflow-sa"


def _status(conn: Connection, version: str) -> tuple[SchemaStatus, _Probe, set[str]]:
    probe = _probe(conn)
    runs_index = "installed" if _has_runs_index(conn) else "missing"
    wanted = migrations(version)
    recorded = _recorded(conn, probe) if probe.has_pgflow else set()
    realtime = _publisher_description(probe)

    def status(
        state: SchemaState, installed: str | None, managed: str | None, pending: tuple[str, ...]
    ) -> SchemaStatus:
        if realtime == "pgflow-sa (outdated)":
            pending = (PUBLISHER_UPDATE, *pending)
            if state is SchemaState.INSTALLED:
                state = SchemaState.OUTDATED
        tables = "installed" if probe.has_tables else "missing"
        # a schema another tool installed is left exactly as it is: no tables of ours
        if managed == "pgflow-sa" and not probe.has_tables:
            pending = (*pending, TABLES_UPDATE)
            if state is SchemaState.INSTALLED:
                state = SchemaState.OUTDATED
        return SchemaStatus(
            state,
            version,
            installed,
            managed,
            pending,
            _pgmq_description(probe),
            realtime,
            tables,
            runs_index=runs_index,
        )

    if not probe.has_pgflow:
        return (
            status(SchemaState.MISSING, None, None, tuple(m.name for m in wanted)),
            probe,
            recorded,
        )
    if not recorded:
        # installed by something else: Supabase migrations, pgflow's own CLI, psql...
        if probe.supabase_versions is not None:
            applied = {m.name for m in wanted if m.version_id in probe.supabase_versions}
            current = len(applied) == len(wanted)
        else:
            current = probe.external_fingerprint
        if current:
            return status(SchemaState.INSTALLED, version, "external", ()), probe, recorded
        return status(SchemaState.OUTDATED, None, "external", ()), probe, recorded
    pending = tuple(m.name for m in wanted if m.name not in recorded)
    installed = None
    for candidate in PINNED_VERSIONS:
        if all(m.name in recorded for m in migrations(candidate)):
            installed = candidate
    state = SchemaState.OUTDATED if pending else SchemaState.INSTALLED
    return status(state, installed, "pgflow-sa", pending), probe, recorded


def check(conn: Connection, version: str = LATEST_VERSION) -> SchemaStatus:
    """Report the state of the database without changing anything."""
    return _status(conn, version)[0]


def _run_script(conn: Connection, sql: str) -> None:
    """Run a multi-statement SQL script in the connection's transaction.

    The script goes to psycopg without parameters, so it is sent as it is
    (several statements, '%' left alone); SQLAlchemy's own execute would
    treat '%' as a placeholder."""
    raw = conn.connection.driver_connection
    if isinstance(raw, psycopg.Connection):
        raw.execute(sql.encode("utf-8"))
        return
    if raw is not None and conn.dialect.driver == "asyncpg":
        # inside AsyncConnection.run_sync (e.g. an async Alembic env.py): asyncpg's
        # execute() without arguments uses the simple protocol, so scripts work too
        from sqlalchemy.util import await_only

        await_only(raw.execute(sql))
        return
    raise InstallError(
        "the installer needs a psycopg or asyncpg connection; pass a URL or a "
        "postgresql+psycopg / postgresql+asyncpg engine"
    )


def _install_pgmq(conn: Connection, probe: _Probe, actions: list[str]) -> bool:
    """Make pgmq >= 1.5 present. Returns True when pgflow's own CREATE EXTENSION line
    must be skipped (pgmq installed from SQL, not as an extension)."""
    if probe.pgmq_extension:
        if _version_tuple(probe.pgmq_extension) < PGMQ_MIN_VERSION:
            raise InstallError(
                f"pgmq extension {probe.pgmq_extension} is installed but pgflow needs pgmq >= 1.5: "
                "run ALTER EXTENSION pgmq UPDATE as a superuser, then install again"
            )
        return False
    if probe.pgmq_sql_present:
        if not probe.pgmq_has_headers:
            raise InstallError(
                "a SQL-only pgmq older than 1.5 is installed (pgmq.message_record has no "
                "headers column); pgflow needs pgmq >= 1.5: upgrade pgmq, then install again"
            )
        return True
    if probe.pgmq_available and _version_tuple(probe.pgmq_available) >= PGMQ_MIN_VERSION:
        _run_script(conn, 'CREATE SCHEMA IF NOT EXISTS "pgmq"; ' + _PGFLOW_CREATE_PGMQ)
        actions.append(f"pgmq: created extension {probe.pgmq_available}")
        return False
    try:
        from pgmq.install import get_embedded_install_sql, get_embedded_sql_version
    except ImportError:
        raise InstallError(
            f"pgmq is not installed in this database and cannot be: {_PGMQ_OPTIONS}"
        ) from None
    _run_script(conn, get_embedded_install_sql())
    actions.append(f"pgmq: installed SQL-only pgmq {get_embedded_sql_version()}")
    return True


def _install_realtime_send(conn: Connection, publisher: str, actions: list[str]) -> None:
    """Create our publisher where there is none, replace ours where it is outdated, and
    leave any other realtime.send (Supabase's) alone."""
    if publisher not in ("missing", "pgflow-sa (outdated)"):
        return
    _run_script(
        conn, realtime_send_sql()
    )  # CREATE OR REPLACE: keeps the function's owner and grants
    if publisher == "missing":
        actions.append(f"realtime.send: installed pg_notify publisher (channel {NOTIFY_CHANNEL!r})")
    else:
        actions.append(
            "realtime.send: updated pg_notify publisher "
            "(hints only unless pgflow_sa.notify = 'full')"
        )


def tables_sql() -> str:
    """pgflow-sa's own tables: schedules and run control (idempotent: CREATE ... IF NOT
    EXISTS)."""
    files = resources.files(__package__)
    return "\n".join(
        files.joinpath(f"sql/{name}.sql").read_text("utf-8")
        for name in ("schedules", "run_control")
    )


def _install_tables(conn: Connection, probe: _Probe, actions: list[str]) -> None:
    if probe.has_tables:
        return
    _run_script(conn, tables_sql())
    actions.append(
        "pgflow-sa: created its tables (schedules, schedule_runs, run_cancellations, "
        "run_retries, flow_limits, admitted_runs in schema pgflow_sa)"
    )


def realtime_send_sql() -> str:
    """pgflow-sa's realtime.send publisher (CREATE OR REPLACE)."""
    return resources.files(__package__).joinpath("sql/realtime_send.sql").read_text("utf-8")


def _apply(conn: Connection, migration: Migration, skip_create_pgmq: bool) -> None:
    sql = migration.sql
    if skip_create_pgmq and _PGFLOW_CREATE_PGMQ in sql:
        # pgmq came from its SQL-only install: there is no extension to create.
        sql = sql.replace(_PGFLOW_CREATE_PGMQ, "-- pgmq installed from SQL by pgflow-sa")
    _run_script(conn, sql)
    conn.execute(
        text(
            f"INSERT INTO {PGFLOW_SA_SCHEMA}.schema_migrations (name, pgflow_version) "
            "VALUES (:name, :release)"
        ),
        {"name": migration.name, "release": migration.release},
    )


_RUNS_INDEX = f"{PGFLOW_SCHEMA}.{indexes.RUNS_BY_START}"


def _has_runs_index(conn: Connection) -> bool:
    return bool(
        conn.execute(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": _RUNS_INDEX}).scalar()
    )


def _runs_index_line(state: str, managed_by: str | None) -> str:
    line = f"index {_RUNS_INDEX}: {state}"
    if state == "installed":
        return line
    line += " (without it, listing runs and the dashboard's runs page read every run"
    if managed_by == "external":  # install leaves another tool's schema as it is
        return line + f"; to add it: {indexes.CREATE})"
    return line + ": run pgflow-sa install)"


def _install_indexes(conn: Connection, actions: list[str]) -> None:
    had = _has_runs_index(conn)
    _run_script(conn, indexes.SCRIPT)
    if not had and _has_runs_index(conn):
        actions.append(f"pgflow-sa: index {_RUNS_INDEX} (runs newest first)")


def install(
    conn: Connection, version: str = LATEST_VERSION, *, upto: str | None = None
) -> InstallReport:
    """Install or upgrade pgflow in the connection's current transaction.

    ``upto`` stops after the named migration (e.g. to stage an upgrade), or, when it
    is ``PUBLISHER_UPDATE``, after pgmq and realtime.send. A pgflow schema installed
    by another tool is detected and left as it is (an outdated realtime.send of
    pgflow-sa's beside it is still replaced).
    """
    wanted = migrations(version)
    if upto is not None and upto != PUBLISHER_UPDATE and upto not in {m.name for m in wanted}:
        raise InstallError(f"unknown pgflow migration {upto!r} for pgflow {version}")
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": INSTALL_LOCK_KEY})
    before, probe, recorded = _status(conn, version)
    actions: list[str] = []
    if before.managed_by == "external":
        if before.installed_version is None:  # another tool's pgflow, older than ours
            raise InstallError(
                "this database has a pgflow schema that another tool installed and that is "
                f"older than pgflow {version}; pgflow-sa does not change a schema it did not "
                "install: upgrade it with the tool that installed it"
            )
        if before.realtime_send == "pgflow-sa (outdated)":  # ours, unlike the schema
            _install_realtime_send(conn, before.realtime_send, actions)
        after = _status(conn, version)[0] if actions else before
        return InstallReport(before, after, actions)
    if not probe.has_plpgsql:
        raise InstallError(
            "PL/pgSQL is not available in this database and pgflow's functions are written "
            "in it: run CREATE EXTENSION plpgsql (as the database owner), then install again"
        )
    skip_create_pgmq = _install_pgmq(conn, probe, actions)
    _install_realtime_send(conn, before.realtime_send, actions)
    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {PGFLOW_SA_SCHEMA}")
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {PGFLOW_SA_SCHEMA}.schema_migrations ("
        " name text PRIMARY KEY,"
        " pgflow_version text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    _install_tables(conn, probe, actions)
    if not probe.has_pgflow and probe.has_record:
        # the pgflow schema was dropped by hand: forget what was recorded
        conn.exec_driver_sql(f"DELETE FROM {PGFLOW_SA_SCHEMA}.schema_migrations")
    applied = []
    for migration in () if upto == PUBLISHER_UPDATE else wanted:
        if migration.name not in recorded:
            _apply(conn, migration, skip_create_pgmq)
            applied.append(migration.name)
        if migration.name == upto:
            break
    if applied:
        actions.append(f"pgflow: applied {len(applied)} migration(s) of pgflow {version}")
    _install_indexes(conn, actions)
    after = _status(conn, version)[0]
    return InstallReport(before, after, actions)


def install_schema(
    url: str | URL | Engine, version: str = LATEST_VERSION, *, upto: str | None = None
) -> InstallReport:
    """Install or upgrade pgflow in one transaction of its own (psycopg)."""
    engine = sync_engine(url)
    with database_errors(engine.url, InstallError), engine.begin() as conn:
        return install(conn, version, upto=upto)


def check_schema(url: str | URL | Engine, version: str = LATEST_VERSION) -> SchemaStatus:
    """``check`` on a connection of its own."""
    engine = sync_engine(url)
    with database_errors(engine.url, InstallError), engine.connect() as conn:
        return check(conn, version)


# --- the install as SQL text, for Alembic's offline mode (and its online mode alike) ---

PgmqSource = Literal["extension", "sql"]


def sql_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings on, as since PostgreSQL 9.1)."""
    return "'" + value.replace("'", "''") + "'"


_PGMQ_EXTENSION_SCRIPT = """DO $pgflow_sa$
BEGIN
  IF to_regclass('pgmq.meta') IS NULL THEN
    CREATE SCHEMA IF NOT EXISTS "pgmq";
    CREATE EXTENSION IF NOT EXISTS "pgmq" WITH SCHEMA "pgmq";
  END IF;
END
$pgflow_sa$;"""

_PGMQ_CHECK_SCRIPT = """DO $pgflow_sa$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
    JOIN pg_attribute a ON a.attrelid = t.typrelid
    WHERE n.nspname = 'pgmq' AND t.typname = 'message_record'
      AND a.attname = 'headers' AND a.attnum > 0 AND NOT a.attisdropped
  ) THEN
    RAISE EXCEPTION 'pgflow needs pgmq >= 1.5, and this database has %: %',
      CASE WHEN to_regclass('pgmq.meta') IS NULL THEN 'none' ELSE 'an older one' END,
      'install or upgrade pgmq (ALTER EXTENSION pgmq UPDATE), then run the migration again';
  END IF;
END
$pgflow_sa$;"""

_NOT_INSTALLED_SCRIPT = """DO $pgflow_sa$
BEGIN
  IF to_regclass('pgflow.flows') IS NOT NULL THEN
    RAISE EXCEPTION '%', 'pgflow is already installed in this database (by pgflow-sa install '
      || 'or another tool), and this migration installs it from nothing: take its '
      || 'InstallPgflowOp (and the UninstallPgflowOp of its downgrade) out, or uninstall '
      || 'pgflow first';
  END IF;
END
$pgflow_sa$;"""

_NOT_APPLIED_SCRIPT = """DO $pgflow_sa$
DECLARE
  applied text;
BEGIN
  SELECT string_agg(name, ', ' ORDER BY name) INTO applied
  FROM pgflow_sa.schema_migrations WHERE name IN ({listed});
  IF applied IS NOT NULL THEN
    RAISE EXCEPTION '%', 'pgflow migration(s) ' || applied || ' are already applied (by '
      || 'pgflow-sa install?): take them out of this migration''s UpgradePgflowOp';
  END IF;
END
$pgflow_sa$;"""

# pgflow's first migration creates the pgmq extension: skipped where pgmq is there in
# any form (SQL-only pgmq has no extension to create)
_GUARDED_CREATE_PGMQ = (
    "DO $pgflow_sa$ BEGIN IF to_regclass('pgmq.meta') IS NULL THEN "
    + _PGFLOW_CREATE_PGMQ
    + " END IF; END $pgflow_sa$;"
)


def _realtime_send_script() -> str:
    """Create our publisher where there is no realtime.send, replace ours where it is
    older, leave any other alone: decided when the script runs."""
    body = realtime_send_sql()
    if "$pgflow_sa_publisher$" in body:  # pragma: no cover - the file is ours
        raise InstallError("sql/realtime_send.sql must not contain $pgflow_sa_publisher$")
    fn = sql_literal(REALTIME_SEND)
    return (
        "DO $pgflow_sa$\n"
        "DECLARE\n"
        f"  found_comment text := obj_description(to_regprocedure({fn}), 'pg_proc');\n"
        "BEGIN\n"
        f"  IF to_regprocedure({fn}) IS NULL OR (\n"
        f"    found_comment LIKE '{_OUR_PUBLISHER_MARK}%'\n"
        "    AND coalesce(substring(found_comment FROM 'pgflow-sa: v([0-9]+)')::int, 1) "
        f"< {_PUBLISHER_VERSION}\n"
        "  ) THEN\n"
        f"    EXECUTE $pgflow_sa_publisher${body}$pgflow_sa_publisher$;\n"
        "  END IF;\n"
        "END\n"
        "$pgflow_sa$;"
    )


def install_script(
    version: str = LATEST_VERSION,
    *,
    pgmq: PgmqSource | None,
    realtime_send: bool,
    only: Sequence[str] | None = None,
) -> list[str]:
    """The install as SQL scripts, run in order in one transaction, with nothing probed
    beforehand (Alembic's offline mode has no database): what ``install`` would do to
    the database state described by the arguments.

    ``pgmq``: ``"extension"`` (CREATE EXTENSION pgmq), ``"sql"`` (the SQL-only pgmq of
    the ``pgmq`` Python package), None (pgmq is there); either way, pgmq >= 1.5 is
    checked when the scripts run. ``realtime_send``: add our publisher where there is
    no realtime.send, and replace an older one of ours. ``only``: the migrations to
    apply (names, in order; default all of ``version``), each recorded in
    ``pgflow_sa.schema_migrations`` as ``install`` does. The scripts contain neither
    parameters nor psql commands: send each one as it is.
    """
    wanted = {m.name: m for m in migrations(version)}
    chosen = list(wanted) if only is None else list(only)
    unknown = [name for name in chosen if name not in wanted]
    if unknown:
        raise InstallError(f"unknown pgflow migration(s) for pgflow {version}: {unknown}")
    scripts = [f"SELECT pg_advisory_xact_lock({INSTALL_LOCK_KEY});"]
    if only is None:
        # a whole install onto an installed pgflow would fail half-way: say why instead
        scripts.append(_NOT_INSTALLED_SCRIPT)
    if pgmq == "extension":
        scripts.append(_PGMQ_EXTENSION_SCRIPT)
    elif pgmq == "sql":
        try:
            from pgmq.install import get_embedded_install_sql
        except ImportError:
            raise InstallError(f"the SQL-only pgmq is not available: {_PGMQ_OPTIONS}") from None
        scripts.append(get_embedded_install_sql().strip())
    elif pgmq is not None:
        raise InstallError(f"pgmq must be 'extension', 'sql' or None, not {pgmq!r}")
    scripts.append(_PGMQ_CHECK_SCRIPT)
    if realtime_send:
        scripts.append(_realtime_send_script())
    scripts.append(
        f"CREATE SCHEMA IF NOT EXISTS {PGFLOW_SA_SCHEMA};\n"
        f"CREATE TABLE IF NOT EXISTS {PGFLOW_SA_SCHEMA}.schema_migrations ("
        " name text PRIMARY KEY,"
        " pgflow_version text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now());\n"
        "-- the pgflow schema was dropped by hand: forget what was recorded\n"
        f"DELETE FROM {PGFLOW_SA_SCHEMA}.schema_migrations "
        "WHERE to_regclass('pgflow.flows') IS NULL;"
    )
    scripts.append(tables_sql().strip())
    if chosen and only is not None:
        listed = ", ".join(sql_literal(name) for name in chosen)
        scripts.append(_NOT_APPLIED_SCRIPT.replace("{listed}", listed))
    for name in chosen:
        migration = wanted[name]
        sql = migration.sql.replace(_PGFLOW_CREATE_PGMQ, _GUARDED_CREATE_PGMQ).strip()
        scripts.append(
            f"-- pgflow {migration.release}: {migration.name}\n{sql}\n"
            f"INSERT INTO {PGFLOW_SA_SCHEMA}.schema_migrations (name, pgflow_version) "
            f"VALUES ({sql_literal(migration.name)}, {sql_literal(migration.release)});"
        )
    scripts.append(indexes.SCRIPT)
    return scripts


def run_script(conn: Connection, sql: str) -> None:
    """Run a script of ``install_script`` (or any parameterless multi-statement SQL)
    in the connection's transaction, exactly as it is (psycopg or asyncpg)."""
    _run_script(conn, sql)
