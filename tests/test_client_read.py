"""Reading runs back: one run with its steps and tasks, and filtered, paginated lists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pgflow_sa import (
    Context,
    Flow,
    InvalidInputError,
    RunStatus,
    StepStatus,
    TaskStatus,
    flow_status,
    get_run_async,
    list_runs,
    list_runs_async,
    start_flow_async,
    to_sqlalchemy_url,
)
from pgflow_sa._db import sync_engine
from pgflow_sa.schema.rows import StepTaskRecord

from .driver import drive
from .worker_harness import deploy

mapper = Flow("mapper", base_delay=1)


@mapper.map
def double(item: int, ctx: Context) -> int:
    return item * 2


@mapper.step(depends_on=[double])
def total(input: Any, ctx: Context) -> int:
    return sum(input["double"])


fragile = Flow("fragile", max_attempts=1)
fragile.step(slug="explode")(lambda i, c: i)
fragile.step(slug="never", depends_on=["explode"])(lambda i, c: i)


def handler(task: StepTaskRecord) -> Any:
    if task.step_slug == "double":
        return task.input * 2
    if task.step_slug == "total":
        return sum(task.input["double"])
    if task.step_slug == "explode":
        raise ValueError("no good")
    return None


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    deploy(db_url, mapper, fragile)
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    yield engine
    await engine.dispose()


async def _run_to_end(engine: AsyncEngine, flow: Flow, input: Any) -> Any:
    async with engine.begin() as conn:
        run = await start_flow_async(conn, flow, input)
    stop = asyncio.Event()
    task = asyncio.create_task(drive(engine, flow.slug, stop, handler))
    for _ in range(300):
        async with engine.connect() as conn:
            current = await get_run_async(conn, run.run_id, steps=False)
        assert current is not None
        if current.finished:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await task
    async with engine.connect() as conn:
        return await get_run_async(conn, run.run_id)


async def test_completed_run_with_steps_tasks_and_outputs(engine: AsyncEngine) -> None:
    run = await _run_to_end(engine, mapper, [1, 2, 3])
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"total": 12}
    assert run.error is None
    assert [s.step_slug for s in run.steps] == ["double", "total"]
    double_state, total_state = run.steps
    assert (double_state.step_type, double_state.status, double_state.output) == (
        "map",
        StepStatus.COMPLETED,
        [2, 4, 6],
    )
    assert [t.task_index for t in double_state.tasks] == [0, 1, 2]
    assert all(
        t.status is TaskStatus.COMPLETED and t.attempts_count == 1 for t in double_state.tasks
    )
    assert (total_state.output, total_state.attempts, total_state.initial_tasks) == (12, 1, 1)
    assert total_state.duration_seconds is not None and total_state.duration_seconds >= 0
    assert run.step("total") is total_state
    with pytest.raises(KeyError, match=r"has no step 'totl' \(double, total\)"):
        run.step("totl")
    with pytest.raises(LookupError, match="read without its steps"):
        run.model_copy(update={"steps": None}).step("total")


async def test_failed_run_carries_the_error(engine: AsyncEngine) -> None:
    run = await _run_to_end(engine, fragile, {"x": 1})
    assert run.status is RunStatus.FAILED
    assert run.error == "ValueError: no good"
    explode, never = run.steps
    assert (explode.status, explode.error_message, explode.attempts) == (
        StepStatus.FAILED,
        "ValueError: no good",
        1,
    )
    assert explode.tasks[0].status is TaskStatus.FAILED
    assert never.status is StepStatus.CREATED and never.tasks == ()


async def test_empty_map_completes_with_an_empty_list(engine: AsyncEngine) -> None:
    run = await _run_to_end(engine, mapper, [])
    assert run.status is RunStatus.COMPLETED
    assert run.steps[0].output == []
    assert run.output == {"total": 0}


async def test_list_runs_filters_and_pages(engine: AsyncEngine, db_url: str) -> None:
    async with engine.begin() as conn:
        started = [await start_flow_async(conn, mapper, [i]) for i in range(5)]
        await start_flow_async(conn, fragile, {})
    with psycopg.connect(db_url) as conn:  # distinct start times, oldest first
        for age, run in enumerate(reversed(started)):
            conn.execute(
                "UPDATE pgflow.runs SET started_at = now() - make_interval(mins => %s) "
                "WHERE run_id = %s",
                [age + 1, run.run_id],
            )
    async with engine.connect() as conn:
        everything = await list_runs_async(conn)
        assert len(everything.runs) == 6 and everything.next_cursor is None
        first = await list_runs_async(conn, flow=mapper, limit=2)
        second = await list_runs_async(conn, flow="mapper", limit=2, after=first.next_cursor)
        third = await list_runs_async(conn, flow="mapper", limit=2, after=second.next_cursor)
    newest_first = [r.run_id for r in reversed(started)]
    assert [r.run_id for r in first.runs + second.runs + third.runs] == newest_first
    assert third.next_cursor is None
    assert all(r.steps is None for r in first.runs)

    engine_sync = sync_engine(db_url)
    with engine_sync.connect() as conn:
        assert [r.flow_slug for r in list_runs(conn, flow="fragile").runs] == ["fragile"]
        assert len(list_runs(conn, status="started").runs) == 6
        assert list_runs(conn, status=RunStatus.COMPLETED).runs == ()
        cutoff = datetime.now(timezone.utc) - timedelta(minutes=3, seconds=30)
        assert len(list_runs(conn, flow="mapper", started_after=cutoff).runs) == 3
        assert len(list_runs(conn, flow="mapper", started_before=cutoff).runs) == 2
        with pytest.raises(
            InvalidInputError,
            match="status must be one of started, completed, failed, cancelled, not 'done'",
        ):
            list_runs(conn, status="done")
        with pytest.raises(InvalidInputError, match="limit must be between 1 and 1000, not 0"):
            list_runs(conn, limit=0)
        with pytest.raises(InvalidInputError, match="after must be a next_cursor"):
            list_runs(conn, after="garbage")
    engine_sync.dispose()


def test_flow_status_counts_runs_by_index_ranges(db_url: str) -> None:
    """pgflow has no index on when runs finished: flow_status (and `pgflow-sa
    status`) read every run of each flow to count those finished in the window
    (0.5-0.8 s with 100,000 runs). The installer's index makes each count a range."""
    from sqlalchemy.dialects import postgresql

    from pgflow_sa.schema import queries
    from pgflow_sa.schema.indexes import RUNS_FINISHED

    deploy(db_url, mapper)
    with psycopg.connect(db_url, autocommit=True) as conn:  # a few hundred finished runs
        conn.execute(
            "INSERT INTO pgflow.runs (flow_slug, status, input, remaining_steps, started_at,"
            " completed_at, failed_at) SELECT 'mapper', s, '{}', 0, now() - make_interval(mins => i + 1),"
            " CASE s WHEN 'completed' THEN now() - make_interval(mins => i) END,"
            " CASE s WHEN 'failed' THEN now() - make_interval(mins => i) END"
            " FROM generate_series(1, 300) i, unnest(ARRAY['completed', 'failed']) s"
        )
        conn.execute("ANALYZE pgflow.runs")
        sync = sync_engine(db_url)
        try:
            with sync.connect() as sa_conn:
                [status] = flow_status(sa_conn, window_seconds=3600)
        finally:
            sync.dispose()
        assert (status.completed, status.failed) == (59, 59)  # the last hour's
        sql = str(
            queries.flow_status(3600, 30).compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql))
    assert f"Index Scan on {RUNS_FINISHED}" in plan or f"Scan using {RUNS_FINISHED}" in plan
    finished = [
        line.strip()
        for line in plan.splitlines()
        if "status = 'completed'" in line or "status = 'failed'" in line
    ]
    assert finished and all("Filter" not in line for line in finished), plan
    assert all("COALESCE(completed_at, failed_at) >" in line for line in finished), plan
