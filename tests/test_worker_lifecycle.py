"""Worker transactions, startup checks, shutdown, deprecation, recovery, two workers."""

from __future__ import annotations

import asyncio
import collections
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pgflow_sa import (
    Context,
    Flow,
    RunStatus,
    start_flow_async,
    to_sqlalchemy_url,
    wait_for_run_async,
)
from pgflow_sa._db import sync_engine
from pgflow_sa.schema import functions as fn
from pgflow_sa.worker import Worker, WorkerSettings, WorkerStartupError

from .tx_flows import atomic, make_notes, notes, tx_async, tx_sync
from .worker_harness import FAST, deploy, run_and_wait, running_worker


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    yield engine
    await engine.dispose()


# --- transactions ------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["async engine", "sync engine"])
async def test_handler_writes_commit_with_the_completion(
    db_url: str, engine: AsyncEngine, given: str
) -> None:
    make_notes(db_url)
    deploy(db_url, tx_sync, tx_async)
    app_engine: Any = engine if given == "async engine" else sync_engine(db_url)
    async with running_worker([tx_sync, tx_async], engine=app_engine):
        sync_run, async_run = await asyncio.gather(
            run_and_wait(engine, tx_sync, {}), run_and_wait(engine, tx_async, {})
        )
    # attempt 1 wrote and raised: its row rolled back and the task was retried;
    # attempt 2 wrote and succeeded: its row committed with the completion
    assert sorted(notes(db_url)) == ["async attempt 2", "sync attempt 2"]
    for run in (sync_run, async_run):
        assert run.status is RunStatus.COMPLETED
        assert run.steps[0].attempts == 2
        assert run.steps[0].tasks[0].error_message == "RuntimeError: after writing"


async def test_a_broken_transaction_keeps_nothing(db_url: str, engine: AsyncEngine) -> None:
    make_notes(db_url)
    deploy(db_url, atomic)
    async with running_worker(atomic, engine=engine):
        run = await run_and_wait(engine, atomic, {})
    assert run.status is RunStatus.FAILED
    assert run.error is not None and "division by zero" in run.error
    assert notes(db_url) == []


# --- startup checks -------------------------------------------------------------------------

checked = Flow("w_checked", timeout=30)
checked.step(slug="one")(lambda i, c: i)
checked.step(slug="two", depends_on=["one"])(lambda i, c: i)


async def test_missing_flow_refuses_to_start(db_url: str) -> None:
    worker = Worker(checked, db_url, settings=FAST)
    with pytest.raises(WorkerStartupError) as info:
        await worker.run()
    assert str(info.value).startswith("flow(s) 'w_checked' are not in the database at ")
    assert info.value.details[0] == (
        "create it with `pgflow-sa flows deploy APP w_checked` (or an Alembic migration), "
        "then start the worker again"
    )


async def test_different_flow_refuses_to_start_and_shows_the_diff(db_url: str) -> None:
    other = Flow("w_checked", timeout=10)
    other.step(slug="one")(lambda i, c: i)
    deploy(db_url, other)
    worker = Worker(checked, db_url, settings=FAST)
    with pytest.raises(WorkerStartupError) as info:
        await worker.run()
    assert str(info.value).startswith("the flows in the database differ from the code")
    assert info.value.details == [
        "w_checked: structure: step 'two' is in code but not in the database",
        "w_checked: options: flow option timeout: database has 10, code has 30",
    ]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgflow.workers").fetchone() == (0,)


# --- shutdown, deprecation, recovery ----------------------------------------------------------

gate = threading.Event()
slowish = Flow("w_slowish")


@slowish.step
async def takes_a_while(input: Any, ctx: Context) -> str:
    while not gate.is_set():
        await asyncio.sleep(0.01)
    return "finished"


async def _wait_started(url: str, run_id: uuid.UUID) -> None:
    for _ in range(500):
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT status FROM pgflow.step_tasks WHERE run_id = %s", [run_id]
            ).fetchone()
        if row == ("started",):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the task never started")


async def test_stop_before_run_has_begun_is_not_lost(db_url: str) -> None:
    """worker.stop() right after create_task(worker.run()) (a lifespan that ends at
    once): run() starts up, sees the request and returns."""
    deploy(db_url, slowish)
    worker = Worker(slowish, db_url, settings=FAST)
    serving = asyncio.create_task(worker.run())
    worker.stop()
    await asyncio.wait_for(serving, 30)
    assert worker.ready is not None and worker.ready.is_set()
    # and the same worker object can serve again afterwards
    first_ready = worker.ready
    again = asyncio.create_task(worker.run())
    await asyncio.sleep(0)  # run() begins: a new ready event
    assert worker.ready is not first_ready
    while not worker.ready.is_set():
        assert not again.done()
        await asyncio.sleep(0.05)
    assert not again.done()
    worker.stop()
    await asyncio.wait_for(again, 30)


async def test_stop_lets_in_flight_tasks_finish(db_url: str, engine: AsyncEngine) -> None:
    deploy(db_url, slowish)
    gate.clear()
    async with engine.begin() as conn:
        run = await start_flow_async(conn, slowish, {})
    worker = Worker(slowish, db_url, settings=FAST)
    serving = asyncio.create_task(worker.run())
    await _wait_started(db_url, run.run_id)
    worker.stop()
    await asyncio.sleep(0.2)
    assert not serving.done()  # draining
    gate.set()
    await asyncio.wait_for(serving, 10)
    final = await wait_for_run_async(engine, run.run_id, timeout=5)
    assert final.status is RunStatus.COMPLETED


