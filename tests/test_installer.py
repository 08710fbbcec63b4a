"""The installer on a real server: fresh, repeated, concurrent, upgrade, foreign schemas, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pgflow_sa import (
    InstallError,
    SchemaFilesMissingError,
    SchemaState,
    _upstream,
    check_schema,
    install_schema,
)
from pgflow_sa._db import sync_engine
from pgflow_sa.schema import installer, migrations

from .helpers import assert_one_line_error, run_cli, snapshot

ALL = migrations()
PGFLOW_TABLES = {"flows", "steps", "deps", "runs", "step_states", "step_tasks", "workers"}


def _tables(url: str, schema: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema])
        return {r[0] for r in rows}


def _recorded(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (r[0], r[1])
            for r in conn.execute(
                "SELECT name, pgflow_version FROM pgflow_sa.schema_migrations ORDER BY name"
            )
        ]


def test_fresh_install_records_every_migration(empty_db_url: str, server_kind: str) -> None:
    before = check_schema(empty_db_url)
    assert before.state is SchemaState.MISSING
    assert before.pending == tuple(m.name for m in ALL)

    report = install_schema(empty_db_url)

    assert report.changed
    assert report.status_after.state is SchemaState.INSTALLED
    assert report.status_after.installed_version == "0.8.1"
    assert report.status_after.managed_by == "pgflow-sa"
    assert _tables(empty_db_url, "pgflow") == PGFLOW_TABLES
    assert _recorded(empty_db_url) == [(m.name, "0.8.1") for m in ALL]
    assert len(ALL) == 12
    expected_pgmq = "extension 1.13.0" if server_kind == "extension" else "sql-only"
    assert report.status_after.pgmq == expected_pgmq
    assert report.status_after.realtime_send == "pgflow-sa"
    assert any(a.startswith("pgflow: applied 12 migration(s)") for a in report.actions)


def test_second_install_is_a_no_op(empty_db_url: str) -> None:
    install_schema(empty_db_url)
    digest = snapshot(empty_db_url)
    recorded = _recorded(empty_db_url)

    report = install_schema(empty_db_url)

    assert not report.changed
    assert report.status_before.state is SchemaState.INSTALLED
    assert snapshot(empty_db_url) == digest
    assert _recorded(empty_db_url) == recorded


def test_concurrent_installs_apply_once(empty_db_url: str) -> None:
    reports: list[installer.InstallReport] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        try:
            reports.append(install_schema(empty_db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert errors == []
    assert len(reports) == 3
    assert sum(r.changed for r in reports) == 1
    assert all(r.status_after.state is SchemaState.INSTALLED for r in reports)
    assert len(_recorded(empty_db_url)) == 12


def test_upgrade_applies_only_missing_migrations(empty_db_url: str) -> None:
    install_schema(empty_db_url, upto=ALL[9].name)
    staged = check_schema(empty_db_url)
    assert staged.state is SchemaState.OUTDATED
    assert staged.installed_version is None
    assert staged.pending == (ALL[10].name, ALL[11].name)

    report = install_schema(empty_db_url)

    assert report.actions[-1] == "pgflow: applied 2 migration(s) of pgflow 0.8.1"
    assert not any(a.startswith(("pgmq", "realtime")) for a in report.actions)
    assert report.status_after.state is SchemaState.INSTALLED
    assert [name for name, _ in _recorded(empty_db_url)] == [m.name for m in ALL]


def test_unknown_upto_migration_is_refused(empty_db_url: str) -> None:
    with pytest.raises(InstallError, match=r"unknown pgflow migration 'nope' for pgflow 0\.8\.1"):
        install_schema(empty_db_url, upto="nope")
    assert check_schema(empty_db_url).state is SchemaState.MISSING


def test_dropped_pgflow_schema_is_reinstalled(empty_db_url: str) -> None:
    install_schema(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        conn.execute("DROP SCHEMA pgflow CASCADE")
    assert check_schema(empty_db_url).state is SchemaState.MISSING

    report = install_schema(empty_db_url)

    assert report.status_after.state is SchemaState.INSTALLED
    assert _tables(empty_db_url, "pgflow") == PGFLOW_TABLES


def _hand_install(url: str, count: int, server_kind: str) -> None:
    """Install pgflow the way upstream's tooling does: the migration files as they are
    (no pgflow-sa bookkeeping), with a realtime.send of its own."""
    with psycopg.connect(url) as conn:
        if server_kind == "extension":
            conn.execute("CREATE SCHEMA pgmq; CREATE EXTENSION pgmq WITH SCHEMA pgmq")
        else:
            from pgmq.install import get_embedded_install_sql

            conn.execute(get_embedded_install_sql().encode())
        conn.execute(
            b"CREATE SCHEMA realtime; CREATE FUNCTION realtime.send(payload jsonb, event text, "
            b"topic text, private boolean DEFAULT true) RETURNS void LANGUAGE sql AS $$ SELECT $$"
        )
        for migration in ALL[:count]:
            script = migration.sql
            if server_kind != "extension":
                script = script.replace(installer._PGFLOW_CREATE_PGMQ, "")
            conn.execute(script.encode())


def test_hand_installed_pgflow_is_left_alone(empty_db_url: str, server_kind: str) -> None:
    _hand_install(empty_db_url, len(ALL), server_kind)
    digest = snapshot(empty_db_url)

    status = check_schema(empty_db_url)
    assert status.state is SchemaState.INSTALLED
    assert status.managed_by == "external"
    assert status.realtime_send == "external"

    report = install_schema(empty_db_url)
    assert not report.changed
    assert snapshot(empty_db_url) == digest
    assert "pgflow_sa" not in _schemas(empty_db_url)

    proc = run_cli("install", "--database-url", empty_db_url)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert snapshot(empty_db_url) == digest


def test_older_foreign_pgflow_is_refused_unchanged(empty_db_url: str, server_kind: str) -> None:
    _hand_install(empty_db_url, len(ALL) - 1, server_kind)
    digest = snapshot(empty_db_url)
    assert check_schema(empty_db_url).state is SchemaState.OUTDATED

    proc = run_cli("install", "--database-url", empty_db_url)

    assert_one_line_error(proc, "another tool installed", "upgrade it with the tool")
    assert snapshot(empty_db_url) == digest
    check = run_cli("install", "--check", "--database-url", empty_db_url)
    assert check.returncode == 4, check.stdout


def _schemas(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}


def test_existing_realtime_send_is_kept(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(
            b"CREATE SCHEMA realtime; CREATE FUNCTION realtime.send(payload jsonb, event text, "
            b"topic text, private boolean DEFAULT true) RETURNS void LANGUAGE sql AS $$ SELECT $$"
        )
    report = install_schema(empty_db_url)
    assert report.status_after.realtime_send == "external"
    assert not any(a.startswith("realtime") for a in report.actions)
    with psycopg.connect(empty_db_url) as conn:
        row = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'send' "
            "AND pronamespace = 'realtime'::regnamespace"
        ).fetchone()
    assert row is not None
    assert row[0].strip() == "SELECT"


def _hide_pgmq_extension(conn: sa.Connection) -> None:
    """Make the server look like one without the pgmq extension (e.g. RDS)."""
    if conn.execute(sa.text("SHOW server_version_num")).scalar_one() >= "180000":
        conn.execute(sa.text("SET LOCAL extension_control_path = '$system'"))
    assert (
        conn.execute(
            sa.text("SELECT count(*) FROM pg_available_extensions WHERE name = 'pgmq'")
        ).scalar_one()
        == 0
    )


def test_sql_only_pgmq_path_on_any_server(empty_db_url: str) -> None:
    engine = sync_engine(empty_db_url)
    with engine.begin() as conn:
        _hide_pgmq_extension(conn)
        report = installer.install(conn)
    assert "pgmq: installed SQL-only pgmq 1.13.0" in report.actions
    assert report.status_after.pgmq == "sql-only"
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'"
        ).fetchone() == (0,)
        conn.execute("SELECT pgmq.create('q1')")
        assert conn.execute("SELECT count(*) FROM pgmq.send('q1', '{}')").fetchone() == (1,)
    engine.dispose()


def test_no_pgmq_anywhere_names_both_options(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pgmq.install", None)
    engine = sync_engine(empty_db_url)
    with engine.begin() as conn:
        _hide_pgmq_extension(conn)
        with pytest.raises(InstallError) as info:
            installer.install(conn)
    message = str(info.value)
    assert message.startswith("pgmq is not installed in this database and cannot be:")
    assert "CREATE EXTENSION pgmq" in message
    assert "pip install pgmq" in message
    engine.dispose()
    assert check_schema(empty_db_url).state is SchemaState.MISSING


def test_check_exit_codes(empty_db_url: str) -> None:
    missing = run_cli("install", "--check", "--database-url", empty_db_url)
    assert missing.returncode == 3, missing.stderr
    assert "pgflow: missing" in missing.stdout

    install_schema(empty_db_url, upto=ALL[5].name)
    outdated = run_cli("install", "--check", "--database-url", empty_db_url)
    assert outdated.returncode == 4, outdated.stderr
    assert "pgflow: outdated" in outdated.stdout
    assert "pending migrations: 6" in outdated.stdout

    digest = snapshot(empty_db_url)
    assert run_cli("install", "--check", "--database-url", empty_db_url).returncode == 4
    assert snapshot(empty_db_url) == digest

    done = run_cli("install", "--database-url", empty_db_url)
    assert done.returncode == 0, done.stderr
    installed = run_cli("install", "--check", "--database-url", empty_db_url)
    assert installed.returncode == 0
    assert "pgflow: installed (version 0.8.1, managed by pgflow-sa)" in installed.stdout


def test_database_without_plpgsql(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn:
        conn.execute("DROP EXTENSION plpgsql")
    digest = snapshot(empty_db_url)

    proc = run_cli("install", "--database-url", empty_db_url)

    assert_one_line_error(proc, "PL/pgSQL is not available", "CREATE EXTENSION plpgsql")
    assert snapshot(empty_db_url) == digest


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("not-a-url", ["invalid database URL 'not-a-url'", "postgresql://"]),
        ("mysql://root@127.0.0.1/db", ["unsupported database URL scheme 'mysql'"]),
        ("postgresql://postgres@127.0.0.1:1/postgres", ["cannot use the database at"]),
        ("postgresql://nobody:secret@127.0.0.1:1/postgres", ["nobody:***@127.0.0.1:1"]),
    ],
)
def test_bad_urls_give_one_line(url: str, fragments: list[str]) -> None:
    for args in (["install"], ["install", "--check"]):
        proc = run_cli(*args, "--database-url", url)
        line = assert_one_line_error(proc, *fragments)
        assert "secret" not in line


def test_url_from_environment_and_sqlalchemy_form(empty_db_url: str) -> None:
    sqlalchemy_url = empty_db_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    proc = run_cli("install", env={"PGFLOW_SA_DATABASE_URL": sqlalchemy_url})
    assert proc.returncode == 0, proc.stderr
    assert "pgflow: installed" in proc.stdout
    assert "embedded" not in proc.stderr


def test_missing_schema_files_are_reported(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_upstream, "VENDOR_ROOT", tmp_path)
    migrations.cache_clear()
    try:
        with pytest.raises(SchemaFilesMissingError, match="SQL files are missing or damaged"):
            install_schema(empty_db_url)
    finally:
        monkeypatch.undo()
        migrations.cache_clear()
    assert check_schema(empty_db_url).state is SchemaState.MISSING
