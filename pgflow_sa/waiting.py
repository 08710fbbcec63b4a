"""Wait for runs and watch their events, woken by LISTEN/NOTIFY.

One :class:`RunWatcher` per engine (and event loop) holds a single LISTEN
connection and serves every wait and watch on that engine, however many.
Subscriptions are made before the run's state is read (and, in
:func:`start_flow_and_wait_async`, before the run is started), so no event is
missed. Where notifications are absent — pgflow-sa's publisher not installed
(e.g. Supabase, whose realtime.send goes elsewhere) or turned off with
``pgflow_sa.notify = 'off'`` — the watcher polls instead, with one query for
all the runs it waits on, never one per run. With notifications it still makes
that batched check every ``safety_interval`` seconds, in case one was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ._db import database_errors, first_line
from .client import get_run_async, parse_run_id, start_flow_async
from .config import to_sqlalchemy_url
from .dsl import Flow
from .exceptions import PgflowSaError, RunNotFoundError, RunTimeoutError
from .models import Run, RunEvent
from .schema import queries

logger = logging.getLogger("pgflow_sa.waiting")

DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_SAFETY_INTERVAL = 10.0
_TOPIC_PREFIX = "pgflow:run:"


def parse_notification(text: str) -> RunEvent | None:
    """A RunEvent from a notification of pgflow-sa's publisher (None if not one)."""
    try:
        message = json.loads(text)
        topic = message["topic"]
        event = message["event"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(topic, str) or not topic.startswith(_TOPIC_PREFIX):
        return None
    try:
        run_id = uuid.UUID(topic[len(_TOPIC_PREFIX) :])
    except ValueError:
        return None
    payload = message.get("payload") or {}
    step_slug = None
    status = payload.get("status") if isinstance(payload, dict) else None
    if isinstance(event, str) and event.startswith("step:") and event.count(":") >= 2:
        step_slug, status = event[5 : event.rindex(":")], event.rsplit(":", 1)[1]
    elif isinstance(event, str) and event.startswith("run:"):
        status = event[4:]
    return RunEvent(
        event=str(event),
        run_id=run_id,
        step_slug=step_slug,
        status=status,
        payload=payload if isinstance(payload, dict) else {},
        trimmed=bool(isinstance(payload, dict) and payload.get("trimmed")),
    )


@dataclass(eq=False)
class _Subscription:
    run_id: uuid.UUID
    steps: bool
    queue: asyncio.Queue[RunEvent] = field(default_factory=asyncio.Queue)
    last_steps: dict[str, str] = field(default_factory=dict)


class RunWatcher:
    """Serves waits and watches on one async engine from one LISTEN connection."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        safety_interval: float = DEFAULT_SAFETY_INTERVAL,
        use_notifications: bool = True,
    ) -> None:
        self.engine = engine
        self.poll_interval = poll_interval
        self.safety_interval = safety_interval
        self.use_notifications = use_notifications
        self.mode: Literal["idle", "notify", "poll"] = "idle"
        self.polls = 0  # batched state checks made (one query each, whatever the run count)
        self._subs: dict[uuid.UUID, set[_Subscription]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._listen_conn: AsyncConnection | None = None
        self._raw: Any = None
        self._task: asyncio.Task[None] | None = None

    # --- subscriptions ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self, run_id: uuid.UUID, *, steps: bool = False
    ) -> AsyncIterator[_Subscription]:
        """Receive the run's events while the context is open."""
        sub = _Subscription(run_id, steps)
        async with self._lock:
            if self.mode == "idle":
                await self._start()
            self._subs.setdefault(run_id, set()).add(sub)
        try:
            yield sub
        finally:
            async with self._lock:
                subs = self._subs.get(run_id)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[run_id]
                if not self._subs:
                    await self._stop()

    async def _start(self) -> None:
        self.mode = "poll"
        if self.use_notifications:
            with database_errors(self.engine.url, PgflowSaError):
                conn = await self.engine.connect()
                try:
                    enabled = bool((await conn.execute(queries.notifications_enabled())).scalar())
                    await conn.commit()
                    if enabled:
                        raw = (await conn.get_raw_connection()).driver_connection
                        assert raw is not None
                        await raw.add_listener(queries.CHANNEL, self._on_notify)
                        raw.add_termination_listener(self._on_lost)
                        self._listen_conn, self._raw, self.mode = conn, raw, "notify"
                finally:
                    if self.mode != "notify":
                        await conn.close()
        self._task = asyncio.create_task(self._loop(), name="pgflow-sa run watcher")

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listen_conn is not None:
            raw, self._raw = self._raw, None  # so closing is not taken for a lost connection
            with contextlib.suppress(Exception):
                raw.remove_termination_listener(self._on_lost)
                await raw.remove_listener(queries.CHANNEL, self._on_notify)
            with contextlib.suppress(Exception):
                await self._listen_conn.close()
            self._listen_conn = None
        self.mode = "idle"

    # --- event sources ---------------------------------------------------------

    def _deliver(self, event: RunEvent) -> None:
        for sub in self._subs.get(event.run_id, ()):
            sub.queue.put_nowait(event)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        event = parse_notification(payload)
        if event is not None:
            self._deliver(event)

    def _on_lost(self, conn: Any) -> None:
        if conn is not self._raw:
            return
        logger.warning("the LISTEN connection was lost; polling for run events instead")
        self.mode = "poll"
        self._listen_conn = self._raw = None
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            interval = self.poll_interval if self.mode == "poll" else self.safety_interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self._check()
            except (DBAPIError, OSError) as exc:
                logger.warning("checking run states failed (%s); retrying", first_line(exc))

    async def _check(self) -> None:
        ids = list(self._subs)
        if not ids:
            return
        self.polls += 1
        step_ids = [rid for rid in ids if any(s.steps for s in self._subs.get(rid, ()))]
        async with self.engine.connect() as conn:
            step_rows = (
                (await conn.execute(queries.step_statuses(step_ids))).all()
                if step_ids and self.mode == "poll"
                else []
            )
            finished = (await conn.execute(queries.finished_runs(ids))).all()
        for row in step_rows:
            for sub in self._subs.get(row.run_id, ()):
                if sub.steps and sub.last_steps.get(row.step_slug) != row.status:
                    sub.last_steps[row.step_slug] = row.status
                    if row.status != "created":
                        sub.queue.put_nowait(
                            RunEvent(
                                event=f"step:{row.step_slug}:{row.status}",
                                run_id=row.run_id,
                                step_slug=row.step_slug,
                                status=row.status,
                            )
                        )
        for row in finished:
            self._deliver(RunEvent(event=f"run:{row.status}", run_id=row.run_id, status=row.status))

    # --- waiting ---------------------------------------------------------------

    async def _read(self, run_id: uuid.UUID, steps: bool) -> Run | None:
        async with self.engine.connect() as conn:
            return await get_run_async(conn, run_id, steps=steps)

    async def wait(self, run_id: uuid.UUID | str, *, timeout: float | None = 60) -> Run:
        """The run once it has completed or failed, with its steps."""
        rid = parse_run_id(run_id)
        async with self.subscribe(rid) as sub:
            return await self._wait(sub, timeout)

    async def _wait(self, sub: _Subscription, timeout: float | None) -> Run:
        current = await self._read(sub.run_id, steps=False)
        if current is None:
            raise RunNotFoundError(f"there is no run {sub.run_id}")
        if current.finished:
            return await self._final(sub.run_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            try:
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                event = await asyncio.wait_for(sub.queue.get(), remaining)
            except asyncio.TimeoutError:
                last = await self._final(sub.run_id)
                if last.finished:
                    return last
                raise RunTimeoutError(
                    f"run {sub.run_id} of flow {last.flow_slug!r} did not finish within "
                    f"{timeout} s (status {last.status.value}, "
                    f"{last.remaining_steps} step(s) remaining)",
                    run=last,
                ) from None
            if event.finishes_run:
                return await self._final(sub.run_id)

    async def _final(self, run_id: uuid.UUID) -> Run:
        run = await self._read(run_id, steps=True)
        if run is None:
            raise RunNotFoundError(f"there is no run {run_id}")
        return run

    async def watch(
        self, run_id: uuid.UUID | str, *, timeout: float | None = None
    ) -> AsyncIterator[RunEvent]:
        """Yield the run's events as they happen, ending with its run:completed or
        run:failed event (at once if it has finished already)."""
        rid = parse_run_id(run_id)
        async with self.subscribe(rid, steps=True) as sub:
            current = await self._read(rid, steps=True)
            if current is None:
                raise RunNotFoundError(f"there is no run {rid}")
            sub.last_steps.update({s.step_slug: s.status.value for s in current.steps or ()})
            if current.finished:
                yield RunEvent(
                    event=f"run:{current.status.value}", run_id=rid, status=current.status.value
                )
                return
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                try:
                    event = await asyncio.wait_for(sub.queue.get(), remaining)
                except asyncio.TimeoutError:
                    last = await self._final(rid)
                    raise RunTimeoutError(
                        f"watching run {rid} timed out after {timeout} s "
                        f"(status {last.status.value})",
                        run=last,
                    ) from None
                yield event
                if event.finishes_run:
                    return


_WATCHERS: weakref.WeakKeyDictionary[AsyncEngine, dict[int, RunWatcher]] = (
    weakref.WeakKeyDictionary()
)


def watcher_for(engine: AsyncEngine) -> RunWatcher:
    """The shared RunWatcher of an engine in the running event loop."""
    loop_id = id(asyncio.get_running_loop())
    per_loop = _WATCHERS.setdefault(engine, {})
    watcher = per_loop.get(loop_id)
    if watcher is None:
        watcher = per_loop[loop_id] = RunWatcher(engine)
    return watcher


async def wait_for_run_async(
    engine: AsyncEngine, run_id: uuid.UUID | str, *, timeout: float | None = 60
) -> Run:
    """Wait until the run completes or fails; returns it with its steps. Raises
    RunTimeoutError (carrying the last known run as ``.run``) after ``timeout`` s."""
    return await watcher_for(engine).wait(run_id, timeout=timeout)


async def watch_run(
    engine: AsyncEngine, run_id: uuid.UUID | str, *, timeout: float | None = None
) -> AsyncIterator[RunEvent]:
    """``async for event in watch_run(engine, run_id)``: run and step events as they
    happen, until the run finishes."""
    async for event in watcher_for(engine).watch(run_id, timeout=timeout):
        yield event


async def start_flow_and_wait_async(
    engine: AsyncEngine,
    flow: Flow | str,
    input: Any,
    *,
    run_id: uuid.UUID | str | None = None,
    timeout: float | None = 60,
) -> Run:
    """Start a run in a transaction of its own and wait for it to finish. The
    subscription is made before the run starts, so even an instant run is seen."""
    rid = parse_run_id(run_id) if run_id is not None else uuid.uuid4()
    watcher = watcher_for(engine)
    async with watcher.subscribe(rid) as sub:
        async with engine.begin() as conn:
            await start_flow_async(conn, flow, input, run_id=rid)
        return await watcher._wait(sub, timeout)


def _async_engine(target: Engine | AsyncEngine | str | URL) -> AsyncEngine:
    if isinstance(target, AsyncEngine):
        return target
    url = target.url if isinstance(target, Engine) else target
    return create_async_engine(to_sqlalchemy_url(url, "asyncpg"), poolclass=NullPool)


def _run_sync(target: Engine | AsyncEngine | str | URL, work: Callable[[AsyncEngine], Any]) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "this is the blocking API and an event loop is running here: "
            "use the *_async function instead"
        )

    async def main() -> Any:
        engine = _async_engine(target)
        try:
            return await work(engine)
        finally:
            if engine is not target:
                await engine.dispose()

    return asyncio.run(main())


def wait_for_run(
    target: Engine | str | URL, run_id: uuid.UUID | str, *, timeout: float | None = 60
) -> Run:
    """Blocking :func:`wait_for_run_async` for sync code (Flask, scripts); takes a sync
    engine or a URL and listens on a connection of its own."""
    result: Run = _run_sync(
        target, lambda engine: wait_for_run_async(engine, run_id, timeout=timeout)
    )
    return result


def start_flow_and_wait(
    target: Engine | str | URL,
    flow: Flow | str,
    input: Any,
    *,
    run_id: uuid.UUID | str | None = None,
    timeout: float | None = 60,
) -> Run:
    """Blocking :func:`start_flow_and_wait_async`."""
    result: Run = _run_sync(
        target,
        lambda engine: start_flow_and_wait_async(
            engine, flow, input, run_id=run_id, timeout=timeout
        ),
    )
    return result
