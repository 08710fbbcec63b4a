"""The order in which the worker's settling statements take their row locks.

pgflow 0.8.1's ``complete_task`` locks a run's row, then its step states; its
``fail_task`` (whose run-locking CTE is never referenced, so never runs) locks the
step state first, then the run. A worker failing a task while another session
completes a task of the same run could deadlock: one of them was rolled back, and a
sync handler's own session lost its writes and its turn. pgflow-sa's fenced
statements lock the runs of their tasks first, in run order, as complete_task does."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from pgflow_sa import Flow
from pgflow_sa._db import sync_engine
from pgflow_sa.schema import worker_queries

from .worker_harness import deploy

two = Flow("locks_two", max_attempts=3)


@two.step
def left(input: Any) -> int:
    return 1


@two.step
def right(input: Any) -> int:
    return 2


def _claim_both(url: str) -> tuple[uuid.UUID, list[worker_queries.Fence]]:
    worker_id = uuid.uuid4()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) "
            "VALUES (%s, 'locks_two', 'test')",
            [worker_id],
        )
        run_id = conn.execute("SELECT run_id FROM pgflow.start_flow('locks_two', '{}')").fetchone()[
            0
        ]
        rows = conn.execute(
            "SELECT run_id, step_slug, task_index, now() FROM pgflow.start_tasks('locks_two', "
            "ARRAY(SELECT msg_id FROM pgmq.read('locks_two', 60, 10)), %s)",
            [worker_id],
        ).fetchall()
    assert len(rows) == 2
    return run_id, [(r[0], r[1], r[2], worker_id, r[3]) for r in rows]


def _a_session_waits_for_a_lock(db_url: str, seconds: float) -> bool:
    """Whether a session of the database comes to wait for a lock within ``seconds``."""
    deadline = time.monotonic() + seconds
    with psycopg.connect(db_url, autocommit=True) as watch:
        while time.monotonic() < deadline:
            waiting = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting:
                return True
            time.sleep(0.02)
    return False


@pytest.mark.parametrize("settle", ["fail", "complete"])
def test_a_settle_waits_for_the_run_before_locking_its_steps(db_url: str, settle: str) -> None:
    """A second session holds the run's row (as complete_task does first), then asks
    for the step state: it gets it at once, and the worker's statement, waiting on the
    run, goes on after it commits. Before, the fenced fail locked the step state
    first and one of the two was rolled back as a deadlock."""
    deploy(db_url, two)
    run_id, fences = _claim_both(db_url)
    fence = next(f for f in fences if f[1] == "left")
    errors: list[BaseException] = []

    def worker_settles() -> None:
        engine = sync_engine(db_url)
        try:
            with engine.begin() as conn:
                if settle == "fail":
                    query = worker_queries.fail_fenced([fence], ["boom"])
                else:
                    query = worker_queries.complete_fenced([fence], [1])
                assert len(conn.execute(*query).all()) == 1
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
        finally:
            engine.dispose()

    with psycopg.connect(db_url) as other:
        other.execute("SET deadlock_timeout = '100ms'")
        other.execute("SELECT 1 FROM pgflow.runs WHERE run_id = %s FOR UPDATE", [run_id])
        settling = threading.Thread(target=worker_settles)
        settling.start()
        assert _a_session_waits_for_a_lock(db_url, 10), (
            "the worker's statement never waited for the run's row"
        )
        time.sleep(0.3)  # it would have locked the step state by now if it were going to
        other.execute(
            "SELECT 1 FROM pgflow.step_states WHERE run_id = %s AND step_slug = 'left' FOR UPDATE",
            [run_id],
        )
        other.commit()
    settling.join(10)
    assert not settling.is_alive()
    assert errors == []
    with psycopg.connect(db_url) as conn:
        status = conn.execute(
            "SELECT status FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'left'",
            [run_id],
        ).fetchone()[0]
    assert status == ("queued" if settle == "fail" else "completed")


def test_recovery_waits_for_the_run_before_locking_the_tasks_it_recovers(db_url: str) -> None:
    """Recovery of a gone worker's tasks takes the locks in the settles' order too: a
    session holding the run (as a completion does) then asks for a task's row and gets
    it; recovery goes on after it commits. Before, recovery locked the tasks it found
    (FOR UPDATE SKIP LOCKED) and only then the run: a deadlock, one of them rolled back."""
    import asyncio

    from pgflow_sa.worker import Worker

    from .worker_harness import FAST

    deploy(db_url, two)
    run_id, fences = _claim_both(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:  # its worker is gone
        conn.execute(
            "UPDATE pgflow.workers SET last_heartbeat_at = now() - interval '1 hour' "
            "WHERE worker_id = %s",
            [fences[0][3]],
        )
    errors: list[BaseException] = []
    recovered: list[int] = []

    def recover() -> None:
        async def go() -> int:
            worker = Worker(two, db_url, settings=FAST)
            try:
                return await worker.recover_stalled()
            finally:
                await worker.engine.dispose()

        try:
            recovered.append(asyncio.run(go()))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    with psycopg.connect(db_url) as other:
        other.execute("SET deadlock_timeout = '100ms'")
        other.execute("SELECT 1 FROM pgflow.runs WHERE run_id = %s FOR UPDATE", [run_id])
        recovering = threading.Thread(target=recover)
        recovering.start()
        assert _a_session_waits_for_a_lock(db_url, 20), "recovery never waited for the run's row"
        time.sleep(0.3)
        other.execute(
            "SELECT 1 FROM pgflow.step_tasks WHERE run_id = %s FOR UPDATE", [run_id]
        ).fetchall()
        other.commit()
    recovering.join(20)
    assert not recovering.is_alive()
    assert errors == [] and recovered == [2]
