"""What an idle worker does: the connections it holds, and when it reads its queues."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any

import psycopg

from pgflow_sa import Context, Flow, events, start_flow_and_wait_async, start_flows_async
from pgflow_sa.config import async_engine_from_url
from pgflow_sa.worker import WorkerSettings

from .worker_harness import FAST, deploy, running_worker

busy = Flow("conn_busy")


@busy.map
async def item(value: Any, ctx: Context) -> int:
    await asyncio.sleep(0.01)
    return int(value)


@busy.step(depends_on=[item])
async def total(values: Any, ctx: Context) -> int:
    return sum(values["item"])


SETTINGS = dataclasses.replace(FAST, max_concurrency=20)


def _worker_connections(url: str) -> list[int]:
    """Backend pids of the worker's connections."""
    with psycopg.connect(url) as conn:
        return [
            row[0]
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'pgflow-sa worker'"
            )
        ]


async def test_an_idle_worker_holds_at_most_two_connections(db_url: str) -> None:
    """One to listen, one for polls and heartbeats; the ones it opened while busy
    (claims and completions at once) are closed once it has been idle for two
    heartbeats."""
    deploy(db_url, busy)
    async with running_worker(busy, db_url, settings=SETTINGS) as worker:
        engine = async_engine_from_url(db_url)
        try:
            async with engine.begin() as conn:
                await start_flows_async(conn, busy, [list(range(30)) for _ in range(20)])
        finally:
            await engine.dispose()
        deadline = time.monotonic() + 60
        busiest = 0
        while worker.completed < 20 * 31 and time.monotonic() < deadline:
            busiest = max(busiest, len(_worker_connections(db_url)))
            await asyncio.sleep(0.05)
        assert worker.completed == 20 * 31
        assert busiest > 2, "the worker was never busy enough to open spare connections"
        await asyncio.sleep(1)  # two heartbeats without a task, then one closes them
        samples = []
        for _ in range(40):  # 2 s: ten heartbeats
            await asyncio.sleep(0.05)
            samples.append(_worker_connections(db_url))
        # held: seen in most samples. A heartbeat meeting a poll opens another pool
        # connection for a moment, which the next heartbeat closes
        seen = collections.Counter(pid for sample in samples for pid in sample)
        held = [pid for pid, count in seen.items() if count >= 0.75 * len(samples)]
        assert len(held) <= 2, samples


retried = Flow("idle_retried", max_attempts=2, base_delay=1)
attempts: list[float] = []


@retried.step
async def flaky(input: Any, ctx: Context) -> str:
    attempts.append(time.monotonic())
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return "ok"


async def test_a_retry_is_read_when_it_is_due_not_at_the_next_idle_poll(db_url: str) -> None:
    """No notification says when a retry's delay is over: the worker reads its queue
    when the next hidden message becomes visible (here after 1 s), however long its
    idle poll interval (here 60 s)."""
    deploy(db_url, retried)
    attempts.clear()
    settings = WorkerSettings(
        poll_interval=60, heartbeat_interval=0.5, recovery_interval=5, shutdown_timeout=5
    )
    engine = async_engine_from_url(db_url)
    gaps = []
    try:
        async with running_worker(retried, db_url, settings=settings):
            # one run after the other: each claim lane in turn takes the wake-ups
            for _ in range(4):
                attempts.clear()
                run = await start_flow_and_wait_async(engine, retried, {}, timeout=20)
                assert run.output == {"flaky": "ok"}
                assert len(attempts) == 2
                gaps.append(attempts[1] - attempts[0])
    finally:
        await engine.dispose()
    assert all(0.9 < gap < 10 for gap in gaps), gaps


chain = Flow("idle_chain")


@chain.step
async def first(input: Any, ctx: Context) -> int:
    return 1


@chain.step(depends_on=[first])
async def second(input: Any, ctx: Context) -> int:
    return 2


@chain.step(depends_on=[second])
async def third(input: Any, ctx: Context) -> int:
    return 3


beside = Flow("idle_beside")


@beside.step
async def elsewhere(input: Any, ctx: Context) -> int:
    return 0


def _listening(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'pgflow-sa worker' AND query LIKE 'LISTEN %'"
            ).fetchone()[0]  # type: ignore[index]
        )


async def test_each_started_step_costs_one_claim(db_url: str) -> None:
    """A started step wakes the worker once, by pgflow's step:started event: the
    worker's own completion that started it wakes nothing more (a second claim for the
    same task would find nothing), and a flow without such a step is not woken."""
    deploy(db_url, chain, beside)
    settings = WorkerSettings(
        poll_interval=60, heartbeat_interval=0.5, recovery_interval=60, shutdown_timeout=5
    )
    polls: list[events.Event] = []
    unsubscribe = events.subscribe(lambda e: polls.append(e) if e.name == "poll" else None)
    engine = async_engine_from_url(db_url)
    try:
        async with running_worker([chain, beside], db_url, settings=settings):
            deadline = time.monotonic() + 10
            while not _listening(db_url):
                assert time.monotonic() < deadline, "the worker does not listen"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # the claims at start-up are done
            polls.clear()
            for _ in range(5):  # one run after the other: no wake-up meets another
                run = await start_flow_and_wait_async(engine, chain, {}, timeout=20)
                assert run.output == {"third": 3}
    finally:
        unsubscribe()
        await engine.dispose()
    claims = collections.Counter(
        (p.metadata["flow_slug"], p.measurements["messages"] > 0) for p in polls
    )
    assert claims == {("idle_chain", True): 15}, claims


diamond = Flow("idle_diamond")


@diamond.step
async def top(input: Any, ctx: Context) -> list[int]:
    return [1, 2, 3]


@diamond.map(depends_on=top)
async def each(value: int, ctx: Context) -> int:
    return value * 2


@diamond.step(depends_on=[top])
async def side(input: Any, ctx: Context) -> int:
    return 10


@diamond.step(depends_on=[each, side])
async def bottom(input: Any, ctx: Context) -> int:
    return sum(input["each"]) + input["side"]


async def test_steps_started_by_several_or_by_a_map_are_woken_too(db_url: str) -> None:
    """Steps whose start no single completion announces (a map's tasks, a step with two
    dependencies) are woken by their events: with a 60 s idle poll, a lost wake-up
    would stall the run past its timeout."""
    deploy(db_url, diamond)
    settings = WorkerSettings(
        poll_interval=60, heartbeat_interval=0.5, recovery_interval=60, shutdown_timeout=5
    )
    engine = async_engine_from_url(db_url)
    try:
        async with running_worker(diamond, db_url, settings=settings):
            for _ in range(5):
                run = await start_flow_and_wait_async(engine, diamond, {}, timeout=20)
                assert run.output == {"bottom": 22}
    finally:
        await engine.dispose()
