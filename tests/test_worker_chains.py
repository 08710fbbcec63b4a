"""A step that depends on one step alone is claimed by the statement that completes
that step (one round trip, one commit: what pgflow's events and a poller would
otherwise take a second statement for), and a claim that fails there costs the
completion nothing."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .apps.chain_app import flows
from .run_control_kit import prepare, start_runs, stop, wait_until, workers
from .test_worker_process import WorkerProcess


@pytest.fixture
def prepared(db_url: str) -> str:
    return prepare(db_url, flows)


@pytest.fixture
def worker(prepared: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    [process] = workers(prepared, tmp_path, 1, app="chain_app:flows")
    yield process
    stop([process])


def _outputs(url: str) -> list[object]:
    with psycopg.connect(url) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT output FROM pgflow.runs WHERE status = 'completed' ORDER BY output::text"
            )
        ]


def _all_completed(url: str, count: int) -> bool:
    with psycopg.connect(url) as conn:
        (done,) = conn.execute(
            "SELECT count(*) FROM pgflow.runs WHERE status = 'completed'"
        ).fetchone()
    return bool(done == count)


def test_each_step_is_claimed_by_the_statement_completing_the_step_before(
    prepared: str, worker: WorkerProcess
) -> None:
    for n in range(5):  # one after the other: the worker has slots free for each claim
        start_runs(prepared, "chained", [{"n": n}])
        wait_until(lambda n=n: _all_completed(prepared, n + 1), 60, "the run to complete")
    assert _outputs(prepared) == [{"third": n + 2} for n in range(5)]  # inputs were right
    with psycopg.connect(prepared) as conn:
        pairs = conn.execute(
            "SELECT before.step_slug, before.completed_at = after.started_at, after.attempts_count "
            "FROM pgflow.step_tasks before JOIN pgflow.deps d "
            "  ON d.flow_slug = before.flow_slug AND d.dep_slug = before.step_slug "
            "JOIN pgflow.step_tasks after "
            "  ON after.run_id = before.run_id AND after.step_slug = d.step_slug"
        ).fetchall()
    # both are the transaction's start: one transaction completed one and started the other
    assert sorted(pairs) == [("first", True, 1)] * 5 + [("second", True, 1)] * 5


def test_a_claim_refused_in_the_completing_statement_leaves_the_completion_to_itself(
    prepared: str, tmp_path: Path
) -> None:
    with psycopg.connect(prepared, autocommit=True) as conn:
        # while "refuse_second" is on, starting a task of `second` raises: the statement
        # completing `first` and claiming `second` fails as a whole
        conn.execute(
            """
            INSERT INTO switches VALUES ('first_waits', true), ('refuse_second', true);
            CREATE FUNCTION refuse_second() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.step_slug = 'second' AND NEW.status = 'started'
                   AND (SELECT value FROM public.switches WHERE name = 'refuse_second') THEN
                    RAISE EXCEPTION 'second refused';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_second BEFORE UPDATE ON pgflow.step_tasks
                FOR EACH ROW EXECUTE FUNCTION refuse_second();
            """
        )
    [process] = workers(prepared, tmp_path, 1, app="chain_app:flows")
    try:
        [run_id] = start_runs(prepared, "chained", [{"n": 7}])
        wait_until(lambda: ("first", "start") in _events(prepared), 30, "first to start")
        with psycopg.connect(prepared, autocommit=True) as conn:
            conn.execute("UPDATE switches SET value = false WHERE name = 'first_waits'")

        def first_completed() -> bool:
            with psycopg.connect(prepared) as conn:
                row = conn.execute(
                    "SELECT status, attempts_count FROM pgflow.step_tasks "
                    "WHERE run_id = %s AND step_slug = 'first'",
                    [run_id],
                ).fetchone()
            return row == ("completed", 1)

        wait_until(first_completed, 30, "first to complete on its own")
        assert "completing with a claim failed" in process.output()
        with psycopg.connect(prepared, autocommit=True) as conn:
            conn.execute("UPDATE switches SET value = false WHERE name = 'refuse_second'")
        wait_until(lambda: _all_completed(prepared, 1), 60, "the run to complete")
    finally:
        stop([process])
    assert _outputs(prepared) == [{"third": 9}]
    assert _events(prepared) == [("first", "start"), ("second", "start")]  # each ran once


@pytest.mark.parametrize("released", ["while it stops", "after it exited"])
def test_a_completing_statement_held_up_past_a_stop_starts_nothing(
    prepared: str, tmp_path: Path, released: str
) -> None:
    """SIGTERM while the statement that completes `first` (and would claim `second`)
    waits for a lock another session holds: whether it commits while the worker stops
    or after it exited, `first` is completed (its handler ran) and `second` is left
    queued with no attempt used, for the next worker (never run by one that stops)."""
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute("INSERT INTO switches VALUES ('first_waits', true)")
    [process] = workers(prepared, tmp_path, 1, app="chain_app:flows")
    [run_id] = start_runs(prepared, "chained", [{"n": 1}])
    with _completion_behind_a_lock(prepared, run_id) as locker:
        process.proc.send_signal(signal.SIGTERM)
        if released == "while it stops":
            time.sleep(0.3)
            locker.commit()
        assert process.proc.wait(30) == 0
    stop([process])
    wait_until(lambda: _task(prepared, run_id, "first") == ("completed", 1), 30, "first")
    assert _task(prepared, run_id, "second") == ("queued", 0)
    assert _events(prepared) == [("first", "start")]

    [process] = workers(prepared, tmp_path, 1, app="chain_app:flows")
    try:
        wait_until(lambda: _all_completed(prepared, 1), 60, "the next worker to finish")
    finally:
        stop([process])
    assert _outputs(prepared) == [{"third": 3}]
    assert _events(prepared) == [("first", "start"), ("second", "start")]


def test_a_task_queued_while_the_completing_statement_waited_is_left_for_the_next_claim(
    prepared: str, tmp_path: Path
) -> None:
    """A run started while the statement completing `first` of another run waits for a
    lock: that statement's read finds the new run's message, which a transaction that
    began before it was queued may not start (pgflow's started_at would precede its
    queued_at). It is put back, not a reason to drop the claim (the
    statement's read is the only one: no notifications, and the poller's next read is
    far off)."""
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute("INSERT INTO switches VALUES ('first_waits', true)")
    [waited] = start_runs(prepared, "chained", [{"n": 1}])  # read when the worker starts
    process = _reading_only_at_start(prepared, tmp_path)
    try:
        with _completion_behind_a_lock(prepared, waited):
            start_runs(prepared, "chained", [{"n": 10}])
        wait_until(lambda: _all_completed(prepared, 2), 60, "both runs to complete")
    finally:
        stop([process])
    assert "completing with a claim failed" not in process.output()
    assert _outputs(prepared) == [{"third": 12}, {"third": 3}]
    assert sorted(_events(prepared)) == [("first", "start")] * 2 + [("second", "start")] * 2


def test_a_claim_held_up_by_a_locked_task_lets_the_worker_heartbeat(
    prepared: str, tmp_path: Path
) -> None:
    """The statement completing `first` reads another run's message whose task a second
    session holds locked, so starting it waits, while the statement holds the worker's
    row (read after the completions). It gives up within its lock timeout and the
    worker completes alone: its heartbeat goes on (no worker would take its tasks for
    stalled) and both runs complete, each handler run once."""
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute("INSERT INTO switches VALUES ('first_waits', true)")
    _, blocked = start_runs(prepared, "chained", [{"n": 1}, {"n": 2}])
    hide = "SELECT pgmq.set_vt('chained', message_id, %s) FROM pgflow.step_tasks WHERE run_id = %s"
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute(hide, [60, blocked])  # the worker's first read takes `waited` only
    process = _reading_only_at_start(prepared, tmp_path, PGFLOW_SA_WORKER_STALL_MARGIN="3")
    ages = []
    try:
        wait_until(lambda: ("first", "start") in _events(prepared), 30, "first to start")
        with psycopg.connect(prepared) as locker:
            locker.execute(
                "SELECT 1 FROM pgflow.step_tasks WHERE run_id = %s FOR UPDATE", [blocked]
            )
            with psycopg.connect(prepared, autocommit=True) as conn:
                conn.execute(hide, [0, blocked])
                conn.execute("UPDATE switches SET value = false WHERE name = 'first_waits'")
                for _ in range(25):
                    (age,) = conn.execute(
                        "SELECT extract(epoch FROM now() - max(last_heartbeat_at))::float "
                        "FROM pgflow.workers WHERE queue_name = 'chained'"
                    ).fetchone()
                    ages.append(age)
                    time.sleep(0.2)
        wait_until(lambda: _all_completed(prepared, 2), 60, "both runs to complete")
    finally:
        stop([process])
    assert max(ages) < 3, ages  # under the stall margin all along
    assert _outputs(prepared) == [{"third": 3}, {"third": 4}]
    assert sorted(_events(prepared)) == [("first", "start")] * 2 + [("second", "start")] * 2


def test_a_claim_waiting_for_a_lock_when_its_worker_exits_starts_nothing(
    prepared: str, tmp_path: Path
) -> None:
    """A claim waits for the row of a task another session holds locked when the worker
    is stopped: the worker exits (abandoning that statement), and its server session,
    which would otherwise wait on and start the task for a worker that is gone (to be
    failed later as stalled, never run), notices the client is gone and rolls back."""
    [run_id] = start_runs(prepared, "chained", [{"n": 5}])
    with psycopg.connect(prepared) as locker:
        locker.execute(
            "SELECT 1 FROM pgflow.step_tasks WHERE run_id = %s AND step_slug = 'first' FOR UPDATE",
            [run_id],
        )
        [process] = workers(prepared, tmp_path, 1, app="chain_app:flows")
        try:
            wait_until(lambda: _waiting_on_a_lock(prepared), 30, "the claim to wait")
            process.proc.send_signal(signal.SIGTERM)
            assert process.proc.wait(30) == 0
        finally:
            stop([process])
        wait_until(lambda: not _waiting_on_a_lock(prepared), 10, "its session to end")
    assert _task(prepared, run_id, "first") == ("queued", 0)


def _reading_only_at_start(url: str, tmp_path: Path, **env: str) -> WorkerProcess:
    """A worker of chain_app that reads the queue when it starts and then only when its
    own completions or a 30 s poll say to (no notifications)."""
    [process] = workers(
        url,
        tmp_path,
        1,
        app="chain_app:flows",
        PGFLOW_SA_WORKER_USE_NOTIFICATIONS="false",
        PGFLOW_SA_WORKER_POLL_INTERVAL="30",
        PGFLOW_SA_WORKER_FALLBACK_POLL_INTERVAL="30",
        **env,
    )
    return process


@contextlib.contextmanager
def _completion_behind_a_lock(url: str, run_id: object) -> Iterator[psycopg.Connection[Any]]:
    """Once `first` of ``run_id`` runs: another session locks the run, `first` is let
    finish, and the statement completing it waits for that lock until the block ends
    (or the yielded session commits)."""
    wait_until(lambda: ("first", "start") in _events(url), 30, "first to start")
    with psycopg.connect(url) as locker:
        locker.execute("SELECT 1 FROM pgflow.runs WHERE run_id = %s FOR UPDATE", [run_id])
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE switches SET value = false WHERE name = 'first_waits'")
        wait_until(lambda: _waiting_on_a_lock(url), 30, "the completion to wait")
        yield locker
        locker.commit()


def _waiting_on_a_lock(url: str) -> bool:
    with psycopg.connect(url) as conn:
        (waiting,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'pgflow-sa worker' AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(waiting)


def _task(url: str, run_id: object, step: str) -> tuple[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT status, attempts_count FROM pgflow.step_tasks "
            "WHERE run_id = %s AND step_slug = %s",
            [run_id, step],
        ).fetchone()
    assert row is not None
    return (row[0], row[1])


def _events(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return [
            (r[0], r[1]) for r in conn.execute("SELECT step_slug, what FROM events ORDER BY at")
        ]
