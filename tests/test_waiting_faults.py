"""Waiting under faults and forgeries: notifications are hints, the listener heals,
the blocking API reuses what it opens."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from pgflow_sa import (
    DatabaseUnavailableError,
    RunStatus,
    RunTimeoutError,
    async_engine_from_url,
    start_flow_async,
    to_sqlalchemy_url,
    wait_for_run,
    wait_for_run_async,
    watch_run,
)
from pgflow_sa.waiting import watcher_for

from .driver import drive
from .test_waiting import chain
from .worker_harness import deploy


def _engine(url: str, **kw: Any) -> AsyncEngine:
    return create_async_engine(to_sqlalchemy_url(url, "asyncpg"), **kw)


def _as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


@contextlib.contextmanager
def _role(url: str, *, grants: bool, limit: int = -1) -> Iterator[str]:
    """A login role of its own (no superuser); with ``grants``, it may read pgflow's tables."""
    name = f"waiter_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT {limit}")
        if grants:
            admin.execute(f"GRANT USAGE ON SCHEMA pgflow TO {name}")
            admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA pgflow TO {name}")
            # runs are read with their cancellation and retry (run control)
            admin.execute(f"GRANT USAGE ON SCHEMA pgflow_sa TO {name}")
            admin.execute(
                f"GRANT SELECT ON pgflow_sa.run_cancellations, pgflow_sa.run_retries TO {name}"
            )
    try:
        yield name
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [name]
            )
            admin.execute(f"DROP OWNED BY {name}")
            admin.execute(f"DROP ROLE {name}")


async def _start(engine: AsyncEngine, input: Any = None) -> uuid.UUID:
    async with engine.begin() as conn:
        run = await start_flow_async(conn, chain, input or {})
    return run.run_id


async def _until(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _driving(engine: AsyncEngine, after: float = 0.0) -> AsyncIterator[list[float]]:
    """Drive the flow's tasks (after ``after`` s); yields [when the driver started]."""
    stop = asyncio.Event()
    started: list[float] = []

    async def go() -> None:
        await asyncio.sleep(after)
        started.append(time.monotonic())
        await drive(engine, "waited", stop)

    task = asyncio.create_task(go())
    try:
        yield started
    finally:
        stop.set()
        await task


@pytest.fixture
async def other(db_url: str) -> AsyncIterator[AsyncEngine]:
    """The superuser engine that starts and drives runs."""
    deploy(db_url, chain)
    engine = _engine(db_url)
    yield engine
    await engine.dispose()


def _forge(url: str, run_id: uuid.UUID, event: str) -> None:
    message = json.dumps(
        {"topic": f"pgflow:run:{run_id}", "event": event, "payload": {"status": "completed"}}
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify('pgflow', %s)", [message])


async def test_a_forged_completion_does_not_end_a_wait(db_url: str, other: AsyncEngine) -> None:
    """Anyone who can connect can NOTIFY: a forged run:completed costs one read, and
    the wait returns the true state once the run really finishes."""
    run_id = await _start(other, {"k": 1})
    waiter = _engine(db_url)
    try:
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
        watcher = watcher_for(waiter)
        await _until(lambda: watcher.mode == "notify")
        with _role(db_url, grants=False) as forger:
            _forge(_as_role(db_url, forger), run_id, "run:completed")
            _forge(_as_role(db_url, forger), run_id, "run:failed")
        await asyncio.sleep(1.0)
        assert not waiting.done(), "a forged notification ended the wait"
        async with _driving(other):
            run = await waiting
        assert run.status is RunStatus.COMPLETED
        assert run.output == {"second": {"step": "second", "index": 0}}
    finally:
        await waiter.dispose()


async def test_a_forged_step_event_is_not_watched(db_url: str, other: AsyncEngine) -> None:
    run_id = await _start(other)
    waiter = _engine(db_url)
    seen: list[str] = []
    try:

        async def collect() -> None:
            async for ev in watch_run(waiter, run_id, timeout=30):
                seen.append(ev.event)

        watching = asyncio.create_task(collect())
        watcher = watcher_for(waiter)
        await _until(lambda: watcher.mode == "notify")
        _forge(db_url, run_id, "step:second:completed")
        _forge(db_url, run_id, "run:completed")
        await asyncio.sleep(1.0)
        assert seen == [] and not watching.done()
        async with _driving(other):
            await watching
        assert seen[-1] == "run:completed"
        assert seen.index("step:first:completed") < seen.index("step:second:started")
        assert seen.index("step:second:started") < seen.index("step:second:completed")
    finally:
        await waiter.dispose()


async def test_terminated_listener_backends_do_not_stall_a_wait(
    db_url: str, other: AsyncEngine
) -> None:
    """For 2 s every LISTEN backend is terminated as soon as it is seen (the first
    connection and every reconnection); the run finishes at 1 s; the wait returns
    within about 3 s of that, and the watcher listens again afterwards."""
    run_id = await _start(other)
    waiter = _engine(db_url)
    killing = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        with psycopg.connect(db_url, autocommit=True) as admin:
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                rows = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND (query LIKE 'LISTEN%' OR query LIKE '%pgflow_sa.notify%')"
                ).fetchall()
                killed.extend(1 for _ in rows)
                killing.set()
                time.sleep(0.005)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        killing.wait(5)
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
        async with _driving(other, after=1.0) as started:
            run = await waiting
            returned = time.monotonic()
        assert run.status is RunStatus.COMPLETED
        assert killed, "the killer never saw a LISTEN backend"
        assert returned - started[0] < 4.0, f"returned {returned - started[0]:.1f} s after"
        # healed: the next wait listens again
        run_id2 = await _start(other)
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id2, timeout=30))
        watcher = watcher_for(waiter)
        await _until(lambda: watcher.mode == "notify", 10)
        async with _driving(other):
            assert (await waiting).status is RunStatus.COMPLETED
    finally:
        thread.join()
        await waiter.dispose()


