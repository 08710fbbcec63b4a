"""Findings of the second adversarial review of run control and the dashboard's
actions, each reproduced through public means (each failed before its fix)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from pgflow_sa import RunStatus, cancel_run, get_run, retry_run, start_flow, to_sqlalchemy_url
from pgflow_sa.dashboard import dashboard_app

from .apps.control_app import EVENTS_DDL
from .apps.review2_app import charge_then_fail, flows
from .test_dashboard import _idle_run, http, serve_asgi
from .test_run_control import wait_until
from .test_worker_process import WorkerProcess
from .worker_harness import deploy


@pytest.fixture
def prepared(db_url: str) -> str:
    deploy(db_url, *flows)
    with psycopg.connect(db_url) as conn:
        conn.execute(EVENTS_DDL)
    return db_url


@pytest.fixture
def engine(prepared: str) -> Iterator[Engine]:
    engine = create_engine(to_sqlalchemy_url(prepared, "psycopg"))
    yield engine
    engine.dispose()


@pytest.fixture
def worker(prepared: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        prepared,
        tmp_path / "worker.log",
        {"TEST_DATABASE_URL": prepared, "PGFLOW_SA_WORKER_SHUTDOWN_TIMEOUT": "1"},
        app="review2_app:flows",
    )
    yield process
    process.stop()
    print(process.output())


def _status(engine: Engine, run_id: uuid.UUID) -> RunStatus | None:
    with engine.begin() as conn:
        run = get_run(conn, run_id, steps=False)
    return None if run is None else run.status


def _charges(url: str) -> int:
    with psycopg.connect(url) as conn:
        (n,) = conn.execute("SELECT count(*) FROM events WHERE step_slug = 'charge'").fetchone()
    return int(n)


def test_a_retry_of_a_reusing_retry_that_never_ran_still_reuses_the_original(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    with psycopg.connect(prepared) as conn:
        conn.execute("INSERT INTO switches VALUES ('last_fails', true)")
    with engine.begin() as conn:
        first = start_flow(conn, charge_then_fail, {}).run_id
    wait_until(lambda: _status(engine, first) is RunStatus.FAILED, what="the failure")
    assert _charges(prepared) == 1
    with psycopg.connect(prepared) as conn:
        conn.execute("UPDATE switches SET value = false")
    with engine.begin() as conn:  # a retry, cancelled before any worker claimed it
        second = retry_run(conn, first, reuse_outputs=True).run_id
        cancel_run(conn, second, reason="clicked by mistake")
    with engine.begin() as conn:
        third = retry_run(conn, second, reuse_outputs=True).run_id
    wait_until(lambda: _status(engine, third) is RunStatus.COMPLETED, what="the retry")
    assert _charges(prepared) == 1  # 2: charge ran again in the third run


def test_a_form_token_the_dashboard_never_issued_is_refused(db_url: str) -> None:
    run_id = _idle_run(db_url)
    planted = "A" * 43
    with serve_asgi(dashboard_app(db_url, allow_actions=True)) as base:
        status, body = http(
            "POST",
            f"{base}/runs/{run_id}/actions/cancel",
            {
                "Cookie": f"pgflow_sa_csrf={planted}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
            f"csrf_token={planted}".encode(),
        )
    assert status == 403, (status, body[:200])
