"""The worker's wake-ups: pgflow's step:*:started events and pgmq's notify-on-insert,
over one supervised LISTEN connection (:class:`~pgflow_sa._listen.ListenConnection`:
connects in the background, reconnects with backoff, closes what it drops).
Notifications are hints; the tables are the truth."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import events
from .._listen import Channels, ListenConnection, notifications_enabled
from ..schema import queries, worker_queries
from ..waiting import parse_notification


class Listener:
    """Wakes the pollers of the flows whose queues or steps have news; :meth:`ensure`
    starts listening (once), :meth:`close` stops."""

    def __init__(
        self,
        engine: AsyncEngine,
        flow_slugs: Iterable[str],
        wake_all: Callable[[], None],
        wake_flow: Callable[[str], None],
        step_started: Callable[[uuid.UUID | None, str | None], None],
        run_failed: Callable[[uuid.UUID], None] = lambda run_id: None,
    ) -> None:
        """``step_started`` takes pgflow's step:started events (run id and step slug,
        None when the event names none)."""
        self._slugs = list(flow_slugs)
        self._run_failed = run_failed
        self._step_started = step_started
        self._wake_all = wake_all
        self._wake_flow = wake_flow
        self._pgflow_events = False
        # a lost connection wakes every poller: they poll until it listens again
        self._conn = ListenConnection(
            engine, self._channels, on_down=wake_all, name="worker listener"
        )

    @property
    def notified(self) -> bool:
        """pgflow's events arrive (so idle queues can be polled rarely)."""
        return self._pgflow_events and self._conn.state == "listening"

    async def ensure(self) -> None:
        self._conn.start()

    async def close(self) -> None:
        await self._conn.stop()

    async def _channels(self, conn: AsyncConnection) -> Channels:
        self._pgflow_events = await notifications_enabled(conn)
        channels: dict[str, Callable[[str], None]] = {
            worker_queries.pgmq_insert_channel(slug): functools.partial(self._wake_flow, slug)
            for slug in self._slugs
        }
        if self._pgflow_events:
            channels[queries.CHANNEL] = self._on_pgflow_event
        return channels

    def _on_pgflow_event(self, payload: str) -> None:
        # Called for every pgflow event in the database: decide on cheap substring
        # checks first (the publisher writes "event" as "step:<slug>:started" etc.).
        if ':started"' in payload and '"step:' in payload:
            self._on_step_started(payload)
            return
        failed = '"run:failed"' in payload
        if not failed and (not events.has_subscribers() or '"run:completed"' not in payload):
            return
        event = parse_notification(payload)
        if event is not None and failed:
            self._run_failed(event.run_id)  # its tasks here are cancelled (once checked)
        if not events.has_subscribers():
            return
        if (
            event is not None
            and event.finishes_run
            and event.payload.get("flow_slug") in self._slugs
        ):
            # telemetry only: a notification is a hint, and anyone may send one
            events.emit(
                f"run.{event.status}",
                flow_slug=event.payload.get("flow_slug"),
                run_id=str(event.run_id),
            )

    def _on_step_started(self, payload: str) -> None:
        event = parse_notification(payload)
        if event is None:
            self._step_started(None, None)
        else:
            self._step_started(event.run_id, event.step_slug)
