"""Wait for runs and watch their events, woken by LISTEN/NOTIFY.

One :class:`RunWatcher` per engine (and event loop) holds a single LISTEN
connection and serves every wait and watch on that engine, however many.
Subscriptions are made before the run's state is read (and, in
:func:`start_flow_and_wait_async`, before the run is started), so no event is
missed.

Notifications are hints: anyone who can connect can send one, so a wait returns
and a watch yields an event only once the tables, read with the engine's own
privileges, say so. The LISTEN connection is supervised
(:class:`~pgflow_sa._listen.ListenConnection`): while it is not listening —
connecting, lost, refused, or notifications absent (Supabase's own realtime.send,
``pgflow_sa.notify = 'off'``) — the watcher polls, with one query for all the runs
it waits on, never one per run. When listening it still makes that batched check
every ``safety_interval`` seconds, and once each time listening (re)starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from . import _background as background
from ._backoff import Backoff
from ._db import DB_ERRORS, classify, database_errors, first_line, uncut_connection
from ._listen import Channels, ListenConnection, notifications_enabled
from .client import get_run_async, parse_run_id, start_flow_async
from .config import async_engine_from_url, mask_password
from .dsl import Flow
from .exceptions import (
    DatabaseUnavailableError,
    PgflowSaError,
    RunNotFoundError,
    RunTimeoutError,
)
from .models import Run, RunEvent
from .pooler import listen_url, transaction_pooling
from .schema import queries

logger = logging.getLogger("pgflow_sa.waiting")

DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_SAFETY_INTERVAL = 10.0
#: after a hint the tables did not bear out (forged or stale), a wait or watch reads
#: again no sooner than this: a flood of forged notifications costs a few reads a second
FALSE_HINT_SPACING = 0.1
#: seconds a wait that timed out may spend reading the run's last state
FINAL_READ_GRACE = 3.0
_TOPIC_PREFIX = "pgflow:run:"


def parse_notification(text: str) -> RunEvent | None:
    """A RunEvent from a notification of pgflow-sa's publisher (None if not one)."""
    try:
        message = json.loads(text)
        topic = message["topic"]
        event = message["event"]
    except (ValueError, KeyError, TypeError, RecursionError):  # anyone can NOTIFY anything
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
    #: set by hints that the run may have changed (notifications, batched checks);
    #: however many arrive before the subscriber looks, they cost one read
    hint: asyncio.Event = field(default_factory=asyncio.Event)


