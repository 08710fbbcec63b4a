"""Every pgflow and pgmq function wrapper against the real database, sync and async."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.orm import Session

from pgflow_sa import to_sqlalchemy_url
from pgflow_sa._db import sync_engine
from pgflow_sa.schema import functions as fn
from pgflow_sa.schema import tables
from pgflow_sa.schema.rows import (
    FlowRow,
    MessageRecord,
    QueueMetrics,
    RunRow,
    StepRow,
    StepTaskRecord,
    StepTaskRow,
)


@pytest.fixture
def conn(db_url: str) -> Iterator[sa.Connection]:
    engine = sync_engine(db_url)
    with engine.connect() as connection:
        yield connection
        connection.commit()
    engine.dispose()


@pytest.fixture
async def aconn(db_url: str) -> AsyncIterator[AsyncConnection]:
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    async with engine.connect() as connection:
        yield connection
        await connection.commit()
    await engine.dispose()


def _register_worker(conn: sa.Connection, queue: str) -> uuid.UUID:
    worker_id = uuid.uuid4()
    conn.execute(
        sa.insert(tables.workers).values(
            worker_id=worker_id, queue_name=queue, function_name="tests"
        )
    )
    return worker_id


def test_definition_wrappers(conn: sa.Connection) -> None:
    flow = fn.create_flow("defs", max_attempts=4, timeout=30).one(conn)
    assert isinstance(flow, FlowRow)
    assert (flow.flow_slug, flow.opt_max_attempts, flow.opt_base_delay, flow.opt_timeout) == (
        "defs",
        4,
        5,
        30,
    )
    assert isinstance(flow.created_at, datetime)

    root = fn.add_step("defs", "root").one(conn)
    assert isinstance(root, StepRow)
    assert (root.step_type, root.step_index, root.deps_count, root.opt_timeout) == (
        "single",
        0,
        0,
        None,
    )
    mapped = fn.add_step(
        "defs",
        "each",
        ["root"],
        max_attempts=2,
        base_delay=1,
        timeout=9,
        start_delay=3,
        step_type="map",
    ).one(conn)
    assert (mapped.step_type, mapped.step_index, mapped.deps_count) == ("map", 1, 1)
    assert (
        mapped.opt_max_attempts,
        mapped.opt_base_delay,
        mapped.opt_timeout,
        mapped.opt_start_delay,
    ) == (2, 1, 9, 3)

    assert fn.is_valid_slug("good_slug").one(conn) is True
    assert fn.is_valid_slug("bad-slug").one(conn) is False
    assert fn.calculate_retry_delay(5, 3).one(conn) == 40
    assert fn.calculate_retry_delay(2, 0).one(conn) == 2


def test_worker_protocol_round_trip(conn: sa.Connection) -> None:
    fn.create_flow("proto", base_delay=1).one(conn)
    fn.add_step("proto", "first").one(conn)
    fn.add_step("proto", "second", ["first"]).one(conn)
    worker_id = _register_worker(conn, "proto")

    run = fn.start_flow("proto", {"n": 1}).one(conn)
    assert isinstance(run, RunRow)
    assert (run.status, run.input, run.remaining_steps) == ("started", {"n": 1}, 2)

    messages = fn.pgmq_read_with_poll("proto", 5, 10, max_poll_seconds=1, poll_interval_ms=50).all(
        conn
    )
    assert len(messages) == 1
    assert isinstance(messages[0], MessageRecord)
    assert messages[0].message == {
        "flow_slug": "proto",
        "run_id": str(run.run_id),
        "step_slug": "first",
        "task_index": 0,
    }
    assert messages[0].read_ct == 1
    assert messages[0].headers is None

    tasks = fn.start_tasks("proto", [messages[0].msg_id], worker_id).all(conn)
    assert tasks == [
        StepTaskRecord("proto", run.run_id, "first", {"run": {"n": 1}}, messages[0].msg_id, 0)
    ]
    extended = fn.set_vt_batch("proto", [messages[0].msg_id], [30]).all(conn)
    assert [m.msg_id for m in extended] == [messages[0].msg_id]
    assert extended[0].vt > messages[0].vt

    done = fn.complete_task(run.run_id, "first", 0, 0).all(conn)
    assert isinstance(done[0], StepTaskRow)
    assert (done[0].status, done[0].output) == ("completed", 0)

    second = fn.pgmq_read("proto", 5, 10).all(conn)
    assert [m.message["step_slug"] for m in second] == ["second"]
    claimed = fn.start_tasks("proto", [second[0].msg_id], worker_id).all(conn)
    assert claimed[0].input == {"run": {"n": 1}, "first": 0}

    failed = fn.fail_task(run.run_id, "second", 0, "ValueError: boom").all(conn)
    assert (failed[0].status, failed[0].attempts_count, failed[0].error_message) == (
        "queued",
        1,
        "ValueError: boom",
    )

    state = fn.get_run_with_states(run.run_id).one(conn)
    assert state is not None
    assert state["run"]["status"] == "started"
    assert {s["step_slug"]: s["status"] for s in state["steps"]} == {
        "first": "completed",
        "second": "started",
    }

    metrics = fn.pgmq_metrics("proto").one(conn)
    assert isinstance(metrics, QueueMetrics)
    assert (metrics.queue_name, metrics.queue_length, metrics.total_messages) == ("proto", 1, 2)

    assert fn.poll_for_tasks("proto", 5, 10, 1, 50).all(conn) == []
    fn.start_ready_steps(run.run_id).one(conn)
    fn.maybe_complete_run(run.run_id).one(conn)
    assert fn.cascade_complete_taskless_steps(run.run_id).one(conn) == 0


def test_start_flow_with_states_and_run_id(conn: sa.Connection) -> None:
    fn.create_flow("states").one(conn)
    fn.add_step("states", "only").one(conn)
    run_id = uuid.uuid4()
    result = fn.start_flow_with_states("states", [1, 2], run_id).one(conn)
    assert result["run"]["run_id"] == str(run_id)
    assert result["run"]["input"] == [1, 2]
    assert [s["step_slug"] for s in result["steps"]] == ["only"]
    assert fn.get_run_with_states(uuid.uuid4()).one(conn) is None


def test_falsy_and_null_json_values_survive(conn: sa.Connection) -> None:
    fn.create_flow("falsy").one(conn)
    fn.add_step("falsy", "only").one(conn)
    for value, as_json in (
        (0, "0"),
        (False, "false"),
        ("", '""'),
        ([], "[]"),
        ({}, "{}"),
        (None, "null"),
    ):
        run = fn.start_flow("falsy", value).one(conn)
        assert run.input == value
        stored = conn.execute(
            sa.select(sa.cast(tables.runs.c.input, sa.Text)).where(
                tables.runs.c.run_id == run.run_id
            )
        ).scalar_one()
        assert stored == as_json


def test_pgmq_wrappers(conn: sa.Connection) -> None:
    fn.pgmq_create("plain").one(conn)
    first = fn.pgmq_send("plain", {"a": 1}).one(conn)
    second = fn.pgmq_send("plain", [1, 2], delay=0).one(conn)
    third = fn.pgmq_send("plain", "x", delay=60).one(conn)
    assert first < second < third

    read = fn.pgmq_read("plain", 30, 10).all(conn)
    assert [m.message for m in read] == [{"a": 1}, [1, 2]]
    assert fn.pgmq_read("plain", 30, 10).all(conn) == []

    visible = fn.pgmq_set_vt("plain", [first], 0).all(conn)
    assert [m.msg_id for m in visible] == [first]
    assert [m.msg_id for m in fn.pgmq_read("plain", 30, 10).all(conn)] == [first]

    assert fn.pgmq_archive("plain", [first]).all(conn) == [first]
    assert fn.pgmq_delete("plain", [second, 999999]).all(conn) == [second]
    metrics = fn.pgmq_metrics("plain").one(conn)
    assert (metrics.queue_length, metrics.total_messages) == (1, 3)

    fn.pgmq_enable_notify_insert("plain").one(conn)
    fn.pgmq_disable_notify_insert("plain").one(conn)
    assert fn.pgmq_drop_queue("plain").one(conn) is True


def test_calls_run_in_an_orm_session(db_url: str) -> None:
    engine = sync_engine(db_url)
    with Session(engine) as session, session.begin():
        fn.create_flow("orm").one(session)
        fn.add_step("orm", "only").one(session)
        run = fn.start_flow("orm", {"via": "session"}).one(session)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.runs)).scalar_one() == 1
        assert fn.get_run_with_states(run.run_id).one(conn)["run"]["input"] == {"via": "session"}
    engine.dispose()


async def test_async_wrappers_with_asyncpg(aconn: AsyncConnection) -> None:
    flow = await fn.create_flow("async_flow").one_async(aconn)
    assert flow.opt_max_attempts == 3
    await fn.add_step("async_flow", "root_map", step_type="map").one_async(aconn)
    run = await fn.start_flow("async_flow", [10, 0, False]).one_async(aconn)
    assert isinstance(run.run_id, uuid.UUID)
    worker_id = uuid.uuid4()
    await aconn.execute(
        sa.insert(tables.workers).values(
            worker_id=worker_id, queue_name="async_flow", function_name="tests"
        )
    )

    messages = await fn.pgmq_read_with_poll("async_flow", 5, 10, 1, 50).all_async(aconn)
    assert sorted(m.message["task_index"] for m in messages) == [0, 1, 2]
    tasks = await fn.start_tasks("async_flow", [m.msg_id for m in messages], worker_id).all_async(
        aconn
    )
    assert sorted((t.task_index, t.input) for t in tasks) == [(0, 10), (1, 0), (2, False)]
    for task in tasks:
        await fn.complete_task(task.run_id, task.step_slug, task.task_index, task.input).all_async(
            aconn
        )

    state = await fn.get_run_with_states(run.run_id).one_async(aconn)
    assert state is not None
    assert state["run"]["status"] == "completed"
    assert state["run"]["output"] == {"root_map": [10, 0, False]}
    assert await fn.calculate_retry_delay(1, 4).one_async(aconn) == 16
