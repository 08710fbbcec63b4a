"""Run control and concurrency limits under races, each test one defect an adversarial
review found (and failed before its fix), through public means: real workers, real
PostgreSQL, a second session holding a lock."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from pgflow_sa import RunStatus, cancel_run, get_run, retry_run, start_flow, to_sqlalchemy_url
from pgflow_sa.dashboard import dashboard_app
from pgflow_sa.schema import worker_queries

from .apps.review_app import charge_then_fail, flows
from .run_control_kit import prepare, start_runs, status, stop, wait_until, workers
from .test_dashboard import _idle_run, http, serve_asgi
from .test_limits import _most_at_once, _task_intervals
from .test_worker_process import WorkerProcess


@pytest.fixture
def prepared(db_url: str) -> str:
    return prepare(db_url, flows)


def _workers(url: str, tmp_path: Path, count: int) -> list[WorkerProcess]:
    return workers(url, tmp_path, count, app="review_app:flows")


@pytest.fixture
def two_workers(prepared: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    processes = _workers(prepared, tmp_path, 2)
    yield processes
    stop(processes)


@pytest.fixture
def worker(prepared: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    (process,) = _workers(prepared, tmp_path, 1)
    yield process
    stop([process])


def _registered(url: str, count: int) -> bool:
    with psycopg.connect(url) as conn:
        (n,) = conn.execute(
            "SELECT count(DISTINCT worker_id) FROM pgflow.workers WHERE deprecated_at IS NULL"
        ).fetchone()
    return bool(n >= count)


def test_a_step_limit_of_one_holds_while_one_claim_is_slow(
    prepared: str, two_workers: list[WorkerProcess]
) -> None:
    wait_until(lambda: _registered(prepared, 2), what="two workers")
    (run_id,) = start_runs(prepared, "gate", [list(range(150))])  # more than the scan window
    # task 0's message is the first any claim picks; its start_tasks then waits for
    # this row lock (a slow claim: a busy server), while it should hold the flow's
    # advisory lock so that no other claim of the flow runs
    with psycopg.connect(prepared) as blocker:
        blocker.execute(
            "SELECT 1 FROM pgflow.step_tasks WHERE run_id = %s AND task_index = 0 FOR UPDATE",
            [run_id],
        )
        time.sleep(5)  # the messages are visible after 2 s; every worker has claimed since
        with psycopg.connect(prepared) as conn:
            (started,) = conn.execute(
                "SELECT count(*) FROM pgflow.step_tasks WHERE flow_slug = 'gate' "
                "AND status = 'started'"
            ).fetchone()
        blocker.commit()
    wait_until(lambda: _task_intervals(prepared, "slot"), what="a task")
    time.sleep(1)  # task 0 starts now
    assert started == 0
    still_running = [(s, e or s + timedelta(days=1)) for s, e in _task_intervals(prepared, "slot")]
    assert _most_at_once(still_running) == 1


def test_cancel_racing_a_claim_of_the_same_run_does_not_deadlock(prepared: str) -> None:
    engine = create_engine(to_sqlalchemy_url(prepared, "psycopg"))
    worker_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            worker_queries.register_workers(
                [{"worker_id": worker_id, "queue_name": "wide", "function_name": "review"}]
            )
        )
    (run_id,) = start_runs(prepared, "wide", [[1, 2, 3]])
    errors: list[str] = []

    def cancel() -> None:
        try:
            with engine.begin() as conn:
                cancel_run(conn, run_id, reason="race")
        except Exception as exc:
            errors.append(f"cancel: {exc}")

    def claim() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(*worker_queries.claim("wide", 5, 10, worker_id)).all()
                conn.commit()
        except Exception as exc:
            errors.append(f"claim: {exc}")

    # the same interleaving as under load, made certain by holding the first message:
    # the cancel fails the tasks, then waits at the first message; the claim skips
    # it, reads the others and waits for their tasks; the first message is let go
    with psycopg.connect(prepared) as holder:
        holder.execute("SELECT 1 FROM pgmq.q_wide ORDER BY msg_id LIMIT 1 FOR UPDATE")
        cancelling = threading.Thread(target=cancel)
        cancelling.start()
        time.sleep(0.5)
        claiming = threading.Thread(target=claim)
        claiming.start()
        time.sleep(0.5)
        holder.commit()
    cancelling.join(30)
    claiming.join(30)
    engine.dispose()
    assert errors == []
    with psycopg.connect(prepared) as conn:
        (status,) = conn.execute(
            "SELECT status FROM pgflow.runs WHERE run_id = %s", [run_id]
        ).fetchone()
    assert status == "failed"


def test_a_completion_waiting_for_the_failure_of_its_run_ends_its_task(prepared: str) -> None:
    engine = create_engine(to_sqlalchemy_url(prepared, "psycopg"))
    worker_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            worker_queries.register_workers(
                [{"worker_id": worker_id, "queue_name": "fork", "function_name": "review"}]
            )
        )
    (run_id,) = start_runs(prepared, "fork", [{}])
    with engine.begin() as conn:  # the plain claim: fork's limits were never stored
        rows = conn.execute(*worker_queries.claim("fork", 5, 10, worker_id)).all()
    fences = {
        r.step_slug: (r.run_id, r.step_slug, r.task_index, worker_id, r.started_at) for r in rows
    }
    assert set(fences) == {"left", "right"}
    settled: list[object] = []

    def complete_left() -> None:
        with engine.connect() as conn:
            settled.extend(conn.execute(*worker_queries.complete_fenced([fences["left"]], [1])))
            conn.commit()

    with engine.connect() as failing:
        # right's last attempt fails the run; left's completion starts meanwhile and
        # waits for the run's lock
        failing.execute(*worker_queries.fail_fenced([fences["right"]], ["right fails"]))
        completing = threading.Thread(target=complete_left)
        completing.start()
        time.sleep(0.5)
        failing.commit()
    completing.join(30)
    engine.dispose()
    with psycopg.connect(prepared) as conn:
        (run_status,) = conn.execute(
            "SELECT status FROM pgflow.runs WHERE run_id = %s", [run_id]
        ).fetchone()
        (left_status,) = conn.execute(
            "SELECT status FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'left'",
            [run_id],
        ).fetchone()
    assert run_status == "failed" and len(settled) == 1  # the worker counts it settled
    assert left_status != "started"


def test_the_client_says_what_to_do_when_the_run_control_tables_are_missing(
    prepared: str,
) -> None:
    (run_id,) = start_runs(prepared, "wide", [[1]])
    with psycopg.connect(prepared) as conn:
        conn.execute(
            "DROP TABLE pgflow_sa.run_cancellations, pgflow_sa.run_retries, "
            "pgflow_sa.flow_limits, pgflow_sa.admitted_runs"
        )
    engine = create_engine(to_sqlalchemy_url(prepared, "psycopg"))
    error = ""
    try:
        with engine.begin() as conn:
            run = get_run(conn, run_id)
        assert run is not None
    except Exception as exc:
        error = str(exc)
    finally:
        engine.dispose()
    assert not error or "pgflow-sa install" in error, error


@pytest.fixture
def engine(prepared: str) -> Iterator[Engine]:
    engine = create_engine(to_sqlalchemy_url(prepared, "psycopg"))
    yield engine
    engine.dispose()


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
    wait_until(lambda: status(engine, first) is RunStatus.FAILED, what="the failure")
    assert _charges(prepared) == 1
    with psycopg.connect(prepared) as conn:
        conn.execute("UPDATE switches SET value = false")
    with engine.begin() as conn:  # a retry, cancelled before any worker claimed it
        second = retry_run(conn, first, reuse_outputs=True).run_id
        cancel_run(conn, second, reason="clicked by mistake")
    with engine.begin() as conn:
        third = retry_run(conn, second, reuse_outputs=True).run_id
    wait_until(lambda: status(engine, third) is RunStatus.COMPLETED, what="the retry")
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
