"""The worker's claims and settles, run straight on asyncpg: the same rows and the same
error classification as through SQLAlchemy, and no broken connection left in the pool."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from pgflow_sa import Flow
from pgflow_sa._db import DB_ERRORS, ErrorKind, classify, sqlstate
from pgflow_sa.config import async_engine_from_url
from pgflow_sa.schema import worker_queries
from pgflow_sa.worker.direct import DirectStatements

from .worker_harness import deploy

one = Flow("direct_one")


@one.step
async def only(input: Any) -> int:
    return 1


APP = "pgflow-sa direct test"


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    deploy(db_url, one)
    engine = async_engine_from_url(
        db_url,
        pool_size=1,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": APP}},
    )
    yield engine
    await engine.dispose()


def _admin(url: str, statement: str, params: Any = None) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def _register(url: str) -> uuid.UUID:
    worker_id = uuid.uuid4()
    _admin(
        url,
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) "
        "VALUES (%s, 'direct_one', 'test')",
        [worker_id],
    )
    return worker_id


async def _through_sqlalchemy(engine: AsyncEngine, query: worker_queries.Query) -> list[Any]:
    async with engine.begin() as conn:
        return list((await conn.execute(*query)).all())


async def test_claims_and_settles_return_what_sqlalchemy_returns(
    db_url: str, engine: AsyncEngine
) -> None:
    worker_id = _register(db_url)
    direct = DirectStatements(engine)
    _admin(db_url, "SELECT pgflow.start_flow('direct_one', %s)", ['{"n": [1, false]}'])
    _admin(db_url, "SELECT pgflow.start_flow('direct_one', %s)", ['{"n": [1, false]}'])
    claim = worker_queries.claim("direct_one", 2, 1, worker_id)
    [ours] = await direct.rows(claim)
    [theirs] = await _through_sqlalchemy(engine, claim)
    assert ours._fields == tuple(theirs._fields)
    assert ours.input == theirs.input == {"run": {"n": [1, False]}}
    assert [type(v) for v in ours] == [type(v) for v in theirs]
    assert ours.run_id != theirs.run_id and ours.step_slug == theirs.step_slug == "only"

    fences = [
        (r.run_id, r.step_slug, r.task_index, worker_id, r.started_at) for r in (ours, theirs)
    ]
    settled = await direct.rows(worker_queries.complete_fenced(fences, [0, False]))
    assert {(r.run_id, r.step_slug, r.task_index) for r in settled} == {f[:3] for f in fences}
    outputs = _admin(db_url, "SELECT output FROM pgflow.step_tasks ORDER BY output::text")
    assert outputs == [(0,), (False,)]  # falsy outputs stay themselves
    assert await direct.rows(worker_queries.complete_fenced(fences, [1, 1])) == []  # fenced


async def test_a_refused_statement_is_classified_as_through_sqlalchemy(
    db_url: str, engine: AsyncEngine
) -> None:
    worker_id = _register(db_url)
    _admin(db_url, "SELECT pgmq.drop_queue('direct_one')")
    claim = worker_queries.claim("direct_one", 2, 1, worker_id)
    errors = []
    for run in (DirectStatements(engine).rows, lambda q: _through_sqlalchemy(engine, q)):
        with pytest.raises(DB_ERRORS) as raised:
            await run(claim)
        errors.append(raised.value)
    assert [classify(e) for e in errors] == [ErrorKind.REFUSED, ErrorKind.REFUSED]
    assert sqlstate(errors[0]) == sqlstate(errors[1]) == "42P01"


async def test_a_lost_connection_is_classified_as_through_sqlalchemy_and_replaced(
    db_url: str, engine: AsyncEngine
) -> None:
    direct = DirectStatements(engine)
    query = worker_queries.settled_by([])
    for run in (direct.rows, lambda q: _through_sqlalchemy(engine, q)):
        assert await run(query) == []  # the pool's one connection is open
        _admin(
            db_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [APP],
        )
        with pytest.raises(DB_ERRORS) as raised:
            await run(query)
        assert classify(raised.value) is ErrorKind.CONNECTION, repr(raised.value)
        assert await run(query) == []  # on a new connection: the lost one was discarded


async def test_a_cancelled_statement_leaves_no_connection_behind(
    db_url: str, engine: AsyncEngine
) -> None:
    worker_id = _register(db_url)
    direct = DirectStatements(engine)
    _admin(db_url, "SELECT pgflow.start_flow('direct_one', '{}')")
    [task] = await direct.rows(worker_queries.claim("direct_one", 2, 1, worker_id))
    fence = (task.run_id, task.step_slug, task.task_index, worker_id, task.started_at)
    with psycopg.connect(db_url) as locker:  # holds the run's row: the settle waits
        locker.execute("SELECT 1 FROM pgflow.runs FOR UPDATE")
        settle = asyncio.ensure_future(direct.rows(worker_queries.complete_fenced([fence], [1])))
        await asyncio.sleep(0.5)
        assert not settle.done()
        settle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settle
        locker.rollback()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # its connection was closed, not returned: the next statement runs on a new one. The
    # server may still have finished the cancelled one once the lock was released (as
    # after any lost connection): the fence lets the settle be written once either way
    again = await direct.rows(worker_queries.complete_fenced([fence], [1]))
    assert len(again) <= 1
    assert _admin(db_url, "SELECT status, attempts_count FROM pgflow.step_tasks") == [
        ("completed", 1)
    ]