async def test_unfinished_tasks_are_handed_back_on_shutdown(
    db_url: str, engine: AsyncEngine
) -> None:
    deploy(db_url, slowish)
    gate.clear()
    async with engine.begin() as conn:
        run = await start_flow_async(conn, slowish, {})
    impatient = WorkerSettings(**{**FAST.__dict__, "shutdown_timeout": 0.2})
    worker = Worker(slowish, db_url, settings=impatient)
    serving = asyncio.create_task(worker.run())
    await _wait_started(db_url, run.run_id)
    worker.stop()
    await asyncio.wait_for(serving, 10)
    with psycopg.connect(db_url) as conn:
        status, attempts = conn.execute(
            "SELECT status, attempts_count FROM pgflow.step_tasks WHERE run_id = %s", [run.run_id]
        ).fetchone()
        visible = conn.execute("SELECT count(*) FROM pgmq.q_w_slowish WHERE vt <= now()").fetchone()
    assert (status, attempts) == ("queued", 0)  # not counted as an attempt
    assert visible == (1,)
    gate.set()
    async with running_worker(slowish, db_url):
        final = await wait_for_run_async(engine, run.run_id, timeout=10)
    assert final.status is RunStatus.COMPLETED
    assert final.steps[0].attempts == 1


async def test_deprecated_worker_drains_and_exits(db_url: str) -> None:
    deploy(db_url, slowish)
    worker = Worker(slowish, db_url, settings=FAST)
    serving = asyncio.create_task(worker.run())
    for _ in range(300):
        if worker.ready is not None and worker.ready.is_set():
            break
        await asyncio.sleep(0.01)

    def deprecate() -> None:
        with psycopg.connect(db_url) as conn:
            conn.execute("UPDATE pgflow.workers SET deprecated_at = now()")

    # in a thread: a blocking call here would stop the worker's event loop, and with it
    # a heartbeat holding the row lock the UPDATE waits for (a deadlock, seen once in CI)
    await asyncio.to_thread(deprecate)
    await asyncio.wait_for(serving, 10)  # exits by itself


async def _started_by_a_dead_worker(conn: AsyncConnection, count: int) -> list[uuid.UUID]:
    """Start ``count`` runs and have a worker claim their tasks and then die: its last
    heartbeat is two minutes old (more than the 30 s stall margin)."""
    runs = [(await start_flow_async(conn, slowish, {})).run_id for _ in range(count)]
    dead = uuid.uuid4()
    await conn.execute(
        sa.text(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name, "
            "started_at, last_heartbeat_at) "
            "VALUES (:id, 'w_slowish', 'dead', now() - interval '3 minutes', "
            "now() - interval '2 minutes')"
        ),
        {"id": dead},
    )
    messages = await fn.pgmq_read("w_slowish", 600, count).all_async(conn)
    await fn.start_tasks("w_slowish", [m.msg_id for m in messages], dead).all_async(conn)
    await conn.execute(
        sa.text(
            "UPDATE pgflow.step_tasks SET started_at = started_at - interval '2 minutes', "
            "queued_at = queued_at - interval '2 minutes'"
        )
    )
    return runs


async def test_stalled_tasks_of_a_dead_worker_are_recovered(
    db_url: str, engine: AsyncEngine
) -> None:
    deploy(db_url, slowish)
    gate.set()
    async with engine.begin() as conn:
        [run_id] = await _started_by_a_dead_worker(conn, 1)
    async with running_worker(slowish, db_url):
        final = await wait_for_run_async(engine, run_id, timeout=20)
    assert final.status is RunStatus.COMPLETED
    task = final.steps[0].tasks[0]
    assert task.attempts_count == 2
    assert task.error_message is not None and task.error_message.startswith("Stalled:")


async def test_two_recoverers_never_recover_one_task_twice(
    db_url: str, engine: AsyncEngine
) -> None:
    deploy(db_url, slowish)
    async with engine.begin() as conn:
        await _started_by_a_dead_worker(conn, 20)
    one, two = Worker(slowish, db_url, settings=FAST), Worker(slowish, db_url, settings=FAST)
    counts = await asyncio.gather(one.recover_stalled(), two.recover_stalled())
    assert sum(counts) == 20
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT status, attempts_count FROM pgflow.step_tasks").fetchall()
    assert collections.Counter(rows) == {("queued", 1): 20}
    for worker in (one, two):
        await worker.engine.dispose()


counted: collections.Counter[tuple[str, str]] = collections.Counter()
shared = Flow("w_shared")


@shared.step
async def first(input: Any, ctx: Context) -> list[int]:
    counted[(str(ctx.run_id), "first")] += 1
    await asyncio.sleep(0.005)
    return [1, 2, 3]


@shared.map(depends_on=first)
def fan(item: Any, ctx: Context) -> int:
    counted[(str(ctx.run_id), f"fan{ctx.task_index}")] += 1
    return ctx.task_index


async def test_two_workers_complete_every_task_exactly_once(
    db_url: str, engine: AsyncEngine
) -> None:
    deploy(db_url, shared)
    counted.clear()
    async with running_worker(shared, db_url), running_worker(shared, db_url):
        async with engine.begin() as conn:
            runs = [await start_flow_async(conn, shared, {"i": i}) for i in range(60)]
        finals = await asyncio.gather(
            *[wait_for_run_async(engine, r.run_id, timeout=60) for r in runs]
        )
    assert all(f.status is RunStatus.COMPLETED for f in finals)
    assert set(counted.values()) == {1}
    with psycopg.connect(db_url) as conn:
        per_worker = conn.execute(
            "SELECT max(attempts_count), count(*) FROM pgflow.step_tasks"
        ).fetchone()
    assert per_worker is not None
    assert tuple(per_worker) == (1, 60 * 4)
    assert len(counted) == 60 * 4
