"""`pgflow-sa roles`: a worker role and a client role with just what they need, tried
with a real worker process and a real client logged in as roles that have nothing
else."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from pgflow_sa import (
    RunStatus,
    deploy_flows,
    flow_status,
    get_run,
    list_runs,
    start_flow,
    to_sqlalchemy_url,
    wait_for_run,
)
from pgflow_sa.schema import grant_roles

from .apps import roles_app
from .helpers import CLI, assert_one_line_error, run_cli

APPS = Path(__file__).parent / "apps"
FAST_ENV = {
    "PGFLOW_SA_WORKER_POLL_INTERVAL": "0.5",
    "PGFLOW_SA_WORKER_FALLBACK_POLL_INTERVAL": "0.05",
    "PGFLOW_SA_WORKER_HEARTBEAT_INTERVAL": "0.3",
    "PGFLOW_SA_WORKER_RECOVERY_INTERVAL": "0.3",
}


def as_user(url: str, user: str) -> str:
    """The same database, logged in as ``user`` (the test servers trust local logins)."""
    return make_url(url).set(username=user, password=None).render_as_string(hide_password=False)


@dataclass
class Roles:
    worker: str  # group roles made by `pgflow-sa roles`
    client: str
    worker_login: str  # login roles: members of them, or of nothing
    client_login: str
    stranger: str

    @property
    def all(self) -> list[str]:
        return [self.worker, self.client, self.worker_login, self.client_login, self.stranger]


def _admin(url: str, statement: Any) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
def roles(db_url: str) -> Iterator[Roles]:
    """Cluster-wide role names unique to the test; the login roles exist, the group
    roles are for `pgflow-sa roles` to create. All are dropped at the end (their
    privileges live in the test database, which still exists then)."""
    suffix = uuid.uuid4().hex[:10]
    names = Roles(*(f"{kind}_{suffix}" for kind in ("w", "c", "lw", "lc", "lx")))
    for login in (names.worker_login, names.client_login, names.stranger):
        _admin(db_url, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(login)))
    try:
        yield names
    finally:
        with psycopg.connect(db_url) as conn:
            found = conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [names.all]
            )
            existing = [row[0] for row in found]
        if existing:
            listed = sql.SQL(", ").join(sql.Identifier(n) for n in existing)
            _admin(db_url, sql.SQL("DROP OWNED BY {}").format(listed))
            _admin(db_url, sql.SQL("DROP ROLE {}").format(listed))


def _grant_logins(db_url: str, roles: Roles) -> None:
    _admin(
        db_url,
        sql.SQL("GRANT {} TO {}; GRANT {} TO {}").format(
            sql.Identifier(roles.worker),
            sql.Identifier(roles.worker_login),
            sql.Identifier(roles.client),
            sql.Identifier(roles.client_login),
        ),
    )


def _roles_command(db_url: str, roles: Roles, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "roles",
        "--worker-role",
        roles.worker,
        "--client-role",
        roles.client,
        "--database-url",
        db_url,
        *extra,
    )


class WorkerProcess:
    """`pgflow-sa worker` serving roles_app's flows, logged in as ``url``'s user."""

    def __init__(self, url: str, app: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
        env.update(FAST_ENV, PYTHONPATH=str(APPS))
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [CLI, "worker", app, "--database-url", url],
            env=env,
            cwd=APPS,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._file.close()
        return code, self.log.read_text()


def _start_runs(url: str, runs: list[tuple[str, Any]]) -> list[uuid.UUID]:
    """Start runs with pgflow_sa.start_flow, all in one transaction of ``url``'s user."""
    engine = create_engine(to_sqlalchemy_url(url, "psycopg"), poolclass=NullPool)
    with Session(engine) as session, session.begin():
        return [start_flow(session, flow, value).run_id for flow, value in runs]


def _finished(url: str, run_ids: list[uuid.UUID]) -> list[tuple[RunStatus, Any, str | None]]:
    """Wait for the runs and read them, as ``url``'s user: (status, output, error)."""
    engine = create_engine(to_sqlalchemy_url(url, "psycopg"), poolclass=NullPool)
    finished = [wait_for_run(engine, run_id, timeout=30) for run_id in run_ids]
    with engine.connect() as conn:
        runs = [get_run(conn, run.run_id) for run in finished]
        assert {r.run_id for r in list_runs(conn, limit=50).runs} >= set(run_ids)
        assert flow_status(conn)
    return [(r.status, r.output, r.error) for r in runs if r is not None]


