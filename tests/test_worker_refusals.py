"""A worker whose database role may not store a task's error: it says so a bounded
number of times, hands the task back for later, keeps working and stops cleanly; once
the grant is fixed the task fails as it should."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy.engine import make_url

from pgflow_sa import deploy_flows
from pgflow_sa.schema import grant_roles

from .apps import refusals_app
from .helpers import CLI

APPS = Path(__file__).parent / "apps"
APP = "refusals_app:flows"
SHUTDOWN_TIMEOUT = 2.0
#: shutdown_timeout, then the worker's SETTLE_GRACE and CLOSE_GRACE, then exiting
SHUTDOWN_BOUND = SHUTDOWN_TIMEOUT + 3.0 + 1.0 + 2.0
FAST_ENV = {
    "PGFLOW_SA_WORKER_POLL_INTERVAL": "0.5",
    "PGFLOW_SA_WORKER_FALLBACK_POLL_INTERVAL": "0.05",
    "PGFLOW_SA_WORKER_HEARTBEAT_INTERVAL": "0.3",
    # orphans are looked for often: a task left started would be taken back at once
    "PGFLOW_SA_WORKER_RECOVERY_INTERVAL": "0.3",
    "PGFLOW_SA_WORKER_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
}


def _as_user(url: str, user: str) -> str:
    """The same database, logged in as ``user`` (the test servers trust local logins)."""
    return make_url(url).set(username=user, password=None).render_as_string(hide_password=False)


def _admin(url: str, statement: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


@dataclass
class Roles:
    worker: str  # the group role `pgflow-sa roles` grants
    client: str
    login: str  # the worker's login: a member of ``worker``

    @property
    def all(self) -> list[str]:
        return [self.worker, self.client, self.login]


@pytest.fixture
def roles(db_url: str) -> Iterator[Roles]:
    """Cluster-wide role names unique to the test, dropped at the end."""
    suffix = uuid.uuid4().hex[:10]
    names = Roles(f"w_{suffix}", f"c_{suffix}", f"lw_{suffix}")
    try:
        yield names
    finally:
        existing = [
            row[0]
            for row in _admin(
                db_url, "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [names.all]
            )
        ]
        if existing:
            listed = sql.SQL(", ").join(sql.Identifier(n) for n in existing)
            _admin(db_url, sql.SQL("DROP OWNED BY {}").format(listed))
            _admin(db_url, sql.SQL("DROP ROLE {}").format(listed))


class WorkerProcess:
    """`pgflow-sa worker` serving refusals_app's flows, logged in as ``url``'s user."""

    def __init__(self, url: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
        env.update(FAST_ENV, PYTHONPATH=str(APPS))
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [CLI, "worker", APP, "--database-url", url],
            env=env,
            cwd=APPS,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> tuple[int, float, str]:
        """SIGTERM; the exit code, the seconds it took to exit, the log. A worker that
        is still running after twice its bound is killed (code -9)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(2 * SHUTDOWN_BOUND)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        elapsed = time.monotonic() - started
        self._file.close()
        return code, elapsed, self.log.read_text()


def _wait_logged(worker: WorkerProcess, text: str, count: int, timeout: float = 60) -> None:
    """Until ``text`` is in ``count`` lines of the worker's log, then a little longer
    (time for a further attempt that must not come)."""
    deadline = time.monotonic() + timeout
    while len(_lines(worker.log.read_text(), text)) < count:
        assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s)"
        time.sleep(0.1)
    time.sleep(1.5)


def _refuse(db_url: str, roles: Roles, columns: str) -> str:
    """Deploy the flows, grant the roles, take UPDATE of ``columns`` of
    pgflow.step_tasks from the worker role; the worker login's URL."""
    deploy_flows(db_url, refusals_app.flows)
    grant_roles(db_url, roles.worker, roles.client)
    worker_role, login = sql.Identifier(roles.worker), sql.Identifier(roles.login)
    _admin(db_url, sql.SQL("CREATE ROLE {} LOGIN").format(login))
    _admin(db_url, sql.SQL("GRANT {} TO {}").format(worker_role, login))
    revoke = f"REVOKE UPDATE ({columns}) ON pgflow.step_tasks FROM {{}}"
    _admin(db_url, sql.SQL(revoke).format(worker_role))
    return _as_user(db_url, roles.login)


def _start(url: str, flow: str, input: Any) -> uuid.UUID:
    rows = _admin(url, "SELECT run_id FROM pgflow.start_flow(%s, %s)", [flow, Jsonb(input)])
    return uuid.UUID(str(rows[0][0]))


