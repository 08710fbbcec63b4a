"""Waiting for runs and watching them: LISTEN/NOTIFY, the polling fallback, timeouts."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pgflow_sa import (
    Context,
    DatabaseUnavailableError,
    Flow,
    RunNotFoundError,
    RunStatus,
    RunTimeoutError,
    get_run_async,
    start_flow_and_wait,
    start_flow_and_wait_async,
    start_flow_async,
    to_sqlalchemy_url,
    wait_for_run,
    wait_for_run_async,
    watch_run,
)
from pgflow_sa.waiting import parse_notification, watcher_for

from .driver import drive
from .worker_harness import deploy

chain = Flow("waited")


@chain.step
def first(input: Any, ctx: Context) -> Any:
    return input


@chain.step(depends_on=[first])
def second(input: Any, ctx: Context) -> Any:
    return input


def _deploy(url: str) -> None:
    deploy(url, chain)


def _engine(url: str) -> AsyncEngine:
    return create_async_engine(to_sqlalchemy_url(url, "asyncpg"))


@pytest.fixture
async def engines(db_url: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """(engine the waiter uses, engine for starting and driving runs)."""
    _deploy(db_url)
    waiter, other = _engine(db_url), _engine(db_url)
    yield waiter, other
    await waiter.dispose()
    await other.dispose()


def _count_run_reads(engine: AsyncEngine) -> list[str]:
    reads: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM pgflow.runs" in statement:
            reads.append(statement)

    return reads


async def _wait_many(waiter: AsyncEngine, other: AsyncEngine, count: int) -> list[Any]:
    async with other.begin() as conn:
        runs = [await start_flow_async(conn, chain, {"n": i}) for i in range(count)]
    waits = [asyncio.create_task(wait_for_run_async(waiter, r.run_id, timeout=60)) for r in runs]
    watcher = watcher_for(waiter)
    for _ in range(500):
        if len(watcher._subs) == count:
            break
        await asyncio.sleep(0.01)
    assert len(watcher._subs) == count
    for _ in range(500):  # the listener connects in the background
        if watcher.mode == "notify" or not watcher.use_notifications:
            break
        await asyncio.sleep(0.01)
    mode = watcher.mode
    stop = asyncio.Event()
    driver = asyncio.create_task(drive(other, "waited", stop))
    results = await asyncio.gather(*waits)
    stop.set()
    assert await driver == 2 * count
    assert [r.run_id for r in results] == [r.run_id for r in runs]
    return [mode, results]


async def test_200_concurrent_waits_ride_on_notifications(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    waiter, other = engines
    reads = _count_run_reads(waiter)
    watcher = watcher_for(waiter)
    watcher.safety_interval = 120  # prove that nothing but notifications wakes the waits

    mode, results = await _wait_many(waiter, other, 200)

    assert mode == "notify"
    assert watcher.polls == 0
    # one read when each wait begins and one when its run:completed arrives; no
    # polling, only the one batched check made when listening began
    assert watcher.checks <= 1
    assert len(reads) == 2 * 200 + watcher.checks
    assert all(r.status is RunStatus.COMPLETED for r in results)
    assert results[7].output == {"second": {"step": "second", "index": 0}}
    assert [s.step_slug for s in results[7].steps] == ["first", "second"]
    assert watcher.mode == "idle"


async def test_polling_fallback_when_the_publisher_is_off(db_url: str) -> None:
    _deploy(db_url)
    database = make_url(db_url).database
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{database}\" SET pgflow_sa.notify = 'off'")
    waiter, other = _engine(db_url), _engine(db_url)
    try:
        reads = _count_run_reads(waiter)
        watcher = watcher_for(waiter)
        watcher.poll_interval = 0.05
        mode, results = await _wait_many(waiter, other, 30)
        assert mode == "poll"
        assert watcher.polls >= 1
        assert all(r.status is RunStatus.COMPLETED for r in results)
        # batched: one query per poll for all 30 runs, plus each wait's first and last read
        assert len(reads) <= 2 * 30 + watcher.polls
    finally:
        await waiter.dispose()
        await other.dispose()


async def test_timeout_carries_the_last_state(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    waiter, other = engines
    async with other.begin() as conn:
        run = await start_flow_async(conn, chain, {})
    with pytest.raises(RunTimeoutError) as info:
        await wait_for_run_async(waiter, run.run_id, timeout=0.2)
    assert str(info.value) == (
        f"run {run.run_id} of flow 'waited' did not finish within 0.2 s "
        "(status started, 2 step(s) remaining)"
    )
    assert info.value.run.run_id == run.run_id
    assert [s.status.value for s in info.value.run.steps] == ["started", "created"]


async def test_unknown_run(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    waiter, _ = engines
    missing = uuid.uuid4()
    with pytest.raises(RunNotFoundError, match=f"there is no run {missing}"):
        await wait_for_run_async(waiter, missing, timeout=1)


async def test_watch_yields_step_and_run_events(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    waiter, other = engines
    async with other.begin() as conn:
        run = await start_flow_async(conn, chain, {"k": 1})
    seen: list[str] = []
    stop = asyncio.Event()

    async def collect() -> None:
        async for ev in watch_run(waiter, run.run_id, timeout=30):
            seen.append(ev.event)

    watching = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    driver = asyncio.create_task(drive(other, "waited", stop))
    await watching
    stop.set()
    await driver
    assert seen[-1] == "run:completed"
    assert seen.index("step:first:completed") < seen.index("step:second:started")
    assert seen.index("step:second:started") < seen.index("step:second:completed")
    # a finished run yields its final event at once
    finished = [ev.event async for ev in watch_run(waiter, run.run_id)]
    assert finished == ["run:completed"]


async def test_start_and_wait_subscribes_before_starting(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    waiter, other = engines
    stop = asyncio.Event()
    driver = asyncio.create_task(drive(other, "waited", stop))
    run = await start_flow_and_wait_async(waiter, chain, {"fast": True}, timeout=30)
    stop.set()
    await driver
    assert run.status is RunStatus.COMPLETED
    assert run.input == {"fast": True}


def test_blocking_api_for_sync_code(db_url: str) -> None:
    _deploy(db_url)
    stop = threading.Event()

    def background() -> None:
        async def main() -> None:
            engine = _engine(db_url)
            await drive(engine, "waited", stop)
            await engine.dispose()

        asyncio.run(main())

    thread = threading.Thread(target=background)
    thread.start()
    try:
        run = start_flow_and_wait(db_url, "waited", [1, 2], timeout=30)
        again = wait_for_run(db_url, run.run_id, timeout=5)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert run.status is RunStatus.COMPLETED
    assert again == run


async def test_blocking_api_refuses_a_running_loop(db_url: str) -> None:
    with pytest.raises(RuntimeError, match="use the \\*_async function instead"):
        wait_for_run(db_url, uuid.uuid4())


def test_parse_notification() -> None:
    rid = uuid.uuid4()
    ev = parse_notification(
        f'{{"topic": "pgflow:run:{rid}", "event": "step:my_step:failed", '
        '"payload": {"trimmed": true, "status": "failed"}}'
    )
    assert ev is not None
    assert (ev.run_id, ev.step_slug, ev.status, ev.trimmed) == (rid, "my_step", "failed", True)
    run_ev = parse_notification(
        f'{{"topic": "pgflow:run:{rid}", "event": "run:completed", "payload": {{}}}}'
    )
    assert run_ev is not None and run_ev.finishes_run and run_ev.is_run_event
    assert parse_notification("not json") is None
    assert parse_notification('{"topic": "other", "event": "x"}') is None


async def test_unreachable_database_is_one_clear_error() -> None:
    engine = _engine("postgresql://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(DatabaseUnavailableError, match="cannot use the database at postgresql"):
            await wait_for_run_async(engine, uuid.uuid4(), timeout=1)
    finally:
        await engine.dispose()


async def test_lost_connection_is_translated(db_url: str) -> None:
    engine = _engine(db_url)
    try:
        async with engine.connect() as conn:
            pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
            with psycopg.connect(db_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            with pytest.raises(DatabaseUnavailableError, match="cannot use the database: "):
                await get_run_async(conn, uuid.uuid4())
    finally:
        await engine.dispose()
