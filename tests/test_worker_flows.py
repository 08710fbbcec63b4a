"""The worker runs real flows end to end: shapes, inputs, maps, retries, timeouts."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pydantic
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pgflow_sa import Context, Flow, RunStatus, StepStatus, events, to_sqlalchemy_url

from .worker_harness import deploy, run_and_wait, running_worker


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    yield engine
    await engine.dispose()


# --- shapes ------------------------------------------------------------------------

chain = Flow("w_chain")
seen_contexts: list[Context] = []


@chain.step
def fetch(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    seen_contexts.append(ctx)
    return {"url": input["url"], "size": 3}


@chain.step(depends_on=[fetch])
async def convert(input: dict[str, Any], ctx: Context) -> str:
    seen_contexts.append(ctx)
    assert "run" not in input
    return f"{input['fetch']['url']}:{input['fetch']['size']}"


@chain.step(depends_on=[convert])
def publish(input: dict[str, Any]) -> dict[str, Any]:
    return {"published": input["convert"]}


diamond = Flow("w_diamond")
diamond.step(slug="start")(lambda i, c: i["n"])
diamond.step(slug="left", depends_on=["start"])(lambda i, c: i["start"] + 1)
diamond.step(slug="right", depends_on=["start"])(lambda i, c: i["start"] * 10)
diamond.step(slug="join", depends_on=["left", "right"])(lambda i, c: i["left"] + i["right"])


class Item(pydantic.BaseModel):
    n: int


mapping = Flow("w_maps")
map_contexts: list[Context] = []


@mapping.map
async def square(item: Item, ctx: Context) -> int:
    map_contexts.append(ctx)
    return item.n * item.n


@mapping.step(depends_on=[square])
def listing(input: dict[str, Any], ctx: Context) -> list[str]:
    return [f"v{v}" for v in input["square"]]


@mapping.map(depends_on=listing)
def shout(value: str, ctx: Context) -> str:
    return value.upper()


@mapping.step(depends_on=[shout])
def reduce_all(input: dict[str, Any], ctx: Context) -> int:
    return len(input["shout"])


falsy = Flow("w_falsy")
for slug, value in (
    ("zero", 0),
    ("no", False),
    ("empty", ""),
    ("nothing", None),
    ("none_list", []),
):
    falsy.step(slug=slug)(lambda i, c, v=value: v)


async def test_chain_diamond_and_maps(db_url: str, engine: AsyncEngine) -> None:
    deploy(db_url, chain, diamond, mapping, falsy)
    seen_contexts.clear()
    map_contexts.clear()
    async with running_worker([chain, diamond, mapping, falsy], db_url) as worker:
        chain_run, diamond_run, map_run, empty_run, falsy_run = await asyncio.gather(
            run_and_wait(engine, chain, {"url": "u"}),
            run_and_wait(engine, diamond, {"n": 2}),
            run_and_wait(engine, mapping, [{"n": 1}, {"n": 2}, {"n": 3}]),
            run_and_wait(engine, mapping, []),
            run_and_wait(engine, falsy, {}),
        )
    assert chain_run.status is RunStatus.COMPLETED
    assert chain_run.output == {"publish": {"published": "u:3"}}
    assert diamond_run.output == {"join": 23}
    assert map_run.output == {"reduce_all": 3}
    assert [s.output for s in map_run.steps] == [
        [1, 4, 9],
        ["v1", "v4", "v9"],
        ["V1", "V4", "V9"],
        3,
    ]
    assert empty_run.status is RunStatus.COMPLETED
    assert empty_run.output == {"reduce_all": 0}
    assert falsy_run.output == {
        "zero": 0,
        "no": False,
        "empty": "",
        "nothing": None,
        "none_list": [],
    }
    with psycopg.connect(db_url) as conn:
        stored = dict(
            conn.execute(
                "SELECT step_slug, output::text FROM pgflow.step_tasks WHERE run_id = %s",
                [falsy_run.run_id],
            ).fetchall()
        )
    assert stored == {
        "zero": "0",
        "no": "false",
        "empty": '""',
        "nothing": "null",
        "none_list": "[]",
    }

    fetch_ctx, convert_ctx = seen_contexts
    assert fetch_ctx.flow_input == {"url": "u"} and convert_ctx.flow_input == {"url": "u"}
    assert (fetch_ctx.run_id, fetch_ctx.step_slug, fetch_ctx.attempt) == (
        chain_run.run_id,
        "fetch",
        1,
    )
    assert fetch_ctx.worker_id == worker.worker_ids["w_chain"]
    assert sorted(c.task_index for c in map_contexts) == [0, 1, 2]
    assert all(c.flow_input == [{"n": 1}, {"n": 2}, {"n": 3}] for c in map_contexts)


# --- failures -------------------------------------------------------------------------

flaky_calls: collections.Counter[str] = collections.Counter()
flaky = Flow("w_flaky", base_delay=1, max_attempts=3)


@flaky.step
def wobbly(input: Any, ctx: Context) -> str:
    flaky_calls["wobbly"] += 1
    if ctx.attempt == 1:
        raise ConnectionError("upstream hiccup")
    return f"ok on attempt {ctx.attempt}"


doomed = Flow("w_doomed", base_delay=1, max_attempts=2)


@doomed.step
def breaks(input: Any, ctx: Context) -> None:
    raise ValueError(f"bad input {input['x']}")


@doomed.step(depends_on=[breaks])
def after(input: Any, ctx: Context) -> None:
    raise AssertionError("must never run")


bad_output = Flow("w_bad_output", max_attempts=1)
bad_output.step(slug="returns_object")(lambda i, c: object())


async def test_retry_then_success_and_retries_exhausted(db_url: str, engine: AsyncEngine) -> None:
    deploy(db_url, flaky, doomed, bad_output)
    flaky_calls.clear()
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        async with running_worker([flaky, doomed, bad_output], db_url):
            ok, failed, bad = await asyncio.gather(
                run_and_wait(engine, flaky, {}),
                run_and_wait(engine, doomed, {"x": 7}),
                run_and_wait(engine, bad_output, {}),
            )
    finally:
        unsubscribe()
    assert ok.status is RunStatus.COMPLETED
    assert ok.output == {"wobbly": "ok on attempt 2"}
    assert ok.steps[0].attempts == 2 and flaky_calls["wobbly"] == 2

    assert failed.status is RunStatus.FAILED
    assert failed.error == "ValueError: bad input 7"
    breaks_state, after_state = failed.steps
    assert (breaks_state.status, breaks_state.attempts) == (StepStatus.FAILED, 2)
    assert after_state.status is StepStatus.CREATED and after_state.tasks == ()

    assert bad.status is RunStatus.FAILED
    assert bad.error is not None
    assert bad.error.startswith(
        "OutputError: step 'returns_object' returned a value that is not JSON-serialisable"
    )
    names = {e.name for e in seen}
    assert {
        "worker.start",
        "worker.stop",
        "poll",
        "task.start",
        "task.stop",
        "task.exception",
        "run.completed",
        "run.failed",
    } <= names
    exceptions = [e for e in seen if e.name == "task.exception"]
    assert {e.metadata["kind"] for e in exceptions} == {"error", "output"}


slow_async = Flow("w_slow_async", timeout=3, max_attempts=1)
slow_sync = Flow("w_slow_sync", timeout=3, max_attempts=1)


@slow_async.step
async def sleeps_async(input: Any, ctx: Context) -> None:
    await asyncio.sleep(30)


sync_handler_finished = threading.Event()


@slow_sync.step
def sleeps_sync(input: Any, ctx: Context) -> None:
    time.sleep(5)
    sync_handler_finished.set()


async def test_step_timeouts(db_url: str, engine: AsyncEngine) -> None:
    deploy(db_url, slow_async, slow_sync)
    async with running_worker([slow_async, slow_sync], db_url) as worker:
        sync_handler_finished.clear()
        async_run, sync_run = await asyncio.gather(
            run_and_wait(engine, slow_async, {}), run_and_wait(engine, slow_sync, {})
        )
        # failed at the timeout, while the abandoned thread was still sleeping
        assert not sync_handler_finished.is_set()
        abandoned = worker.abandoned_threads
    assert async_run.status is RunStatus.FAILED
    assert async_run.error == "TimeoutError: step 'sleeps_async' did not finish within 3 s"
    assert sync_run.status is RunStatus.FAILED
    assert sync_run.error == "TimeoutError: step 'sleeps_sync' did not finish within 3 s"
    assert abandoned == 1  # the sync handler's thread could not be stopped


steady = Flow("w_steady")
steady.step(slug="s1")(lambda i, c: 1)
steady.step(slug="s2", depends_on=["s1"])(lambda i, c: 2)
steady.map(slug="s3")(lambda i, c: i)


async def test_runs_started_while_the_worker_claims_never_stall(
    db_url: str, engine: AsyncEngine
) -> None:
    """Tasks created by transactions that commit while a claim statement runs are
    still handed to handlers (the claim's snapshot must not hide them)."""
    from pgflow_sa import start_flow_async, wait_for_run_async
    from pgflow_sa.worker import WorkerSettings

    from .worker_harness import FAST

    deploy(db_url, steady)
    no_recovery = WorkerSettings(
        **{**FAST.__dict__, "stall_margin": 3600, "recovery_interval": 3600}
    )
    async with running_worker(steady, db_url, settings=no_recovery):
        run_ids = []
        for i in range(150):
            async with engine.begin() as conn:
                run_ids.append((await start_flow_async(conn, steady, [i, i + 1])).run_id)
            await asyncio.sleep(0.002)
        finals = await asyncio.gather(*[wait_for_run_async(engine, r, timeout=30) for r in run_ids])
    assert all(f.status is RunStatus.COMPLETED for f in finals)
    assert finals[5].output == {"s2": 2, "s3": [5, 6]}


async def test_opentelemetry_spans(db_url: str, engine: AsyncEngine) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from pgflow_sa.contrib.opentelemetry import instrument

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    deploy(db_url, chain, bad_output)
    uninstrument = instrument(provider)
    try:
        async with running_worker([chain, bad_output], db_url):
            ok, failed = await asyncio.gather(
                run_and_wait(engine, chain, {"url": "x"}), run_and_wait(engine, bad_output, {})
            )
    finally:
        uninstrument()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {
        "pgflow.task w_chain.fetch",
        "pgflow.task w_chain.convert",
        "pgflow.task w_chain.publish",
        "pgflow.task w_bad_output.returns_object",
    }
    fetch_span = spans["pgflow.task w_chain.fetch"]
    assert fetch_span.attributes["pgflow.run_id"] == str(ok.run_id)
    assert fetch_span.attributes["pgflow.attempt"] == 1
    assert fetch_span.status.status_code is StatusCode.UNSET
    broken = spans["pgflow.task w_bad_output.returns_object"]
    assert broken.status.status_code is StatusCode.ERROR
    assert broken.status.description == failed.error
