"""The Alembic integration, second pass: offline mode (``--sql``) gives the same schema as
online, destructive operations refuse to lose data without an opt-in written in the
migration, and user errors are Alembic's one-line ``FAILED:``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgflow_sa import SchemaState, check_schema
from pgflow_sa.testing.plugin import DatabaseFactory

from .helpers import snapshot
from .test_alembic import Project

ROWS_SQL = """
SELECT
  (SELECT coalesce(jsonb_agg(to_jsonb(f) - 'created_at' ORDER BY flow_slug), '[]')
   FROM pgflow.flows f),
  (SELECT coalesce(jsonb_agg(to_jsonb(s) - 'created_at' ORDER BY flow_slug, step_index), '[]')
   FROM pgflow.steps s),
  (SELECT coalesce(jsonb_agg(to_jsonb(d) - 'created_at' ORDER BY flow_slug, step_slug, dep_slug), '[]')
   FROM pgflow.deps d),
  (SELECT jsonb_agg(jsonb_build_array(name, pgflow_version) ORDER BY name)
   FROM pgflow_sa.schema_migrations)
"""


def _rows(url: str) -> tuple[object, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(ROWS_SQL).fetchone()
    assert row is not None
    return tuple(row)


def _psql(url: str, script: str) -> None:
    proc = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _sql(url: str, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def _failed_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Alembic's command error: one ``FAILED:`` line, no traceback, and Alembic's exit
    status for it (``sys.exit(-1)``: 255)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 255, (proc.returncode, output)
    assert "Traceback" not in output, output
    failed = [line for line in output.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1, output
    for fragment in fragments:
        assert fragment in failed[0], (fragment, failed[0])
    return failed[0]


@pytest.fixture
def second_db_url(databases: DatabaseFactory) -> Iterator[str]:
    url = databases.create()
    yield url
    databases.drop(url)


@pytest.mark.parametrize("template", ["generic", "async"])
def test_offline_sql_gives_the_online_schema(
    empty_db_url: str, second_db_url: str, tmp_path: Path, template: str
) -> None:
    """`alembic upgrade head --sql` applied with psql to an empty database gives the
    schema, flows, steps and install records of the online upgrade; so does the offline
    downgrade."""
    project = Project(tmp_path, template, empty_db_url)
    project.revision("pgflow")
    project.run("upgrade", "head")
    project.flows("v2")
    project.revision("options")
    project.run("upgrade", "head")

    offline = project.run("upgrade", "head", "--sql")
    assert "pg_advisory_xact_lock(NULL)" not in offline.stdout
    _psql(second_db_url, offline.stdout)
    assert check_schema(second_db_url).state is SchemaState.INSTALLED
    assert snapshot(second_db_url) == snapshot(empty_db_url)
    assert _rows(second_db_url) == _rows(empty_db_url)

    down = project.run("downgrade", "head:base", "--sql")
    _psql(second_db_url, down.stdout)
    assert check_schema(second_db_url).state is SchemaState.MISSING
    assert (
        _sql(
            second_db_url,
            "SELECT nspname FROM pg_namespace "
            "WHERE nspname IN ('pgflow', 'pgflow_sa', 'pgmq', 'realtime')",
        )
        == []
    )


@pytest.mark.parametrize("template", ["generic", "async"])
def test_dropping_a_flow_with_runs_needs_delete_runs(
    empty_db_url: str, tmp_path: Path, template: str
) -> None:
    project = Project(tmp_path, template, empty_db_url)
    migration = project.revision("pgflow")
    project.run("upgrade", "head")
    _sql(empty_db_url, "SELECT pgflow.start_flow('orders', '{}'::jsonb)")

    refused = project.run("downgrade", "base", ok=False)
    _failed_line(refused, "pgflow flow 'orders' has 1 run(s)", "delete_runs=True")
    assert _sql(empty_db_url, "SELECT count(*) FROM pgflow.runs") == [(1,)]
    assert check_schema(empty_db_url).state is SchemaState.INSTALLED

    [path] = (tmp_path / "migrations" / "versions").glob("*.py")
    assert "delete_runs=False" in migration
    path.write_text(migration.replace("delete_runs=False", "delete_runs=True"))
    project.run("downgrade", "base")
    assert check_schema(empty_db_url).state is SchemaState.MISSING


def test_uninstall_refuses_while_app_objects_depend_on_pgflow(
    empty_db_url: str, tmp_path: Path
) -> None:
    project = Project(tmp_path, "generic", empty_db_url)
    migration = project.revision("pgflow")
    project.run("upgrade", "head")
    _sql(
        empty_db_url,
        "CREATE TABLE public.audit (id serial PRIMARY KEY, "
        "run_id uuid REFERENCES pgflow.runs (run_id)); "
        "CREATE VIEW public.run_report AS SELECT run_id, status FROM pgflow.runs",
    )

    refused = project.run("downgrade", "base", ok=False)
    _failed_line(refused, "public.audit", "run_report", "cascade=True")
    assert check_schema(empty_db_url).state is SchemaState.INSTALLED
    assert _sql(empty_db_url, "SELECT to_regclass('public.run_report') IS NOT NULL") == [(True,)]

    [path] = (tmp_path / "migrations" / "versions").glob("*.py")
    assert "cascade=False" in migration
    path.write_text(migration.replace("cascade=False", "cascade=True"))
    project.run("downgrade", "base")
    assert check_schema(empty_db_url).state is SchemaState.MISSING
    # the app's table stays (without its foreign key); the view over pgflow.runs went
    assert _sql(
        empty_db_url,
        "SELECT to_regclass('public.audit') IS NOT NULL, to_regclass('public.run_report')",
    ) == [(True, None)]


def test_structural_change_is_a_failed_line_and_changes_are_detected(
    empty_db_url: str, tmp_path: Path
) -> None:
    project = Project(tmp_path, "generic", empty_db_url)
    first = project.run("revision", "--autogenerate", "-m", "pgflow")
    output = first.stdout + first.stderr
    assert "Detected pgflow install (pgflow 0.8.1)" in output
    assert "Detected added pgflow flow 'orders'" in output
    assert "Detected added table 'notes'" in output
    project.run("upgrade", "head")

    project.flows("v2")
    second = project.run("revision", "--autogenerate", "-m", "options")
    output = second.stdout + second.stderr
    assert "Detected changed option timeout of pgflow flow 'orders': 30 -> 45" in output
    assert (
        "Detected changed option max_attempts of step 'ship' of pgflow flow 'orders': "
        "None -> 5" in output
    )
    assert "Detected added pgflow flow 'returns'" in output
    project.run("upgrade", "head")

    project.flows("v3")
    refused = project.run("revision", "--autogenerate", "-m", "structure", ok=False)
    _failed_line(
        refused,
        "flow 'orders' changed structure (step 'invoice' is in code but not in the database)",
        "recreate={'orders'}",
    )
    recreated = project.run(
        "revision", "--autogenerate", "-m", "recreate", env={"RECREATE_FLOWS": "orders"}
    )
    output = recreated.stdout + recreated.stderr
    assert "Detected removed pgflow flow 'orders' (to recreate it" in output
    assert "Detected added pgflow flow 'orders'" in output


def test_offline_upgrade_of_an_outdated_install(
    empty_db_url: str, second_db_url: str, tmp_path: Path
) -> None:
    """An UpgradePgflowOp printed offline brings a copy of the outdated database to the
    state the online upgrade gives."""
    from pgflow_sa import install_schema
    from pgflow_sa.schema import migrations

    stop = migrations()[9].name
    for url in (empty_db_url, second_db_url):
        install_schema(url, upto=stop)
    project = Project(tmp_path, "generic", empty_db_url)
    written = project.run("revision", "--autogenerate", "-m", "upgrade pgflow")
    assert "Detected pgflow upgrade (pgflow older -> 0.8.1, " in written.stdout + written.stderr
    offline = project.run("upgrade", "head", "--sql")
    project.run("upgrade", "head")
    _psql(second_db_url, offline.stdout)
    assert check_schema(second_db_url).state is SchemaState.INSTALLED
    assert snapshot(second_db_url) == snapshot(empty_db_url)
    assert _rows(second_db_url) == _rows(empty_db_url)


def test_include_name_keeps_alembic_off_the_pgflow_schemas(db_url: str) -> None:
    """With include_schemas=True Alembic compares every schema with the app's metadata
    and would drop pgflow's and pgmq's tables; alembic_ext.include_name leaves them out."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import alembic_ext
    from pgflow_sa._db import sync_engine

    def diff(**opts: object) -> list[object]:
        engine = sync_engine(db_url)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_schemas": True, **opts})
            found = list(compare_metadata(context, sa.MetaData()))
        engine.dispose()
        return found

    removed = [d[1].schema for d in diff() if isinstance(d, tuple) and d[0] == "remove_table"]
    if removed:  # SQLAlchemy 2.0.30 does not see schemas named pg* (sqlalchemy#13472)
        assert {"pgflow", "pgmq"} <= set(removed)
    assert diff(include_name=alembic_ext.include_name) == []


