"""The worker's LISTEN connection: wake-ups from pgflow's step:*:started events and
pgmq's notify-on-insert. Notifications are hints; the tables are the truth."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import events
from .._db import DB_ERRORS, first_line
from ..schema import queries, worker_queries
from ..waiting import parse_notification

logger = logging.getLogger("pgflow_sa.worker")


class Listener:
    """Holds one connection that LISTENs; :meth:`ensure` (re)opens it, and a lost one
    is closed properly and reopened at the next :meth:`ensure`."""

    def __init__(
        self,
        engine: AsyncEngine,
        flow_slugs: Iterable[str],
        wake_all: Callable[[], None],
        wake_flow: Callable[[str], None],
    ) -> None:
        self._engine = engine
        self._slugs = list(flow_slugs)
        self._wake_all = wake_all
        self._wake_flow = wake_flow
        self._conn: AsyncConnection | None = None
        self._raw: Any = None
        self._closing: set[asyncio.Task[None]] = set()
        #: pgflow's events arrive (so idle queues can be polled rarely)
        self.notified = False

    async def ensure(self) -> None:
        if self._conn is not None:
            return
        try:
            conn = await self._engine.connect()
        except DB_ERRORS as exc:
            logger.warning("cannot listen for notifications (%s); polling", first_line(exc))
            return
        try:
            enabled = bool((await conn.execute(queries.notifications_enabled())).scalar())
            await conn.commit()
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            if enabled:
                await raw.add_listener(queries.CHANNEL, self._on_pgflow_event)
            for slug in self._slugs:
                await raw.add_listener(
                    worker_queries.pgmq_insert_channel(slug), self._on_pgmq_insert
                )
            raw.add_termination_listener(self._on_lost)
        except DB_ERRORS as exc:
            logger.warning("cannot listen for notifications (%s); polling", first_line(exc))
            await _close(conn)
            return
        self._conn, self._raw, self.notified = conn, raw, enabled

    async def close(self) -> None:
        conn, raw = self._conn, self._raw
        self._conn = self._raw = None
        self.notified = False
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.remove_termination_listener(self._on_lost)
        if conn is not None:
            await _close(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_lost(self, raw: Any) -> None:
        if raw is not self._raw or self._conn is None:
            return
        logger.warning("lost the notification connection; polling until it is back")
        conn = self._conn
        self._conn = self._raw = None
        self.notified = False
        closing = asyncio.get_running_loop().create_task(_close(conn))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        self._wake_all()

    def _on_pgflow_event(self, _c: Any, _pid: int, _channel: str, payload: str) -> None:
        # Called for every pgflow event in the database: decide on cheap substring
        # checks first (the publisher writes "event" as "step:<slug>:started" etc.).
        if ':started"' in payload and '"step:' in payload:
            self._wake_all()
            return
        if not events.has_subscribers() or (
            '"run:completed"' not in payload and '"run:failed"' not in payload
        ):
            return
        event = parse_notification(payload)
        if (
            event is not None
            and event.finishes_run
            and event.payload.get("flow_slug") in self._slugs
        ):
            events.emit(
                f"run.{event.status}",
                flow_slug=event.payload.get("flow_slug"),
                run_id=str(event.run_id),
            )

    def _on_pgmq_insert(self, _c: Any, _pid: int, channel: str, _payload: str) -> None:
        self._wake_flow(channel[len("pgmq.q_") : -len(".INSERT")])


async def _close(conn: AsyncConnection) -> None:
    """Close a connection that may be broken: invalidate it so the pool drops it."""
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()
