"""What the run-control tests share: a database with their flows and the `events`
table the handlers of tests/apps/control_app.py record into, worker processes
serving those flows, runs started by SQL, and waiting for a condition."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy.engine import Engine

from pgflow_sa import Flow, RunStatus, get_run

from .apps.control_app import EVENTS_DDL
from .test_worker_process import APPS, WorkerProcess
from .worker_harness import deploy

ROOT = APPS.parent.parent


def prepare(db_url: str, flows: Iterable[Flow]) -> str:
    """Deploy ``flows`` and create the tables the handlers record into."""
    deploy(db_url, *flows)
    with psycopg.connect(db_url) as conn:
        conn.execute(EVENTS_DDL)
    return db_url


def workers(
    url: str, tmp_path: Path, count: int, app: str = "control_app:flows", **env: str
) -> list[WorkerProcess]:
    """``count`` `pgflow-sa worker APP` processes (apps may import tests.apps.*)."""
    extra = {
        "TEST_DATABASE_URL": url,
        "PGFLOW_SA_WORKER_SHUTDOWN_TIMEOUT": "1",
        "PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)]),
        **env,
    }
    return [WorkerProcess(url, tmp_path / f"w{i}.log", extra, app=app) for i in range(count)]


def stop(processes: list[WorkerProcess]) -> None:
    for process in processes:
        process.stop()
    for process in processes:
        print(process.output())  # shown when the test fails


def start_runs(url: str, flow: str, inputs: list[object]) -> list[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return [
            conn.execute(
                "SELECT run_id FROM pgflow.start_flow(%s, %s)", [flow, Jsonb(value)]
            ).fetchone()[0]
            for value in inputs
        ]


def wait_until(check: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def status(engine: Engine, run_id: uuid.UUID) -> RunStatus | None:
    with engine.begin() as conn:
        run = get_run(conn, run_id, steps=False)
    return None if run is None else run.status


def events(url: str, run_id: uuid.UUID | None = None) -> list[tuple[str, str]]:
    """(step_slug, what) the handlers recorded, of one run or all, in order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT step_slug, what FROM events WHERE %s::uuid IS NULL OR run_id = %s ORDER BY at",
            [run_id, run_id],
        ).fetchall()
    return [(r[0], r[1]) for r in rows]
