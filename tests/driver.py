"""A minimal pgflow task driver for tests that need runs to progress before the
worker exists: read messages, start tasks, complete or fail them."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pgflow_sa.schema import functions as fn
from pgflow_sa.schema import tables
from pgflow_sa.schema.rows import StepTaskRecord

Handler = Callable[[StepTaskRecord], Any]


def echo(task: StepTaskRecord) -> Any:
    return {"step": task.step_slug, "index": task.task_index}


async def drive(
    engine: AsyncEngine,
    flow_slug: str,
    stop: asyncio.Event | threading.Event,
    handler: Handler = echo,
    batch: int = 50,
) -> int:
    """Run tasks of ``flow_slug`` until ``stop`` is set; returns how many completed.
    A handler that raises fails its task with the exception's message."""
    worker_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(tables.workers).values(
                worker_id=worker_id, queue_name=flow_slug, function_name="tests.driver"
            )
        )
    done = 0
    while not stop.is_set():
        async with engine.begin() as conn:
            messages = await fn.pgmq_read(flow_slug, 30, batch).all_async(conn)
            if not messages:
                await asyncio.sleep(0.01)
                continue
            tasks = await fn.start_tasks(
                flow_slug, [m.msg_id for m in messages], worker_id
            ).all_async(conn)
            for task in tasks:
                try:
                    output = handler(task)
                except Exception as exc:
                    await fn.fail_task(
                        task.run_id, task.step_slug, task.task_index, f"{type(exc).__name__}: {exc}"
                    ).all_async(conn)
                else:
                    await fn.complete_task(
                        task.run_id, task.step_slug, task.task_index, output
                    ).all_async(conn)
                    done += 1
    return done
