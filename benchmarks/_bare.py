"""The bare protocol loop: pgflow's own SQL driven by asyncpg with no framework, the
baseline every worker figure is a ratio of.

A loop reads a batch of messages and starts their tasks in one statement
(``pgmq.read`` + ``pgflow.start_tasks``), then completes them: one ``complete_task``
per round trip, or all in one statement over unnest. ``loops`` such loops run at
once, each on a connection of its own.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import asyncpg
import psutil

CLAIM = (
    "SELECT * FROM pgflow.start_tasks($1, (SELECT coalesce(array_agg(msg_id), '{}') "
    "FROM pgmq.read($1, 30, $2)), $3)"
)
COMPLETE_ALL = (
    "SELECT count(*) FROM unnest($1::uuid[], $2::text[], $3::int[]) "
    "AS t(run_id, step_slug, task_index), "
    "LATERAL pgflow.complete_task(t.run_id, t.step_slug, t.task_index, '1'::jsonb)"
)
COMPLETE_ONE = "SELECT count(*) FROM pgflow.complete_task($1, $2, $3, '1'::jsonb)"


async def claim(conn: asyncpg.Connection, flow: str, batch: int, worker_id: uuid.UUID) -> list[Any]:
    """Read a batch and start its tasks; none when start_tasks raced a task committed
    while it ran (pgflow stamps started_at with the statement's transaction start,
    which may precede that task's queued_at: a check violation, retried at once)."""
    try:
        return list(await conn.fetch(CLAIM, flow, batch, worker_id))
    except asyncpg.CheckViolationError as exc:
        if exc.constraint_name != "started_at_is_after_queued_at":
            raise
        return []


async def _register(conn: asyncpg.Connection, flow: str) -> uuid.UUID:
    worker_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'bare')",
        worker_id,
        flow,
    )
    return worker_id


async def _complete(conn: asyncpg.Connection, claimed: list[Any], one_statement: bool) -> None:
    if one_statement:
        await conn.fetchval(
            COMPLETE_ALL,
            [r["run_id"] for r in claimed],
            [r["step_slug"] for r in claimed],
            [r["task_index"] for r in claimed],
        )
    else:
        for r in claimed:
            await conn.fetchval(COMPLETE_ONE, r["run_id"], r["step_slug"], r["task_index"])


async def drain(
    url: str, flow: str, tasks: int, *, batch: int, one_statement: bool, loops: int = 2
) -> dict[str, float]:
    """Drain ``tasks`` tasks of ``flow`` (already queued); tasks/s and the CPU this
    process used, as a share of one core."""
    pool = await asyncpg.create_pool(url, min_size=loops, max_size=loops)
    worker_id = await _register(await pool.acquire(), flow)  # released with the pool
    done = 0

    async def loop() -> None:
        nonlocal done
        idle_since = time.monotonic()
        async with pool.acquire() as conn:
            while done < tasks:
                claimed = await claim(conn, flow, batch, worker_id)
                if not claimed:
                    if time.monotonic() - idle_since > 10:
                        raise RuntimeError(f"bare loop idle with {done}/{tasks} done")
                    await asyncio.sleep(0.001)
                    continue
                idle_since = time.monotonic()
                await _complete(conn, claimed, one_statement)
                done += len(claimed)

    cpu_before = sum(psutil.Process().cpu_times()[:2])
    started = time.perf_counter()
    await asyncio.gather(*[loop() for _ in range(loops)])
    elapsed = time.perf_counter() - started
    cpu = sum(psutil.Process().cpu_times()[:2]) - cpu_before
    pool.terminate()
    return {"tasks_per_s": tasks / elapsed, "elapsed_s": elapsed, "cpu_share": cpu / elapsed}


async def chain_latency(
    url: str, flow: str, rate: float, seconds: float, *, poll: float = 0.01, loops: int = 2
) -> dict[str, float]:
    """Runs of ``flow`` started at a steady ``rate`` for ``seconds``, drained by
    ``loops`` loops that read every ``poll`` seconds when idle (batch 10, completions
    in one statement); the runs' latency from the database's timestamps."""
    count = int(rate * seconds)
    pool = await asyncpg.create_pool(url, min_size=loops + 1, max_size=loops + 1)
    async with pool.acquire() as conn:
        worker_id = await _register(conn, flow)
    stop = asyncio.Event()

    async def loop() -> None:
        async with pool.acquire() as conn:
            while not stop.is_set():
                claimed = await claim(conn, flow, 10, worker_id)
                if claimed:
                    await _complete(conn, claimed, True)
                else:
                    await asyncio.sleep(poll)

    loopers = [asyncio.ensure_future(loop()) for _ in range(loops)]
    async with pool.acquire() as conn:
        begin = time.perf_counter()
        for i in range(count):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.execute("SELECT pgflow.start_flow($1, '{}'::jsonb)", flow)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = await conn.fetchval("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
            if left == 0:
                break
            await asyncio.sleep(0.1)
        latencies = await run_latencies(conn)
    stop.set()
    await asyncio.gather(*loopers)
    await pool.close()
    return summarize(latencies, count)


async def run_latencies(conn: asyncpg.Connection) -> list[float]:
    """Milliseconds from start to completion of every completed run."""
    rows = await conn.fetch(
        "SELECT extract(epoch FROM completed_at - started_at) * 1000 AS ms FROM pgflow.runs "
        "WHERE status = 'completed'"
    )
    return [float(r["ms"]) for r in rows]


def summarize(latencies: list[float], count: int) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        raise RuntimeError("no run completed")
    return {
        "runs": count,
        "completed": len(ordered),
        "p50_ms": statistics.median(ordered),
        "p95_ms": ordered[max(0, int(len(ordered) * 0.95) - 1)],
    }