def _tasks(url: str, run_id: uuid.UUID, flow: str) -> list[dict[str, Any]]:
    rows = _admin(
        url,
        sql.SQL(
            """
            SELECT st.status, st.attempts_count, st.last_worker_id, st.error_message,
                   q.vt > now() + interval '30 seconds' AS hidden_for_a_while
            FROM pgflow.step_tasks st
            LEFT JOIN pgmq.{} q ON q.msg_id = st.message_id
            WHERE st.run_id = %s
            ORDER BY st.task_index
            """
        ).format(sql.Identifier(f"q_{flow}")),
        [run_id],
    )
    keys = ("status", "attempts_count", "last_worker_id", "error_message", "hidden")
    return [dict(zip(keys, row, strict=True)) for row in rows]


#: a task handed back: queued, its attempt not counted, its message hidden for a while
HANDED_BACK = {
    "status": "queued",
    "attempts_count": 0,
    "last_worker_id": None,
    "error_message": None,
    "hidden": True,
}


def _wait_finished(url: str, run_id: uuid.UUID, timeout: float) -> tuple[str, str | None]:
    """Wait for the run to finish; its status and the error of its failed step."""
    deadline = time.monotonic() + timeout
    while True:
        status, error = _admin(
            url,
            "SELECT r.status, (SELECT ss.error_message FROM pgflow.step_states ss "
            "WHERE ss.run_id = r.run_id AND ss.status = 'failed') "
            "FROM pgflow.runs r WHERE r.run_id = %s",
            [run_id],
        )[0]
        if status != "started" or time.monotonic() > deadline:
            return status, error
        time.sleep(0.1)


def _assert_stopped_cleanly(code: int, stop_seconds: float, log: str) -> None:
    assert code == 0, log[-3000:]
    assert stop_seconds < SHUTDOWN_BOUND, f"stopping took {stop_seconds:.1f} s"
    assert "waiting up to" not in log  # nothing was still settling when it stopped


def _lines(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def test_a_failure_the_database_refuses_to_store_is_handed_back_not_retried_forever(
    db_url: str, roles: Roles, tmp_path: Path
) -> None:
    # pgflow.fail_task writes error_message: every failure of this role is refused
    url = _refuse(db_url, roles, "error_message")
    run_id = _start(db_url, "refusals_boom", {})

    worker = WorkerProcess(url, tmp_path / "refused.log")
    _wait_logged(worker, "handing it back", 1)
    code, stop_seconds, log = worker.stop()

    refusals = _lines(log, "refused to fail")
    assert len(refusals) == 2, (
        f"{len(refusals)} refusals logged, {len(log)} characters:\n{log[:3000]}"
    )
    assert "permission denied" in refusals[0]
    assert "pgflow-sa roles" in refusals[1] and "handing it back" in refusals[1]
    assert len(_lines(log, "step explode of flow refusals_boom failed")) == 1  # ran once
    _assert_stopped_cleanly(code, stop_seconds, log)
    assert _tasks(db_url, run_id, "refusals_boom") == [HANDED_BACK]

    # once the role may store errors, the task is run again and fails as it should
    grant = "GRANT UPDATE (error_message) ON pgflow.step_tasks TO {}"
    _admin(db_url, sql.SQL(grant).format(sql.Identifier(roles.worker)))
    _admin(db_url, "SELECT pgmq.set_vt('refusals_boom', msg_id, 0) FROM pgmq.q_refusals_boom")
    worker = WorkerProcess(url, tmp_path / "granted.log")
    try:
        finished = _wait_finished(db_url, run_id, timeout=30)
    finally:
        code, _, log = worker.stop()
    assert code == 0, log[-3000:]
    assert "refused" not in log
    assert finished == ("failed", "RuntimeError: boom")
    [task] = _tasks(db_url, run_id, "refusals_boom")
    assert (task["status"], task["attempts_count"]) == ("failed", 1)
    assert task["error_message"] == "RuntimeError: boom"


def test_refused_completions_of_several_tasks_are_failed_then_handed_back_one_by_one(
    db_url: str, roles: Roles, tmp_path: Path
) -> None:
    # complete_task writes output, fail_task error_message: neither can settle a task
    url = _refuse(db_url, roles, "output, error_message")
    run_id = _start(db_url, "refusals_spread", [1, 2, 3])

    worker = WorkerProcess(url, tmp_path / "refused.log")
    _wait_logged(worker, "handing it back", 3)
    code, stop_seconds, log = worker.stop()

    assert len(_lines(log, "refused to complete")) == 3, log[:3000]
    assert len(_lines(log, "refused to fail")) == 2 * 3, log[:3000]
    assert len(_lines(log, "handing it back")) == 3
    _assert_stopped_cleanly(code, stop_seconds, log)
    assert _tasks(db_url, run_id, "refusals_spread") == [HANDED_BACK] * 3
