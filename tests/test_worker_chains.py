"""A step that depends on one step alone is claimed by the statement that completes
that step (one round trip, one commit: what pgflow's events and a poller would
otherwise take a second statement for), and a claim that fails there costs the
completion nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
    start_runs(prepared, "chained", [{"n": n} for n in range(5)])
    wait_until(lambda: _all_completed(prepared, 5), 60, "the runs to complete")
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
        wait_until(lambda: "start" in _events(prepared), 30, "first to start")
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
    assert _events(prepared) == ["start"]  # first ran once


def _events(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT what FROM events ORDER BY at")]
