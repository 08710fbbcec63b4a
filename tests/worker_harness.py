"""Running workers in-process for tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from pgflow_sa import Flow, deploy_flows
from pgflow_sa.worker import Worker, WorkerSettings

FAST = WorkerSettings(
    poll_interval=0.5,
    fallback_poll_interval=0.05,
    heartbeat_interval=0.2,
    recovery_interval=0.2,
    shutdown_timeout=5,
)


def deploy(url: str, *flows: Flow) -> None:
    deploy_flows(url, flows)


@contextlib.asynccontextmanager
async def running_worker(
    flows: Flow | Iterable[Flow],
    url: str | None = None,
    *,
    engine: Any = None,
    settings: WorkerSettings = FAST,
) -> AsyncIterator[Worker]:
    worker = Worker(flows, url, engine=engine, settings=settings)
    task = asyncio.create_task(worker.run())
    for _ in range(500):
        if worker.ready is not None and worker.ready.is_set():
            break
        if task.done():
            await task  # raises the startup error
        await asyncio.sleep(0.01)
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def run_and_wait(
    engine: AsyncEngine, flow: Flow | str, input: Any, timeout: float = 30
) -> Any:
    from pgflow_sa import start_flow_and_wait_async

    return await start_flow_and_wait_async(engine, flow, input, timeout=timeout)