def test_installing_onto_an_installed_pgflow_is_a_failed_line(
    empty_db_url: str, tmp_path: Path
) -> None:
    """pgflow installed (by `pgflow-sa install`) after the migration was written: the
    migration's install says so instead of failing half-way with a traceback."""
    from pgflow_sa import install_schema

    project = Project(tmp_path, "generic", empty_db_url)
    project.revision("pgflow")
    install_schema(empty_db_url)
    refused = project.run("upgrade", "head", ok=False)
    _failed_line(refused, "pgflow is already installed in this database", "InstallPgflowOp")


def test_migrations_written_with_pgmq_true_still_work(empty_db_url: str, tmp_path: Path) -> None:
    """Earlier versions wrote InstallPgflowOp(..., pgmq=True): online it installs pgmq
    the way the server allows; offline it asks for an explicit choice."""
    project = Project(tmp_path, "generic", empty_db_url)
    project.revision("pgflow")
    [path] = (tmp_path / "migrations" / "versions").glob("*.py")
    text = path.read_text()
    start = text.index("pgmq=", text.index("InstallPgflowOp"))
    end = text.index(",", start)
    path.write_text(text[:start] + "pgmq=True" + text[end:])
    offline = project.run("upgrade", "head", "--sql", ok=False)
    _failed_line(offline, "pgmq=True", "pgmq='extension'", "pgmq='sql'")
    project.run("upgrade", "head")
    assert check_schema(empty_db_url).state is SchemaState.INSTALLED