async def test_a_connection_limit_at_the_start_does_not_break_waiting(
    db_url: str, other: AsyncEngine
) -> None:
    """The waiting role is at its connection limit when the wait begins (its first
    read and the listener's first connect both fail); the limit clears after 1 s,
    the run finishes at 1.5 s, and the wait returns soon after. The next wait on the
    same engine is woken by notifications again."""
    run_id = await _start(other)
    with _role(db_url, grants=True, limit=3) as role:
        role_url = _as_role(db_url, role)
        blockers = [psycopg.connect(role_url) for _ in range(3)]
        waiter = _engine(role_url)
        try:
            waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
            await asyncio.sleep(1.0)
            assert not waiting.done(), waiting.exception() if waiting.done() else None
            for conn in blockers:
                conn.close()
            async with _driving(other, after=0.5) as started:
                run = await waiting
                returned = time.monotonic()
            assert run.status is RunStatus.COMPLETED
            assert returned - started[0] < 4.0, f"returned {returned - started[0]:.1f} s after"
            await waiter.dispose()  # the pool's idle connections count against the limit too
            run_id2 = await _start(other)
            waiting = asyncio.create_task(wait_for_run_async(waiter, run_id2, timeout=30))
            watcher = watcher_for(waiter)
            await _until(lambda: watcher.mode == "notify", 10)
            async with _driving(other):
                assert (await waiting).status is RunStatus.COMPLETED
        finally:
            for conn in blockers:
                conn.close()
            await waiter.dispose()


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _connections(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _async_engines() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, AsyncEngine))


def test_300_sync_waits_reuse_one_engine(db_url: str) -> None:
    """The blocking API keeps one engine per database URL: 300 waits (by URL and by
    Engine) grow memory by less than 30 MiB and leave at most 3 connections."""
    deploy(db_url, chain)

    async def finish_one() -> uuid.UUID:
        engine = _engine(db_url)
        try:
            run_id = await _start(engine)
            stop = asyncio.Event()
            task = asyncio.create_task(drive(engine, "waited", stop))
            await wait_for_run_async(engine, run_id, timeout=30)
            stop.set()
            await task
            return run_id
        finally:
            await engine.dispose()

    run_id = asyncio.run(finish_one())
    sync_engine = create_engine(to_sqlalchemy_url(db_url))
    try:
        for _ in range(20):
            wait_for_run(db_url, run_id)
        gc.collect()
        rss_before, engines_before = _rss_kib(), _async_engines()
        for i in range(300):
            run = wait_for_run(db_url if i % 2 else sync_engine, run_id, timeout=10)
            assert run.status is RunStatus.COMPLETED
        gc.collect()
        grown_mib = (_rss_kib() - rss_before) / 1024
        assert _async_engines() <= engines_before + 1
        assert grown_mib < 30, f"RSS grew {grown_mib:.1f} MiB"
        assert _connections(db_url) <= 3
    finally:
        sync_engine.dispose()


