"""Run control through public means: cancel_run and retry_run in the caller's
transaction, served by `pgflow-sa worker` subprocesses."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from pgflow_sa import (
    RunNotFoundError,
    RunStateError,
    RunStatus,
    cancel_run,
    get_run,
    list_runs,
    retry_run,
    start_flow,
    to_sqlalchemy_url,
)

from .apps.control_app import flows, long_async, long_sync, two_steps
from .helpers import run_cli
from .run_control_kit import events, prepare, status, stop, wait_until, workers
from .test_worker_process import WorkerProcess


@pytest.fixture
def prepared(db_url: str) -> str:
    return prepare(db_url, flows)


@pytest.fixture
def engine(prepared: str) -> Iterator[Engine]:
    engine = create_engine(to_sqlalchemy_url(prepared, "psycopg"))
    yield engine
    engine.dispose()


@pytest.fixture
def worker(prepared: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    (process,) = workers(prepared, tmp_path, 1)
    yield process
    stop([process])


def start(engine: Engine, flow: Any, input: Any) -> uuid.UUID:
    with engine.begin() as conn:
        return start_flow(conn, flow, input).run_id


def test_cancel_while_an_async_handler_runs(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    run_id = start(engine, long_async, {})
    wait_until(lambda: ("wait_long", "start") in events(prepared, run_id), what="the handler")
    with engine.begin() as conn:
        cancelled = cancel_run(conn, run_id, reason="customer asked")
    asked = time.monotonic()
    assert cancelled.status is RunStatus.CANCELLED and cancelled.cancelled
    assert cancelled.cancel_reason == "customer asked"
    assert cancelled.error == "Cancelled: customer asked"
    # the worker learns it and cancels the handler (a notification; the heartbeat else)
    wait_until(lambda: ("wait_long", "cancelled") in events(prepared, run_id), what="cancel")
    assert time.monotonic() - asked < 5
    time.sleep(1.0)  # a later completion of the task would show here
    with engine.begin() as conn:
        run = get_run(conn, run_id)
    assert run is not None and run.status is RunStatus.CANCELLED
    task = run.step("wait_long").tasks[0]
    assert task.status.value == "failed" and task.error_message == "Cancelled: customer asked"
    assert run.step("wait_long").status.value == "failed"
    assert run.step("after_long").status.value == "created"  # downstream never started
    assert events(prepared, run_id) == [("wait_long", "start"), ("wait_long", "cancelled")]
    with psycopg.connect(prepared) as conn:
        (pgflow_status,) = conn.execute(
            "SELECT status FROM pgflow.runs WHERE run_id = %s", [run_id]
        ).fetchone()
        (visible,) = conn.execute("SELECT count(*) FROM pgmq.q_long_async").fetchone()
    assert pgflow_status == "failed"  # pgflow's own table keeps its meaning
    assert visible == 0  # the run's messages are archived
    out = worker.output()
    assert "cancelling" in out and "lost task" not in out


def test_a_sync_handler_sees_ctx_cancelled(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    run_id = start(engine, long_sync, {})
    wait_until(lambda: ("poll_cancelled", "start") in events(prepared, run_id), what="handler")
    with engine.begin() as conn:
        cancel_run(conn, run_id)
    wait_until(lambda: ("poll_cancelled", "saw cancelled") in events(prepared, run_id), 10)
    time.sleep(0.5)
    with engine.begin() as conn:
        run = get_run(conn, run_id)
    assert run is not None and run.status is RunStatus.CANCELLED and run.error == "Cancelled"
    # what the handler returned after the cancel did not count
    task = run.step("poll_cancelled").tasks[0]
    assert task.status.value == "failed" and task.output is None


def test_a_cancel_that_rolls_back_cancels_nothing(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    run_id = start(engine, long_async, {})
    wait_until(lambda: ("wait_long", "start") in events(prepared, run_id), what="the handler")
    with engine.connect() as conn, conn.begin() as tx:
        assert cancel_run(conn, run_id).status is RunStatus.CANCELLED
        tx.rollback()
    time.sleep(1.5)  # beyond a heartbeat: the worker checks the runs of its tasks
    with engine.begin() as conn:
        run = get_run(conn, run_id)
    assert run is not None and run.status is RunStatus.STARTED and run.cancelled_at is None
    assert run.step("wait_long").tasks[0].status.value == "started"
    assert ("wait_long", "cancelled") not in events(prepared, run_id)


def test_cancel_refuses_finished_and_unknown_runs(engine: Engine, prepared: str) -> None:
    run_id = start(engine, long_async, {})
    with engine.begin() as conn:
        cancel_run(conn, run_id)
    with engine.begin() as conn, pytest.raises(RunStateError, match="has already failed"):
        cancel_run(conn, run_id)
    with engine.begin() as conn, pytest.raises(RunNotFoundError, match="no run"):
        cancel_run(conn, uuid.uuid4())


def _failed_at_the_store(engine: Engine, prepared: str) -> uuid.UUID:
    """A run of two_steps over [1, 2, 3] that failed at its `store` step (its `fetch`
    tasks completed); the store's switch "store_fails" stays on."""
    with psycopg.connect(prepared) as conn:
        conn.execute("INSERT INTO switches VALUES ('store_fails', true)")
    original = start(engine, two_steps, [1, 2, 3])
    wait_until(lambda: status(engine, original) is RunStatus.FAILED, what="the failure")
    return original


