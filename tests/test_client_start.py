"""Starting flows inside the caller's transaction (sync psycopg and async asyncpg)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pgflow_sa import (
    Context,
    Flow,
    FlowNotFoundError,
    InvalidInputError,
    RunStatus,
    get_run,
    get_run_async,
    start_flow,
    start_flow_async,
    to_sqlalchemy_url,
)
from pgflow_sa._db import sync_engine

from .worker_harness import deploy

chain = Flow("chain_flow")


@chain.step
def first(input: Any, ctx: Context) -> Any:
    return input


@chain.step(depends_on=[first])
def second(input: Any, ctx: Context) -> Any:
    return input


each = Flow("each_flow")
each.map(slug="item")(first)


def _counts(url: str, slug: str) -> tuple[int, int, int]:
    """(runs, step states, queued messages) of a flow."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT (SELECT count(*) FROM pgflow.runs WHERE flow_slug = %s),"
            f" (SELECT count(*) FROM pgflow.step_states WHERE flow_slug = %s),"
            f" (SELECT count(*) FROM pgmq.q_{slug})",
            [slug, slug],
        ).fetchone()
    assert row is not None
    return (row[0], row[1], row[2])


@pytest.fixture
def url(db_url: str) -> str:
    deploy(db_url, chain, each)
    return db_url


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    engine = sync_engine(url)
    yield engine
    engine.dispose()


def test_commit_leaves_one_run_with_its_states_and_message(url: str, engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        run = start_flow(session, chain, {"n": 1})
        assert run.status is RunStatus.STARTED and run.created
    assert _counts(url, "chain_flow") == (1, 2, 1)
    with engine.connect() as conn:
        stored = get_run(conn, run.run_id)
    assert stored is not None
    assert (stored.input, stored.remaining_steps) == ({"n": 1}, 2)


def test_rollback_leaves_nothing(url: str, engine: sa.Engine) -> None:
    with Session(engine) as session:
        session.begin()
        start_flow(session, chain, {"n": 1})
        start_flow(session, "each_flow", [1, 2, 3])
        session.rollback()
    assert _counts(url, "chain_flow") == (0, 0, 0)
    assert _counts(url, "each_flow") == (0, 0, 0)


def test_on_a_plain_connection(url: str, engine: sa.Engine) -> None:
    with engine.connect() as conn:
        run = start_flow(conn, each, [1, 2, 3])
        assert _counts(url, "each_flow") == (0, 0, 0)  # not visible before commit
        conn.commit()
    assert _counts(url, "each_flow") == (1, 1, 3)
    assert run.input == [1, 2, 3]


async def test_async_commit_and_rollback(url: str) -> None:
    aengine = create_async_engine(to_sqlalchemy_url(url, "asyncpg"))
    try:
        async with AsyncSession(aengine) as session:
            async with session.begin():
                run = await start_flow_async(session, chain, {"n": 2})
            async with session.begin():
                await start_flow_async(session, chain, {"n": 3})
                await session.rollback()
        assert _counts(url, "chain_flow") == (1, 2, 1)
        async with aengine.connect() as conn:
            stored = await get_run_async(conn, run.run_id)
            assert stored is not None and stored.input == {"n": 2}
            await start_flow_async(conn, "each_flow", [0])
            await conn.rollback()
        assert _counts(url, "each_flow") == (0, 0, 0)
    finally:
        await aengine.dispose()


def test_same_run_id_starts_one_run(url: str, engine: sa.Engine) -> None:
    run_id = uuid.uuid4()
    with Session(engine) as session, session.begin():
        created = start_flow(session, chain, {"n": 1}, run_id=run_id)
    with Session(engine) as session, session.begin():
        again = start_flow(session, chain, {"n": 999}, run_id=str(run_id))
    assert created.created and not again.created
    assert again.run_id == run_id and again.input == {"n": 1}
    assert _counts(url, "chain_flow") == (1, 2, 1)


def test_unknown_flow_names_the_fix_and_keeps_the_transaction(url: str, engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(FlowNotFoundError) as info:
            start_flow(session, "not_deployed", {})
        assert str(info.value).startswith(
            "flow 'not_deployed' is not in this database: create it with "
            "`pgflow-sa flows deploy APP not_deployed` (or an Alembic migration)"
        )
        start_flow(session, chain, {"still": "usable"})
    assert _counts(url, "chain_flow") == (1, 2, 1)


def test_bad_input_is_refused_before_any_sql(url: str, engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidInputError, match="must be a JSON array, not dict"):
            start_flow(session, each, {"not": "a list"})
        with pytest.raises(InvalidInputError, match="it is not JSON-serialisable"):
            start_flow(session, chain, {"when": object()})
        with pytest.raises(InvalidInputError, match="run_id must be a UUID, not 'abc'"):
            start_flow(session, chain, {}, run_id="abc")
    assert _counts(url, "each_flow") == (0, 0, 0)
    assert _counts(url, "chain_flow") == (0, 0, 0)


def test_pgflow_refusal_is_translated_and_keeps_the_transaction(
    url: str, engine: sa.Engine
) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidInputError) as info:
            start_flow(session, "each_flow", {"not": "a list"})  # by slug: pgflow checks
        assert str(info.value) == (
            "pgflow refused to start flow 'each_flow': Flow each_flow has root map steps but "
            "input is not an array (got object)"
        )
        start_flow(session, "each_flow", [1])
    assert _counts(url, "each_flow") == (1, 1, 1)
