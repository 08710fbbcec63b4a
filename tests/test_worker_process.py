"""`pgflow-sa worker` as a real process: signals, SIGKILL mid-task, database outages."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .apps.worker_app import EXECUTIONS_DDL, durable
from .helpers import CLI, assert_one_line_error, run_cli
from .worker_harness import deploy

APPS = Path(__file__).parent / "apps"
FAST_ENV = {
    "PGFLOW_SA_WORKER_POLL_INTERVAL": "0.5",
    "PGFLOW_SA_WORKER_FALLBACK_POLL_INTERVAL": "0.05",
    "PGFLOW_SA_WORKER_HEARTBEAT_INTERVAL": "0.3",
    "PGFLOW_SA_WORKER_RECOVERY_INTERVAL": "0.5",
    "PGFLOW_SA_WORKER_STALL_MARGIN": "1",
    "PGFLOW_SA_WORKER_MAX_BACKOFF": "0.5",
}


class WorkerProcess:
    def __init__(
        self,
        url: str,
        log: Path,
        extra_env: dict[str, str] | None = None,
        app: str = "worker_app:flows",
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
        env.update(FAST_ENV)
        env.update(extra_env or {})
        env["PYTHONPATH"] = str(APPS)
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [CLI, "worker", app, "--database-url", url, "--log-level", "DEBUG"],
            env=env,
            cwd=APPS,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        if not self._file.closed:
            self._file.flush()
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._file.close()
        return code


@pytest.fixture
def prepared(db_url: str) -> str:
    deploy(db_url, durable)
    with psycopg.connect(db_url) as conn:
        conn.execute(EXECUTIONS_DDL)
    return db_url


def _start_runs(url: str, count: int, items: int) -> list[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return [
            conn.execute(
                "SELECT run_id FROM pgflow.start_flow('durable', %s)", [Jsonb({"items": items})]
            ).fetchone()[0]
            for _ in range(count)
        ]


def _wait_all_finished(url: str, runs: list[uuid.UUID], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM pgflow.runs WHERE run_id = ANY(%s) GROUP BY status",
                [runs],
            ).fetchall()
        statuses = dict(rows)
        if statuses.get("started", 0) == 0 or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def _executions_per_task(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return sorted(
            {
                r[0]
                for r in conn.execute(
                    "SELECT count(*) FROM executions GROUP BY run_id, step_slug, task_index"
                )
            }
        )


def test_worker_process_starts_serves_and_stops_on_sigterm(prepared: str, tmp_path: Path) -> None:
    worker = WorkerProcess(prepared, tmp_path / "w.log")
    try:
        runs = _start_runs(prepared, 5, 3)
        assert _wait_all_finished(prepared, runs, 60) == {"completed": 5}
    finally:
        code = worker.stop(signal.SIGTERM)
    out = worker.output()
    assert code == 0, out
    assert "worker for worker_app:flows" in out
    assert "flow durable: queue durable, 3 step(s), worker id " in out
    assert "max_concurrency=10" in out
    assert out.rstrip().endswith("worker stopped")
    assert _executions_per_task(prepared) == [1]


def test_sigkill_mid_task_loses_nothing_and_runs_nothing_twice(
    prepared: str, tmp_path: Path
) -> None:
    first = WorkerProcess(prepared, tmp_path / "first.log", {"TEST_STEP_SLEEP": "0.3"})
    runs = _start_runs(prepared, 10, 4)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill it while it has tasks started
        with psycopg.connect(prepared) as conn:
            started = conn.execute(
                "SELECT count(*) FROM pgflow.step_tasks WHERE status = 'started'"
            ).fetchone()[0]
        if started >= 3:
            break
        time.sleep(0.02)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    with psycopg.connect(prepared) as conn:
        orphaned = conn.execute(
            "SELECT count(*) FROM pgflow.step_tasks WHERE status = 'started'"
        ).fetchone()[0]
    assert orphaned >= 1

    second = WorkerProcess(prepared, tmp_path / "second.log")
    try:
        assert _wait_all_finished(prepared, runs, 90) == {"completed": 10}, second.output()
    finally:
        assert second.stop() == 0, second.output()
    # every task's effects committed exactly once, though some ran twice (once killed)
    assert _executions_per_task(prepared) == [1]
    with psycopg.connect(prepared) as conn:
        recovered = conn.execute(
            "SELECT count(*) FROM pgflow.step_tasks WHERE error_message LIKE 'Stalled:%'"
        ).fetchone()[0]
    assert recovered >= orphaned


def test_database_outages_are_survived(prepared: str, tmp_path: Path) -> None:
    worker = WorkerProcess(prepared, tmp_path / "w.log", {"TEST_STEP_SLEEP": "0.01"})
    try:
        runs = _start_runs(prepared, 40, 3)
        database = prepared.rsplit("/", 1)[1].split("?")[0]
        killed = 0
        with psycopg.connect(prepared, autocommit=True) as admin:
            for _ in range(12):
                time.sleep(0.3)
                killed += admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                    [database],
                ).fetchone()[0]
        assert killed > 0
        assert worker.proc.poll() is None, worker.output()
        assert _wait_all_finished(prepared, runs, 120) == {"completed": 40}, worker.output()
    finally:
        code = worker.stop()
    assert code == 0, worker.output()
    assert _executions_per_task(prepared) == [1]


def test_worker_startup_errors(db_url: str, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(APPS)}
    missing = run_cli("worker", "worker_app:flows", "--database-url", db_url, env=env, cwd=APPS)
    assert missing.returncode == 1
    first_line = missing.stderr.splitlines()
    assert any(
        line.startswith("error: flow(s) 'durable' are not in the database") for line in first_line
    )
    assert "Traceback" not in missing.stderr

    assert_one_line_error(
        run_cli(
            "worker",
            "worker_app:flows",
            "--flow",
            "nope",
            "--database-url",
            db_url,
            env=env,
            cwd=APPS,
        ),
        "no flow 'nope' in this APP (its flows: durable)",
    )
    deployed = run_cli(
        "flows", "deploy", "worker_app:flows", "--database-url", db_url, env=env, cwd=APPS
    )
    assert deployed.returncode == 0, deployed.stderr
    assert deployed.stdout.splitlines() == ["created durable"]
    again = run_cli(
        "flows", "deploy", "worker_app:flows", "--database-url", db_url, env=env, cwd=APPS
    )
    assert again.stdout.splitlines() == ["unchanged durable"]
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE pgflow.flows SET opt_timeout = 99 WHERE flow_slug = 'durable'")
    differs = run_cli("worker", "worker_app:flows", "--database-url", db_url, env=env, cwd=APPS)
    assert differs.returncode == 1
    assert "  durable: options: flow option timeout: database has 99, code has 3" in differs.stderr
    conflict = run_cli(
        "flows", "deploy", "worker_app:flows", "--database-url", db_url, env=env, cwd=APPS
    )
    assert_one_line_error(
        conflict, "flows in the database differ from the code, nothing was deployed"
    )