async def test_the_listening_connection_never_sits_in_a_transaction(
    db_url: str, other: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its pings leave no transaction open (one would hold back vacuum, and a session
    in a transaction gets no notifications until it ends), and notifications keep
    waking waits after several pings."""
    from pgflow_sa import _listen

    monkeypatch.setattr(_listen, "PING_INTERVAL", 0.1)
    waiter = _engine(db_url)
    try:
        run_id = await _start(other)
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
        watcher = watcher_for(waiter)
        watcher.safety_interval = 120  # only a notification can wake the wait
        await _until(lambda: watcher.mode == "notify")
        await asyncio.sleep(0.5)  # several pings
        with psycopg.connect(db_url, autocommit=True) as admin:
            states = admin.execute(
                "SELECT state FROM pg_stat_activity WHERE datname = current_database()"
                " AND query = 'SELECT 1'"
            ).fetchall()
        assert states == [("idle",)]
        began = time.monotonic()
        async with _driving(other):
            run = await waiting
        assert run.status is RunStatus.COMPLETED
        assert time.monotonic() - began < 5 and watcher.polls == 0
    finally:
        await waiter.dispose()


async def test_malformed_notifications_are_ignored_quietly(
    db_url: str, other: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = await _start(other)
    waiter = _engine(db_url)
    try:
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
        watcher = watcher_for(waiter)
        await _until(lambda: watcher.mode == "notify")
        with psycopg.connect(db_url, autocommit=True) as conn:
            for payload in ("[" * 3000 + "]" * 3000, "not json", '{"topic": 1}', "null"):
                conn.execute("SELECT pg_notify('pgflow', %s)", [payload])
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        async with _driving(other):
            assert (await waiting).status is RunStatus.COMPLETED
    finally:
        await waiter.dispose()


def test_a_forked_child_leaves_the_parents_waits_alone(db_url: str) -> None:
    """A child forked after a blocking wait (gunicorn, multiprocessing) waits on its
    own loop and exits normally; the parent's next wait still works."""
    deploy(db_url, chain)

    async def finished_run() -> uuid.UUID:
        engine = _engine(db_url)
        try:
            run_id = await _start(engine)
            async with _driving(engine):
                await wait_for_run_async(engine, run_id, timeout=30)
            return run_id
        finally:
            await engine.dispose()

    run_id = asyncio.run(finished_run())
    script = Path(__file__).parent / "apps" / "fork_waits.py"
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(script), db_url, str(run_id)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.stdout.startswith("OK completed 0"), done.stdout + done.stderr


async def test_a_server_that_stays_down_ends_waits_at_their_timeout() -> None:
    """The server stops for good 1 s into a 3 s wait and a 3 s watch: both end within
    their timeout plus the few seconds allowed to read a last state, with a clear error."""
    from pgflow_sa import DatabaseUnavailableError, RunTimeoutError, install_schema
    from pgflow_sa.waiting import FINAL_READ_GRACE

    from .throwaway_server import throwaway_server

    with throwaway_server() as server:
        url = server.url("postgres")
        install_schema(url)
        deploy(url, chain)
        engine = _engine(url)
        try:
            run_id = await _start(engine)

            async def watch() -> None:
                async for _ in watch_run(engine, run_id, timeout=3):
                    pass

            began = time.monotonic()
            waits = [
                asyncio.create_task(wait_for_run_async(engine, run_id, timeout=3)),
                asyncio.create_task(watch()),
            ]
            await asyncio.sleep(1)
            await asyncio.to_thread(server.stop, "immediate")
            done, _ = await asyncio.wait(waits, timeout=3 + FINAL_READ_GRACE + 3)
            took = time.monotonic() - began
            assert len(done) == 2, f"still waiting after {took:.1f} s"
            for task in waits:
                assert isinstance(task.exception(), (DatabaseUnavailableError, RunTimeoutError))
        finally:
            await engine.dispose()


async def test_a_flood_of_forged_notifications_costs_a_few_reads(
    db_url: str, other: AsyncEngine
) -> None:
    """5,000 forged run:completed notifications in about a second: the wait reads the
    run a few times a second, not once per notification, and still returns the truth."""
    from sqlalchemy import event

    run_id = await _start(other)
    waiter = _engine(db_url)
    reads: list[float] = []

    @event.listens_for(waiter.sync_engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM pgflow.runs" in statement:
            reads.append(time.monotonic())

    try:
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
        watcher = watcher_for(waiter)
        await _until(lambda: watcher.mode == "notify")
        message = json.dumps({"topic": f"pgflow:run:{run_id}", "event": "run:completed"})
        began = time.monotonic()
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_notify('pgflow', %s || g || '}') FROM generate_series(1, 5000) g",
                [message[:-1] + ', "n": '],
            )
            conn.execute("SELECT 1")
        await asyncio.sleep(1.0)
        flood = [t for t in reads if t >= began]
        elapsed = time.monotonic() - began
        assert len(flood) <= 15 * elapsed + 3, f"{len(flood)} reads in {elapsed:.1f} s"
        assert not waiting.done()
        async with _driving(other):
            assert (await waiting).status is RunStatus.COMPLETED
    finally:
        await waiter.dispose()


async def test_the_direct_listen_engine_is_kept_only_while_a_wait_listens(
    db_url: str, other: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a transaction pooler, waits LISTEN through an engine of their own on
    PGFLOW_SA_LISTEN_URL: once no wait listens, nothing keeps it (a table of them kept
    every one made until the process ended, and disposed of none)."""
    monkeypatch.setenv("PGFLOW_SA_POOLER", "transaction")
    monkeypatch.setenv("PGFLOW_SA_LISTEN_URL", db_url)
    database = make_url(db_url).database

    def listen_engines() -> int:
        return sum(
            1
            for obj in gc.get_objects()
            if isinstance(obj, AsyncEngine)
            and isinstance(obj.pool, NullPool)
            and obj.url.database == database
        )

    waiter = async_engine_from_url(db_url)
    try:
        run_id = await _start(other)
        waiting = asyncio.create_task(wait_for_run_async(waiter, run_id, timeout=30))
        await _until(lambda: watcher_for(waiter).mode == "notify")
        assert listen_engines() == 1
        async with _driving(other):
            assert (await waiting).status is RunStatus.COMPLETED
    finally:
        await waiter.dispose()
    gc.collect()
    assert listen_engines() == 0


async def test_waits_cut_off_at_tiny_deadlines_leave_no_connection_behind(
    db_url: str, other: AsyncEngine
) -> None:
    """Waits whose deadlines cut off their reads (and stop the watcher's listener) in
    the middle of checking out a connection: each read closes what it opened, so the
    garbage collector finds no connection to terminate (it warns when it does: seen on
    Python 3.10) and the pool has none left checked out."""
    run_id = await _start(other)
    waiter = _engine(db_url, pool_size=2, max_overflow=30, pool_pre_ping=True)
    outcomes: collections.Counter[str] = collections.Counter()
    checkouts = itertools.count()

    @event.listens_for(waiter.sync_engine, "checkout")
    def slow_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        # every third checkout outlasts a read's shortest allowance (50 ms), so that some
        # deadlines surely fall in the middle of one, however fast the machine
        if next(checkouts) % 3 == 0:
            dbapi_conn.cursor().execute("SELECT pg_sleep(0.08)")

    async def wait(deadline: float) -> None:
        try:
            await wait_for_run_async(waiter, run_id, timeout=deadline)
        except (RunTimeoutError, DatabaseUnavailableError) as exc:
            outcomes[type(exc).__name__] += 1

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in range(40):
                await asyncio.gather(*(wait(0.005 * ((7 * n + i) % 100)) for i in range(6)))
                if n % 10 == 9:
                    gc.collect()
            await _until(lambda: waiter.pool.checkedout() == 0)
            gc.collect()
        left = [str(w.message) for w in caught if "non-checked-in" in str(w.message)]
        assert left == []
        assert outcomes["DatabaseUnavailableError"] > 0, outcomes  # reads were cut off
        assert outcomes["RunTimeoutError"] > 0, outcomes  # and waits got to listen
    finally:
        await waiter.dispose()
