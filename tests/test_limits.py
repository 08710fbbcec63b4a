"""Concurrency limits held across worker processes: at most N tasks of a step, at most
N runs in progress; measured from the timestamps the handlers record."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from .apps.control_app import flows
from .run_control_kit import prepare, start_runs, stop, workers
from .test_worker_process import WorkerProcess


@pytest.fixture
def prepared(db_url: str) -> str:
    return prepare(db_url, flows)


@pytest.fixture
def three_workers(prepared: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    processes = workers(prepared, tmp_path, 3, TEST_HOLD_SECONDS="0.3")
    yield processes
    stop(processes)


@pytest.fixture
def three_single_slot_workers(prepared: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Each runs one task at a time: two tasks at once can only be two processes."""
    processes = workers(
        prepared, tmp_path, 3, TEST_HOLD_SECONDS="0.3", PGFLOW_SA_WORKER_MAX_CONCURRENCY="1"
    )
    yield processes
    stop(processes)


def _wait_completed(url: str, runs: list[uuid.UUID], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(url) as conn:
            statuses = dict(
                conn.execute(
                    "SELECT status, count(*) FROM pgflow.runs WHERE run_id = ANY(%s) "
                    "GROUP BY status",
                    [runs],
                ).fetchall()
            )
        if statuses == {"completed": len(runs)}:
            return
        assert time.monotonic() < deadline, f"runs did not complete: {statuses}"
        time.sleep(0.2)


def _most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = current = 0
    for _, change in points:  # an end sorts before a start at the same moment
        current += change
        most = max(most, current)
    return most


def _task_intervals(url: str, step: str) -> list[tuple[datetime, datetime]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT min(at) FILTER (WHERE what = 'start'), max(at) FILTER (WHERE what = 'end') "
            "FROM events WHERE step_slug = %s GROUP BY run_id, task_index",
            [step],
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _pids(url: str) -> set[int]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT DISTINCT pid FROM events")}


def test_three_workers_never_run_more_than_the_step_limit(
    prepared: str, three_single_slot_workers: list[WorkerProcess]
) -> None:
    runs = start_runs(prepared, "limited", [list(range(8)), list(range(8))])
    _wait_completed(prepared, runs)
    intervals = _task_intervals(prepared, "call_api")
    assert len(intervals) == 16 and all(end is not None for _, end in intervals)
    # three processes could run three at once; two did (so two processes shared the limit)
    assert _most_at_once(intervals) == 2
    assert len(_pids(prepared)) >= 2
    with psycopg.connect(prepared) as conn:
        (attempts,) = conn.execute(
            "SELECT max(attempts_count) FROM pgflow.step_tasks WHERE flow_slug = 'limited'"
        ).fetchone()
        (limits,) = conn.execute(
            "SELECT step_limits FROM pgflow_sa.flow_limits WHERE flow_slug = 'limited'"
        ).fetchone()
    assert attempts == 1  # waiting on the limit burned no attempt
    assert limits == {"call_api": 2}


def test_three_workers_never_have_more_than_the_run_limit_in_progress(
    prepared: str, three_workers: list[WorkerProcess]
) -> None:
    runs = start_runs(prepared, "run_limited", [{"n": i} for i in range(6)])
    _wait_completed(prepared, runs)
    with psycopg.connect(prepared) as conn:
        rows = conn.execute(
            "SELECT min(at), max(at), count(*) FROM events GROUP BY run_id"
        ).fetchall()
    assert len(rows) == 6 and all(r[2] == 4 for r in rows)  # two steps, start and end
    assert _most_at_once([(r[0], r[1]) for r in rows]) == 2
