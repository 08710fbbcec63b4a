"""A run page's live colours: a stream of server-sent events with the run's status
and its steps' statuses, woken by the waiting machinery's hints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ..client import get_run_async
from ..models import RunStatus
from ..schema import queries as client_queries
from ..waiting import watcher_for

logger = logging.getLogger("pgflow_sa.dashboard")

#: a run page's event stream re-reads the run at least this often (seconds), even
#: when no notification comes (notifications are hints and can be lost)
SAFETY_INTERVAL = 2.0


async def read_state(engine: AsyncEngine, run_id: uuid.UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        run = await get_run_async(conn, run_id, steps=False)
        rows = (await conn.execute(client_queries.step_statuses([run_id]))).all()
    return {
        "run": run.status.value if run else None,
        "steps": {row.step_slug: row.status for row in rows},
    }


async def state_stream(engine: AsyncEngine, run_id: uuid.UUID) -> AsyncIterator[str]:
    """Server-sent events: the run's status and its steps' statuses, whenever they
    change, until the run finishes. The waiting machinery's hints (one LISTEN
    connection per engine, polling when notifications are off) only wake this loop,
    which reads no more than the statuses: on each wake-up, and every
    SAFETY_INTERVAL (then writing a comment when nothing changed)."""
    wake = asyncio.Event()

    async def listen() -> None:
        try:
            async for _ in watcher_for(engine).hints(run_id):
                wake.set()
        except Exception as exc:  # the timed reads carry on
            logger.debug("dashboard: watching run %s stopped: %s", run_id, exc)

    watcher = asyncio.create_task(listen())
    last: dict[str, Any] | None = None
    try:
        while True:
            wake.clear()
            state = await read_state(engine, run_id)
            if state != last:
                yield f"data: {json.dumps(state)}\n\n"
                last = state
            else:
                # a comment: a WSGI server learns only by writing that the client is
                # gone (a stream left silent would read the run for ever), and
                # proxies with idle timeouts keep the stream open
                yield ": keep-alive\n\n"
            if state["run"] != RunStatus.STARTED.value:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), SAFETY_INTERVAL)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
