"""Starting many runs in one statement: start_flows / start_flows_async."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from pgflow_sa import (
    FlowNotFoundError,
    InvalidInputError,
    RunStatus,
    get_run,
    start_flows,
    start_flows_async,
    to_sqlalchemy_url,
)
from pgflow_sa._db import sync_engine

from .test_client_start import _counts, chain, each
from .worker_harness import deploy


@pytest.fixture
def url(db_url: str) -> str:
    deploy(db_url, chain, each)
    return db_url


def _starts(engine: sa.Engine) -> list[str]:
    statements: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pgflow.start_flow" in statement:
            statements.append(statement)

    return statements


def test_many_runs_in_one_statement_in_input_order(url: str) -> None:
    engine = sync_engine(url)
    starts = _starts(engine)
    inputs: list[Any] = [{"n": i} for i in range(200)] + [None, [], 0, "text"]
    with Session(engine) as session, session.begin():
        runs = start_flows(session, chain, inputs)
    assert len(starts) == 1
    assert [r.input for r in runs] == inputs
    assert all(r.status is RunStatus.STARTED and r.created for r in runs)
    assert len({r.run_id for r in runs}) == len(inputs)
    assert _counts(url, "chain_flow") == (len(inputs), 2 * len(inputs), len(inputs))
    with engine.connect() as conn:
        stored = get_run(conn, runs[7].run_id)
    assert stored is not None and stored.input == {"n": 7}
    engine.dispose()


def test_all_or_nothing_and_checked_before_sending(url: str) -> None:
    engine = sync_engine(url)
    starts = _starts(engine)
    with engine.connect() as conn:
        # a root map needs an array: the third input is refused before anything is sent
        with pytest.raises(InvalidInputError):
            start_flows(conn, each, [[1], [2], {"not": "an array"}])
        assert starts == []
        with pytest.raises(FlowNotFoundError):
            start_flows(conn, "missing_flow", [{}])
        with pytest.raises(InvalidInputError, match="use start_flow for one run"):
            start_flows(conn, chain, {"n": 1})
        assert start_flows(conn, chain, []) == []
        # pgflow refuses a non-array input of a root map given by slug: none start,
        # and the transaction stays usable
        with pytest.raises(InvalidInputError, match="pgflow refused to start flow"):
            start_flows(conn, "each_flow", [[1], {"x": 1}])
        runs = start_flows(conn, "each_flow", [[1, 2], [3]])
        conn.commit()
    assert [r.input for r in runs] == [[1, 2], [3]]
    assert _counts(url, "each_flow") == (2, 2, 3)
    engine.dispose()


async def test_async_in_the_callers_transaction(url: str) -> None:
    engine = create_async_engine(to_sqlalchemy_url(url, "asyncpg"))
    try:
        async with engine.connect() as conn:
            await start_flows_async(conn, chain, [{"n": 1}, {"n": 2}])
            await conn.rollback()
        assert _counts(url, "chain_flow") == (0, 0, 0)
        async with engine.begin() as conn:
            runs = await start_flows_async(conn, chain, [{"n": 1}, {"n": 2}, {"n": 3}])
        assert [r.input for r in runs] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert _counts(url, "chain_flow") == (3, 6, 3)
    finally:
        await engine.dispose()