def test_worker_and_client_roles_serve_flows_deployed_before(
    db_url: str, roles: Roles, tmp_path: Path
) -> None:
    deploy_flows(db_url, roles_app.flows)
    done = _roles_command(db_url, roles)
    assert done.returncode == 0, done.stderr
    assert f"created role {roles.worker} (NOLOGIN)" in done.stdout
    assert f"created role {roles.client} (NOLOGIN)" in done.stdout
    assert "flows deployed so far: roles_doomed, roles_greet" in done.stdout
    _grant_logins(db_url, roles)
    client_url = as_user(db_url, roles.client_login)
    run_ids = _start_runs(
        client_url,
        [
            ("roles_greet", {"names": ["Ada", "Alan"]}),
            ("roles_greet", {"names": []}),  # an empty map
            ("roles_greet", {"names": "Ada"}),  # no array for the map: pgflow fails the run
            ("roles_doomed", {}),
        ],
    )
    worker = WorkerProcess(as_user(db_url, roles.worker_login), "roles_app:flows", tmp_path / "w")
    try:
        finished = _finished(client_url, run_ids)
    finally:
        code, log = worker.stop()
    assert code == 0, log
    assert "permission denied" not in log
    greeted, empty, not_an_array, doomed = finished
    assert greeted == (RunStatus.COMPLETED, {"letter": "Hello, Ada! Hello, Alan!"}, None)
    assert empty == (RunStatus.COMPLETED, {"letter": ""}, None)
    assert not_an_array[0] is RunStatus.FAILED and "TYPE_VIOLATION" in str(not_an_array[2])
    assert doomed == (RunStatus.FAILED, None, "RuntimeError: boom")
    for command in (["status"], ["runs", "show", str(run_ids[0])]):
        shown = run_cli(*command, "--database-url", client_url)
        assert shown.returncode == 0, shown.stderr


def test_flows_deployed_after_the_roles_work_for_both_roles(
    db_url: str, roles: Roles, tmp_path: Path
) -> None:
    assert _roles_command(db_url, roles).returncode == 0
    deploy_flows(db_url, roles_app.later)  # new queue tables: default privileges
    again = grant_roles(db_url, roles.worker, roles.client)  # idempotent
    assert again.created == [] and again.queues == ["roles_late"]
    _grant_logins(db_url, roles)
    client_url = as_user(db_url, roles.client_login)
    run_ids = _start_runs(client_url, [("roles_late", [1, 2, 3]), ("roles_late", [])])
    worker = WorkerProcess(as_user(db_url, roles.worker_login), "roles_app:later", tmp_path / "w")
    try:
        finished = _finished(client_url, run_ids)
    finally:
        code, log = worker.stop()
    assert code == 0, log
    assert "permission denied" not in log
    assert finished == [
        (RunStatus.COMPLETED, {"total": 12}, None),
        (RunStatus.COMPLETED, {"total": 0}, None),
    ]


def _denied(url: str, statement: str, params: Any = None) -> str:
    """The statement, run as ``url``'s user, fails for lack of privileges; the message."""
    with (
        psycopg.connect(url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege) as denied,
    ):
        conn.execute(statement, params)
    return str(denied.value)


def test_a_login_without_the_roles_can_neither_read_nor_start_runs(
    db_url: str, roles: Roles
) -> None:
    deploy_flows(db_url, roles_app.flows)
    with psycopg.connect(db_url) as conn:
        run_id = conn.execute(
            "SELECT run_id FROM pgflow.start_flow('roles_greet', '{\"names\": [\"Ada\"]}')"
        ).fetchone()[0]
    assert _roles_command(db_url, roles).returncode == 0
    _grant_logins(db_url, roles)
    stranger = as_user(db_url, roles.stranger)
    assert "schema pgflow" in _denied(stranger, "SELECT input FROM pgflow.runs")
    # SECURITY DEFINER upstream: it would read as its owner, but the schema stops it
    assert "schema pgflow" in _denied(stranger, "SELECT pgflow.get_run_with_states(%s)", [run_id])
    assert "schema pgflow" in _denied(stranger, "SELECT pgflow.start_flow('roles_greet', '{}')")
    assert "schema pgmq" in _denied(stranger, "SELECT * FROM pgmq.q_roles_greet")


def test_the_client_role_cannot_work_tasks_delete_runs_or_create_flows(
    db_url: str, roles: Roles
) -> None:
    deploy_flows(db_url, roles_app.flows)
    assert _roles_command(db_url, roles).returncode == 0
    _grant_logins(db_url, roles)
    client = as_user(db_url, roles.client_login)
    run_id = _start_runs(client, [("roles_greet", {"names": ["Ada"]})])[0]
    assert "table step_tasks" in _denied(
        client, "SELECT pgflow.complete_task(%s, 'names', 0, '[]')", [run_id]
    )
    assert "table q_roles_greet" in _denied(client, "SELECT * FROM pgmq.read('roles_greet', 30, 1)")
    assert "table runs" in _denied(client, "DELETE FROM pgflow.runs")
    assert "table flows" in _denied(client, "SELECT pgflow.create_flow('roles_new')")
    assert "schema pgflow" in _denied(client, "CREATE TABLE pgflow.mine (id int)")
    worker = as_user(db_url, roles.worker_login)
    # workers start the runs of schedules, but cannot change what a schedule is
    assert "table schedules" in _denied(worker, "UPDATE pgflow_sa.schedules SET paused = true")
    assert "table schedules" in _denied(client, "UPDATE pgflow_sa.schedules SET cron = '* * * * *'")
    assert "table runs" in _denied(worker, "DELETE FROM pgflow.runs")
    assert "table flows" in _denied(worker, "SELECT pgflow.create_flow('roles_new')")