def test_retry_of_a_failed_run_completes_and_is_linked(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    original = _failed_at_the_store(engine, prepared)
    with engine.begin() as conn, pytest.raises(RunStateError, match="still in progress"):
        retry_run(conn, start_flow(conn, two_steps, [1]).run_id)
    with psycopg.connect(prepared) as conn:
        conn.execute("UPDATE switches SET value = false")
    with engine.begin() as conn:
        again = retry_run(conn, original)
    assert again.retry_of == original and again.run_id != original
    wait_until(lambda: status(engine, again.run_id) is RunStatus.COMPLETED, what="the retry")
    with engine.begin() as conn:
        run = get_run(conn, again.run_id)
        linked = list_runs(conn, retry_of=original).runs
    assert run is not None and run.retry_of == original and run.output == {"store": 60}
    assert [r.run_id for r in linked] == [again.run_id]
    # without reuse every step ran again
    assert events(prepared, again.run_id).count(("fetch", "start")) == 3
    with engine.begin() as conn, pytest.raises(RunStateError, match="completed"):
        retry_run(conn, again.run_id)


def _retried_once_the_store_works(engine: Engine, prepared: str, original: uuid.UUID) -> Any:
    """Turn the store's switches off, retry ``original`` reusing outputs, and return
    the retry once it completed."""
    with psycopg.connect(prepared) as conn:
        conn.execute("UPDATE switches SET value = false")
    with engine.begin() as conn:
        again = retry_run(conn, original, reuse_outputs=True)
    wait_until(lambda: status(engine, again.run_id) is RunStatus.COMPLETED, what="the retry")
    with engine.begin() as conn:
        run = get_run(conn, again.run_id)
    assert run is not None
    return run


def test_retry_reusing_outputs_runs_only_what_failed(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    original = _failed_at_the_store(engine, prepared)
    run = _retried_once_the_store_works(engine, prepared, original)
    assert events(prepared, run.run_id) == [("store", "start")]
    assert run.output == {"store": 60}
    assert [t.output for t in run.step("fetch").tasks] == [10, 20, 30]


def test_a_retry_of_a_cancelled_run_reuses_what_completed_before_the_cancel(
    engine: Engine, prepared: str, worker: WorkerProcess
) -> None:
    with psycopg.connect(prepared) as conn:
        conn.execute("INSERT INTO switches VALUES ('store_waits', true)")
    original = start(engine, two_steps, [4, 5])
    wait_until(lambda: ("store", "start") in events(prepared, original), what="store")
    with engine.begin() as conn:
        cancel_run(conn, original, reason="wrong input")
    run = _retried_once_the_store_works(engine, prepared, original)
    assert events(prepared, run.run_id) == [("store", "start")]
    assert run.output == {"store": 90} and run.retry_of == original


def test_cancelled_runs_are_listed_apart_from_failed_ones(engine: Engine, prepared: str) -> None:
    cancelled = start(engine, long_async, {})
    with engine.begin() as conn:
        cancel_run(conn, cancelled, reason="x")
        listed = list_runs(conn, status="cancelled").runs
        failed = list_runs(conn, status="failed").runs
        again = retry_run(conn, cancelled)
        assert again.retry_of == cancelled
        (count,) = conn.execute(text("SELECT count(*) FROM pgflow_sa.run_cancellations")).one()
    assert [r.run_id for r in listed] == [cancelled] and failed == ()
    assert count == 1


def test_cli_cancels_retries_and_shows_the_link(engine: Engine, prepared: str) -> None:
    run_id = start(engine, long_async, {})
    done = run_cli("runs", "cancel", str(run_id), "--reason", "by hand", "--database-url", prepared)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"cancelled run {run_id} of long_async: Cancelled: by hand"
    again = run_cli("runs", "cancel", str(run_id), "--database-url", prepared)
    assert again.returncode == 1 and again.stderr.startswith("error: run ")
    assert "has already failed" in again.stderr and again.stderr.count("\n") == 1
    retried = run_cli("runs", "retry", str(run_id), "--reuse-outputs", "--database-url", prepared)
    assert retried.returncode == 0, retried.stderr
    new_id = uuid.UUID(retried.stdout.strip())
    shown = run_cli("runs", "show", str(run_id), "--database-url", prepared).stdout
    assert "status    cancelled" in shown and f"retried   {new_id}" in shown
    assert "error     Cancelled: by hand" in shown
    shown_new = run_cli("runs", "show", str(new_id), "--database-url", prepared).stdout
    assert f"retry of  {run_id}" in shown_new and "status    started" in shown_new
    listed = run_cli("runs", "list", "--retry-of", str(run_id), "--database-url", prepared)
    assert str(new_id) in listed.stdout and str(run_id) not in listed.stdout
    cancelled = run_cli("runs", "list", "--status", "cancelled", "--database-url", prepared)
    assert str(run_id) in cancelled.stdout and str(new_id) not in cancelled.stdout
    with psycopg.connect(prepared) as conn:
        (reuse,) = conn.execute(
            "SELECT reuse_outputs FROM pgflow_sa.run_retries WHERE run_id = %s", [new_id]
        ).fetchone()
    assert reuse is True


def test_status_counts_cancellations_retries_and_tasks_waiting_on_a_limit(
    engine: Engine, prepared: str
) -> None:
    cancelled = start(engine, long_async, {})
    with engine.begin() as conn:
        cancel_run(conn, cancelled)
        retry_run(conn, cancelled)
    worker_id = uuid.uuid4()
    with psycopg.connect(prepared) as conn:
        # the limits a worker of `limited` writes, and one task started in its place
        conn.execute(
            "INSERT INTO pgflow_sa.flow_limits (flow_slug, step_limits) "
            "VALUES ('limited', '{\"call_api\": 1}')"
        )
        conn.execute(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) "
            "VALUES (%s, 'limited', 'test')",
            [worker_id],
        )
        conn.execute("SELECT pgflow.start_flow('limited', '[1, 2, 3]'::jsonb)")
        conn.execute(
            "SELECT pgflow.start_tasks('limited', ARRAY(SELECT msg_id FROM "
            "pgmq.read('limited', 60, 1)), %s)",
            [worker_id],
        )
    proc = run_cli("status", "--json", "--database-url", prepared)
    assert proc.returncode == 0, proc.stderr
    rows = {row["flow_slug"]: row for row in json.loads(proc.stdout)}
    assert (rows["long_async"]["cancelled"], rows["long_async"]["failed"]) == (1, 0)
    assert rows["long_async"]["retried"] == 1 and rows["long_async"]["running"] == 1
    assert rows["limited"]["waiting_on_limit"] == 2
    assert rows["two_steps"]["waiting_on_limit"] == 0