class RunWatcher:
    """Serves waits and watches on one async engine from one LISTEN connection.

    Notifications only say where to look: a wait returns, and a watch yields an
    event, after the tables (read with the engine's own privileges) say so."""

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
        self.polls = 0  # batched checks made on a timer (one query each, whatever the run count)
        self.checks = 0  # every batched check, including those made when listening resumes
        self._subs: dict[uuid.UUID, set[_Subscription]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._listener: ListenConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        #: the event loop it was made in (watcher_for keeps one per loop)
        self.loop: Callable[[], asyncio.AbstractEventLoop | None] = (
            weakref.ref(running) if running is not None else lambda: None
        )

    @property
    def mode(self) -> Literal["idle", "notify", "poll"]:
        """idle: nothing waited on; notify: woken by notifications; poll: checking
        every ``poll_interval`` (not listening, or not yet)."""
        if self._task is None:
            return "idle"
        if self._listener is not None and self._listener.state == "listening":
            return "notify"
        return "poll"

    # --- subscriptions ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(
        self, run_id: uuid.UUID, *, steps: bool = False
    ) -> AsyncIterator[_Subscription]:
        """Receive hints about the run while the context is open."""
        sub = _Subscription(run_id, steps)
        async with self._lock:
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

    async def _activate(self) -> None:
        """Start listening and checking, once something has to wait (a run that is
        finished when first read costs no connection to listen on). Never waits
        for the listener and never fails: it connects in the background, and
        checks are made on a timer until it listens."""
        async with self._lock:
            if self._task is not None:
                return
            self._stopping = False
            listen_engine = _listen_engine(self.engine)
            if self.use_notifications and listen_engine is not None:
                self._listener = ListenConnection(
                    listen_engine,
                    self._channels,
                    on_up=self._wake.set,  # catch up on what happened before it listened
                    on_down=self._wake.set,
                    name="run watcher",
                )
                self._listener.start()
            self._task = asyncio.create_task(self._loop(), name="pgflow-sa run watcher")

    async def _stop(self) -> None:
        self._stopping = True  # a cancel that asyncio.wait_for swallows (3.10, 3.11) still ends it
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()

    # --- hints -----------------------------------------------------------------

    async def _channels(self, conn: AsyncConnection) -> Channels:
        return {queries.CHANNEL: self._on_notify} if await notifications_enabled(conn) else {}

    def _on_notify(self, payload: str) -> None:
        event = parse_notification(payload)
        if event is None:
            return
        for sub in self._subs.get(event.run_id, ()):
            if sub.steps or event.is_run_event:
                sub.hint.set()

    async def _loop(self) -> None:
        while not self._stopping:
            interval = self.poll_interval if self.mode == "poll" else self.safety_interval
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                self.polls += 1
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self._check()
            except DB_ERRORS as exc:
                logger.warning("checking run states failed (%s); retrying", first_line(exc))

    async def _check(self) -> None:
        """One query for every run waited on: finished ones wake their waits, and
        watches re-read their run."""
        ids = list(self._subs)
        if not ids:
            return
        self.checks += 1
        async with uncut_connection(self.engine) as conn:
            rows = (await conn.execute(queries.finished_runs(ids))).all()
        finished = {row.run_id for row in rows}
        for run_id in ids:
            for sub in self._subs.get(run_id, ()):
                if sub.steps or run_id in finished:
                    sub.hint.set()

    # --- reading ---------------------------------------------------------------

    async def _read(self, run_id: uuid.UUID, *, steps: bool, deadline: float | None) -> Run:
        """The run as its tables say, retrying transient database errors until
        ``deadline`` (loop time; None: for ever). No attempt outlives the deadline:
        a server that does not answer raises DatabaseUnavailableError then."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(cap=2.0, first=0.1)
        while True:
            try:
                remaining = None if deadline is None else max(deadline - loop.time(), 0.05)
                try:
                    run = await asyncio.wait_for(self._read_once(run_id, steps), remaining)
                except asyncio.TimeoutError:
                    raise DatabaseUnavailableError(
                        f"cannot use the database at {mask_password(self.engine.url)}: "
                        f"no answer within {remaining:.1f} s"
                    ) from None
            except PgflowSaError as exc:
                cause = exc.__cause__
                if cause is None or not classify(cause).transient:
                    raise
                delay = backoff.next_delay()
                if deadline is not None and loop.time() + delay > deadline:
                    raise
                logger.debug("reading run %s failed (%s); retrying", run_id, first_line(exc))
                await asyncio.sleep(delay)
                continue
            if run is None:
                raise RunNotFoundError(f"there is no run {run_id}")
            return run

    async def _read_once(self, run_id: uuid.UUID, steps: bool) -> Run | None:
        with database_errors(self.engine.url, PgflowSaError):
            async with uncut_connection(self.engine) as conn:
                return await get_run_async(conn, run_id, steps=steps)

    async def _hinted(self, sub: _Subscription, deadline: float | None) -> bool:
        """Wait for a hint about the run; False when the deadline passed first."""
        loop = asyncio.get_running_loop()
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            return False
        try:
            await asyncio.wait_for(sub.hint.wait(), remaining)
        except asyncio.TimeoutError:
            return False
        sub.hint.clear()
        return True

    async def _last_state(self, run_id: uuid.UUID) -> Run:
        """The run's state for a wait that timed out (a short grace to read it)."""
        loop = asyncio.get_running_loop()
        return await self._read(run_id, steps=True, deadline=loop.time() + FINAL_READ_GRACE)

    # --- waiting ---------------------------------------------------------------

    async def wait(self, run_id: uuid.UUID | str, *, timeout: float | None = 60) -> Run:
        """The run once it has completed or failed, with its steps."""
        rid = parse_run_id(run_id)
        async with self.subscribe(rid) as sub:
            return await self._wait(sub, timeout)

    async def _wait(self, sub: _Subscription, timeout: float | None) -> Run:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        current = await self._read(sub.run_id, steps=False, deadline=deadline)
        if current.finished:
            return await self._read(sub.run_id, steps=True, deadline=deadline)
        await self._activate()
        while await self._hinted(sub, deadline):
            run = await self._read(sub.run_id, steps=True, deadline=deadline)
            if run.finished:
                return run
            logger.debug("a hint that run %s finished is not what its tables say", sub.run_id)
            await asyncio.sleep(FALSE_HINT_SPACING)
        last = await self._last_state(sub.run_id)
        if last.finished:
            return last
        raise RunTimeoutError(
            f"run {sub.run_id} of flow {last.flow_slug!r} did not finish within "
            f"{timeout} s (status {last.status.value}, "
            f"{last.remaining_steps} step(s) remaining)",
            run=last,
        )

    async def watch(
        self, run_id: uuid.UUID | str, *, timeout: float | None = None
    ) -> AsyncIterator[RunEvent]:
        """Yield the run's step events as its tables show them, ending with its
        run:completed or run:failed event (at once if it has finished already).
        A step seen finished without having been seen started yields both events."""
        rid = parse_run_id(run_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self.subscribe(rid, steps=True) as sub:
            run = await self._read(rid, steps=True, deadline=deadline)
            seen = {s.step_slug: s.status.value for s in run.steps or ()}
            if not run.finished:
                await self._activate()
            while not run.finished:
                if not await self._hinted(sub, deadline):
                    last = await self._last_state(rid)
                    raise RunTimeoutError(
                        f"watching run {rid} timed out after {timeout} s "
                        f"(status {last.status.value})",
                        run=last,
                    )
                run = await self._read(rid, steps=True, deadline=deadline)
                changed = list(_step_events(run, seen))
                for event in changed:
                    yield event
                if not changed and not run.finished:
                    await asyncio.sleep(FALSE_HINT_SPACING)
            yield RunEvent(event=f"run:{run.status.value}", run_id=rid, status=run.status.value)

    async def hints(self, run_id: uuid.UUID | str) -> AsyncIterator[None]:
        """Yield whenever the run may have changed (a notification, or a check that
        found it changed), reading nothing: for callers that read what they need
        themselves (the dashboard's live page reads only statuses). Never ends by
        itself."""
        rid = parse_run_id(run_id)
        async with self.subscribe(rid, steps=True) as sub:
            await self._activate()
            while True:
                await self._hinted(sub, None)
                yield


def _step_events(run: Run, seen: dict[str, str]) -> Iterator[RunEvent]:
    """Events for the steps whose status changed since ``seen`` (updated)."""
    for step in run.steps or ():
        status, before = step.status.value, seen.get(step.step_slug)
        if status == before:
            continue
        seen[step.step_slug] = status
        statuses = [status]
        if status in ("completed", "failed") and before in (None, "created"):
            statuses.insert(0, "started")
        for value in statuses:
            if value != "created":
                yield RunEvent(
                    event=f"step:{step.step_slug}:{value}",
                    run_id=run.run_id,
                    step_slug=step.step_slug,
                    status=value,
                )


#: PGFLOW_SA_LISTEN_URL -> the engine watchers LISTEN through, held weakly: it lives
#: while a watcher's listener holds it (a NullPool engine keeps no connection of its
#: own, so once no watcher listens there is nothing to close)
_DIRECT_ENGINES: weakref.WeakValueDictionary[str, AsyncEngine] = weakref.WeakValueDictionary()


def _listen_engine(engine: AsyncEngine) -> AsyncEngine | None:
    """Where a watcher of ``engine`` LISTENs: the engine itself, or behind a pooler in
    transaction mode the direct PGFLOW_SA_LISTEN_URL (None without one: it polls)."""
    if not transaction_pooling():
        return engine
    direct = listen_url()
    if direct is None:
        return None
    listening = _DIRECT_ENGINES.get(direct)
    if listening is None:
        listening = _DIRECT_ENGINES[direct] = async_engine_from_url(direct, poolclass=NullPool)
    return listening


#: engine -> id of an event loop -> its watcher, both held weakly: a watcher lives
#: while something waits on it (or holds it), and an engine made per call is never
#: kept alive by this table.
_WATCHERS: weakref.WeakKeyDictionary[AsyncEngine, weakref.WeakValueDictionary[int, RunWatcher]] = (
    weakref.WeakKeyDictionary()
)


def watcher_for(engine: AsyncEngine) -> RunWatcher:
    """The shared RunWatcher of an engine in the running event loop."""
    loop = asyncio.get_running_loop()
    per_loop = _WATCHERS.get(engine)
    if per_loop is None:
        per_loop = _WATCHERS[engine] = weakref.WeakValueDictionary()
    watcher = per_loop.get(id(loop))
    if watcher is None or watcher.loop() is not loop:  # (an id a closed loop had)
        watcher = per_loop[id(loop)] = RunWatcher(engine)
    return watcher


async def wait_for_run_async(
    engine: AsyncEngine, run_id: uuid.UUID | str, *, timeout: float | None = 60
) -> Run:
    """Wait until the run completes or fails; returns it with its steps. Raises
    RunTimeoutError (carrying the last known run as ``.run``) after ``timeout`` s."""
    rid = parse_run_id(run_id)
    return await watcher_for(engine).wait(rid, timeout=timeout)


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


def wait_for_run(
    target: Engine | str | URL, run_id: uuid.UUID | str, *, timeout: float | None = 60
) -> Run:
    """Blocking :func:`wait_for_run_async` for sync code (Flask, scripts); takes a sync
    engine or a URL. Every blocking call in the process shares one background event
    loop and one async engine per database (see :mod:`pgflow_sa._background`)."""
    result: Run = background.call(
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
    result: Run = background.call(
        target,
        lambda engine: start_flow_and_wait_async(
            engine, flow, input, run_id=run_id, timeout=timeout
        ),
    )
    return result