def _grants_of(url: str, names: list[str]) -> tuple[int, int, int]:
    """How many roles of these names exist, and the table privileges and default
    privileges granted to them."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM pg_roles WHERE rolname = ANY(%(n)s)),
                   (SELECT count(*) FROM information_schema.role_table_grants
                     WHERE grantee = ANY(%(n)s)),
                   (SELECT count(*) FROM pg_default_acl d, aclexplode(d.defaclacl) a
                     JOIN pg_roles r ON r.oid = a.grantee WHERE r.rolname = ANY(%(n)s))
            """,
            {"n": names},
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_roles_sql_prints_the_statements_and_changes_nothing(db_url: str, roles: Roles) -> None:
    deploy_flows(db_url, roles_app.flows)
    before = _grants_of(db_url, roles.all)
    printed = _roles_command(db_url, roles, "--sql")
    assert printed.returncode == 0, printed.stderr
    assert _grants_of(db_url, roles.all) == before
    assert f'CREATE ROLE "{roles.worker}" NOLOGIN' in printed.stdout
    assert f'GRANT USAGE ON SCHEMA pgflow TO "{roles.client}"' in printed.stdout
    assert "ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq" in printed.stdout
    with psycopg.connect(db_url) as conn:  # what it prints is a script that works
        conn.execute(printed.stdout)
    roles_made, table_grants, default_privileges = _grants_of(db_url, roles.all)
    assert roles_made == before[0] + 2
    assert table_grants > before[1] and default_privileges > before[2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--worker-role", "Workers"], "worker role name 'Workers' is not a simple identifier"),
        (["--client-role", "app; DROP TABLE x", "--sql"], "client role name 'app; DROP TABLE x'"),
        (["--client-role", "pg_app"], "not starting with pg_"),
        (["--worker-role", "same", "--client-role", "same"], "must differ (both are 'same')"),
    ],
)
def test_a_bad_role_name_is_a_one_line_error(options: list[str], message: str) -> None:
    proc = run_cli("roles", *options, "--database-url", "postgresql://nowhere/x")
    assert_one_line_error(proc, message)


def test_roles_refuses_without_pgflow_and_with_missing_roles_under_no_create(
    empty_db_url: str, db_url: str, roles: Roles
) -> None:
    assert_one_line_error(_roles_command(empty_db_url, roles), "pgflow is not installed")
    missing = _roles_command(db_url, roles, "--no-create")
    assert_one_line_error(missing, f"role(s) {roles.worker}, {roles.client} do not exist")
    assert _grants_of(db_url, roles.all)[0] == 3  # only the fixture's login roles


async def test_the_worker_role_fires_schedules_and_the_client_role_manages_them(
    db_url: str, roles: Roles
) -> None:
    from datetime import datetime, timezone

    from pgflow_sa import (
        async_engine_from_url,
        fire_due_schedules,
        list_schedules,
        pause_schedule,
        resume_schedule,
        trigger_schedule,
    )

    greet = roles_app.flows.get("roles_greet")
    schedule = greet.schedule("0 * * * *", name="roles_hourly", input={"names": ["Ada"]})
    try:
        deploy_flows(db_url, roles_app.flows)
    finally:
        greet._schedules.pop(schedule.name)
    assert _roles_command(db_url, roles).returncode == 0
    _grant_logins(db_url, roles)
    engine = async_engine_from_url(as_user(db_url, roles.worker_login))
    try:
        await fire_due_schedules(engine, datetime(2026, 1, 1, 11, 30, tzinfo=timezone.utc))
        fired = await fire_due_schedules(engine, datetime(2026, 1, 1, 12, tzinfo=timezone.utc))
    finally:
        await engine.dispose()
    assert [f.error for f in fired] == [None]
    client = as_user(db_url, roles.client_login)
    pause_schedule(client, "roles_hourly")
    resume_schedule(client, "roles_hourly")
    assert trigger_schedule(client, "roles_hourly") is not None
    assert [s.name for s in list_schedules(client)] == ["roles_hourly"]
