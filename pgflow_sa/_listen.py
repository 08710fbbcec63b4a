"""One supervised LISTEN connection: it connects with backoff, pings while it
listens, reconnects when lost and closes whatever it drops.

Notifications are hints (anyone who can connect may send one): whoever uses this
re-reads the tables before believing anything. ``on_up`` runs each time the
connection starts listening (events may have been missed before it did) and
``on_down`` each time it stops, so the user can poll meanwhile. Used by the run
watcher (waiting) and by the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._aio import first_of
from ._backoff import Backoff
from ._db import first_line
from .schema import queries

logger = logging.getLogger("pgflow_sa.listen")

#: seconds to wait for the connection (asyncpg's own default is 60)
CONNECT_TIMEOUT = 10.0
#: seconds between pings of a listening connection (a silent network loss shows)
PING_INTERVAL = 30.0
RECONNECT_CAP = 5.0

State = Literal["stopped", "connecting", "listening", "disabled"]
Channels = Mapping[str, Callable[[str], None]]


class ListenConnection:
    """LISTENs over a connection of ``engine`` on the channels that ``channels``
    returns for each new connection (name → callback taking the payload; it may
    query the connection to decide). No channels: the connection is closed and the
    state stays ``disabled`` (its user polls)."""

    def __init__(
        self,
        engine: AsyncEngine,
        channels: Callable[[AsyncConnection], Awaitable[Channels]],
        *,
        on_up: Callable[[], None] = lambda: None,
        on_down: Callable[[], None] = lambda: None,
        name: str = "listener",
    ) -> None:
        self._engine = engine
        self._channels = channels
        self._on_up = on_up
        self._on_down = on_down
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.state: State = "stopped"
        self.connects = 0  # successful connections, for tests and telemetry

    def start(self) -> None:
        if self._task is None:
            self.state = "connecting"
            self._task = asyncio.create_task(self._run(), name=f"pgflow-sa {self._name}")

    async def stop(self) -> None:
        # the event ends the loop even where asyncio.wait_for swallows a cancel (3.10, 3.11)
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.state = "stopped"

    async def _run(self) -> None:
        backoff = Backoff(cap=RECONNECT_CAP, first=0.2)
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._listen_once(backoff)
            except Exception as exc:  # a supervisor outlives any error: log, retry
                # the driver's own errors too (asyncpg raises InternalClientError when
                # the server ends the connection during LISTEN)
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("%s: cannot listen (%s); polling meanwhile", self._name, first_line(exc))
            if self.state == "disabled":
                return
            if self.state == "listening":
                failures = 0
                self._on_down()
            self.state = "connecting"
            await backoff.sleep(self._stopping)

    async def _listen_once(self, backoff: Backoff) -> None:
        """Connect and listen until the connection is lost (or found disabled)."""
        conn = await asyncio.wait_for(self._engine.connect(), CONNECT_TIMEOUT)
        raw: Any = None
        lost = asyncio.Event()
        disabled = False

        def on_lost(_raw: Any) -> None:
            lost.set()

        try:
            channels = await self._channels(conn)
            if not channels:
                self.state = "disabled"
                disabled = True
                return
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            raw.add_termination_listener(on_lost)
            for channel, callback in channels.items():
                await raw.add_listener(channel, _adapt(callback))
            self.state = "listening"
            self.connects += 1
            backoff.reset()
            self._on_up()
            while not lost.is_set() and not self._stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(first_of(lost, self._stopping), PING_INTERVAL)
                if not lost.is_set() and not self._stopping.is_set():
                    # on the driver's connection: through SQLAlchemy it would open a
                    # transaction, which holds back vacuum and defers notifications
                    await asyncio.wait_for(raw.execute("SELECT 1"), CONNECT_TIMEOUT)
            if lost.is_set():
                logger.warning("%s: the connection was lost; reconnecting", self._name)
        finally:
            if raw is not None:
                with contextlib.suppress(Exception):
                    raw.remove_termination_listener(on_lost)
            await _discard(conn, raw if not disabled else None)


async def notifications_enabled(conn: AsyncConnection) -> bool:
    """Whether pgflow-sa's publisher sends pgflow's events to this connection's
    database and role (ends the connection's transaction)."""
    enabled = bool((await conn.execute(queries.notifications_enabled())).scalar())
    await conn.commit()
    return enabled


def _adapt(callback: Callable[[str], None]) -> Callable[[Any, int, str, str], None]:
    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            callback(payload)
        except Exception:
            logger.exception("a notification callback failed")

    return on_notify


async def _discard(conn: AsyncConnection, raw: Any) -> None:
    """Close a connection that listened (``raw``: its driver connection, None if it
    never did): it is ended at once — never a goodbye to a server that may not answer
    — and invalidated, so that the pool never hands it out again."""
    if raw is not None:
        with contextlib.suppress(Exception):
            raw.terminate()
        with contextlib.suppress(Exception):
            await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()
