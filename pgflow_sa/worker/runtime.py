"""The worker: claims pgflow tasks, runs their handlers, settles them.

Its parts, one job each: ``claim`` (the concurrency budget and a poller per flow),
``execute`` (a task from handler to settle), ``settle`` (fenced, retried writes),
``lifecycle`` (start-up, heartbeat, recovery) and ``listener`` (wake-ups). This
module wires them together and runs the shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import await_only

from .. import events
from .._backoff import Backoff
from .._db import DB_ERRORS, first_line
from ..config import async_engine_from_url, to_sqlalchemy_url
from ..dsl import Flow
from ..exceptions import ConfigurationError
from ..pooler import listen_url, psycopg_connect_args, transaction_pooling
from ..registry import FlowRegistry
from ..schema import worker_queries
from .claim import Budget, FollowingClaim, Poller
from .execute import FlowInputs, Sessions, TaskRunner
from .lifecycle import Lifecycle, WorkerStartupError, keep_trying
from .listener import Listener
from .scheduler import Scheduler
from .settings import WorkerSettings
from .settle import CompletionBatcher, Settler
from .task import ClaimedTask, TaskKey, TaskState
from .wakeups import Wakeups

__all__ = ["Worker", "WorkerStartupError"]

logger = logging.getLogger("pgflow_sa.worker")

#: seconds a stopping worker gives the writes in hand after the shutdown timeout
SETTLE_GRACE = 3.0
#: seconds it then gives closing its connections
CLOSE_GRACE = 1.0
APPLICATION_NAME = "pgflow-sa worker"
#: seconds to wait for a new connection (asyncpg's default is 60)
CONNECT_TIMEOUT = 10
#: heartbeats without a task after which an idle worker closes its spare connections
IDLE_HEARTBEATS = 2


class Worker:
    """Serves one or more flows from this process.

    The worker talks to pgflow over its own small pool of asyncpg connections, made
    from ``database_url`` or from the URL of ``engine`` (with the ``plan_cache_mode``
    and ``connection_lifetime`` settings applied). Handlers' ``ctx.async_session``
    uses ``engine`` when it is an AsyncEngine, and ``ctx.session`` uses
    ``sync_engine`` (or ``engine`` when it is a sync Engine): the app's own engines,
    with its own connect arguments. Without them, sessions come from the URL.
    """

    def __init__(
        self,
        flows: FlowRegistry | Flow | Iterable[Flow],
        database_url: str | URL | None = None,
        *,
        engine: AsyncEngine | Engine | None = None,
        sync_engine: Engine | None = None,
        settings: WorkerSettings | None = None,
        name: str = "pgflow-sa",
    ) -> None:
        self.registry = FlowRegistry.of(flows)
        if not len(self.registry):
            raise ConfigurationError("the worker has no flows to serve")
        self.settings = settings or WorkerSettings.from_env()
        self.name = name
        if database_url is None and engine is None:
            raise ConfigurationError("give the worker an engine or a database_url")
        url = database_url if database_url is not None else engine.url  # type: ignore[union-attr]
        #: the protocol connections (claims, settles, heartbeats): never shared with
        #: handlers, so handlers holding sessions cannot starve them
        #: behind a pooler in transaction mode: no session settings, LISTEN elsewhere
        self._pooled = transaction_pooling()
        self.engine = self._worker_engine(
            url,
            3,
            3 + len(self.registry),
            {"enable_bitmapscan": "on" if self.settings.enable_bitmapscan else "off"},
        )
        self._own_engines: list[AsyncEngine | Engine] = [self.engine]
        #: where the worker LISTENs (None: it polls)
        self._listen_engine: AsyncEngine | None = self.engine
        if self._pooled:
            direct = listen_url()
            self._listen_engine = None
            if direct is not None:
                self._listen_engine = self._worker_engine(direct, 1, 0)
                self._own_engines.append(self._listen_engine)
        self._async_engine = engine if isinstance(engine, AsyncEngine) else None
        self._sync_engine = sync_engine or (engine if isinstance(engine, Engine) else None)
        self.worker_ids = {flow.slug: uuid.uuid4() for flow in self.registry}
        self.settler = Settler(self.engine, self.settings.max_backoff, lambda: self._give_up_at)
        self.lifecycle = Lifecycle(self.engine, self.registry, self.worker_ids, self.settings, name)
        self._give_up_at: float | None = None
        #: when a task last ran (an idle worker closes its spare connections)
        self._last_busy = time.monotonic()
        self._tasks: dict[TaskKey, tuple[ClaimedTask, asyncio.Task[None]]] = {}
        self._pollers: dict[str, Poller] = {}
        #: checks of runs a notification says ended
        self._checks: set[asyncio.Future[None]] = set()
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False  # stop() may come before run() has begun
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: TaskRunner | None = None
        self._wakeups: Wakeups | None = None
        self.budget: Budget | None = None
        self.ready: asyncio.Event | None = None  # set once serving (created by run())

    def _worker_engine(
        self, url: str | URL, size: int, overflow: int, server: dict[str, str] | None = None
    ) -> AsyncEngine:
        """An asyncpg engine of the worker's own, with the plan cache mode and the
        connection lifetime of the settings (and ``server`` settings). The URL's
        ``application_name`` and ``connect_timeout``, when it has them, win over the
        worker's."""
        settings = {"application_name": APPLICATION_NAME}
        if not self._pooled:  # a pooler would refuse them, or pass them to others
            settings.update(plan_cache_mode=self.settings.plan_cache_mode, **(server or {}))
        engine = async_engine_from_url(
            url,
            pool_size=size,
            max_overflow=overflow,
            pool_recycle=self.settings.connection_lifetime or -1,
            connect_args={"timeout": CONNECT_TIMEOUT, "server_settings": settings},
        )
        if not self._pooled:
            event.listen(engine.sync_engine, "connect", _notice_a_gone_worker)
        return engine

    @property
    def async_engine(self) -> AsyncEngine:
        """The engine behind ``ctx.async_session`` for async handlers: the app's, or a
        pool of the worker's own with a connection per concurrency slot."""
        if self._async_engine is None:
            slots = self.settings.max_concurrency
            self._async_engine = self._worker_engine(self.engine.url, slots, slots)
            self._own_engines.append(self._async_engine)
        return self._async_engine

    @property
    def sync_engine(self) -> Engine:
        """The engine behind ``ctx.session`` for sync handlers."""
        if self._sync_engine is None:
            slots = self.settings.max_concurrency
            self._sync_engine = create_engine(
                to_sqlalchemy_url(self.engine.url, "psycopg"),
                pool_size=slots,
                max_overflow=slots,
                pool_recycle=self.settings.connection_lifetime or -1,
                connect_args={
                    "fallback_application_name": APPLICATION_NAME,
                    **psycopg_connect_args(),
                },
            )
            self._own_engines.append(self._sync_engine)
        return self._sync_engine

    @property
    def completed(self) -> int:
        return self.settler.completed

    @property
    def failed(self) -> int:
        return self.settler.failed

    @property
    def abandoned_threads(self) -> int:
        """Sync handlers that outran their timeout (their threads cannot be stopped)."""
        return self._runner.abandoned_threads if self._runner is not None else 0

    # --- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new tasks, in-flight ones finish within
        ``shutdown_timeout`` and the rest are handed back. Safe from any thread, and
        before :meth:`run` has begun (it then returns right after starting up)."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def recover_stalled(self) -> int:
        """Fail the started tasks of the served flows whose worker is gone (see
        :meth:`Lifecycle.recover_abandoned`); how many."""
        return await self.lifecycle.recover_abandoned()

    async def run(self) -> None:
        """Run until :meth:`stop` (or every flow's worker row is deprecated)."""
        self._loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        self._stopping = stopping = asyncio.Event()
        if self._stop_requested:
            stopping.set()
        self._give_up_at = None
        self.budget = Budget(self.settings.max_concurrency)
        batcher = CompletionBatcher(self.settler, claim_for=self._claim_with)
        self._runner = TaskRunner(
            self.settler,
            batcher.complete,
            Sessions(
                sync=lambda: Session(self.sync_engine),
                async_=lambda: AsyncSession(self.async_engine),
            ),
            FlowInputs(self.engine),
        )
        listener = Listener(
            self._listen_engine or self.engine,
            self.worker_ids,
            self._wake_all,
            self._wake_flow,
            lambda run_id, step_slug: wakeups.step_started(run_id, step_slug),
            self._run_ended_hint,
        )
        self._wakeups = wakeups = Wakeups(
            self.registry,
            self._wake_flow,
            self._wake_all,
            lambda: listener.notified,
            lambda slug: slug in self._pollers and self._pollers[slug].more_waiting,
        )
        started_at = time.monotonic()
        reason = "stopped"
        background: list[asyncio.Task[None]] = []
        try:
            if not await self.lifecycle.start(stopping):
                logger.info("stopped while starting up")
                return
            if self.settings.use_notifications and self._listen_engine is not None:
                await listener.ensure()
            events.emit(
                "worker.start",
                worker_id=str(self._any_worker_id),
                name=self.name,
                flows=list(self.worker_ids),
                settings=self.settings.describe(),
            )
            self._pollers = {
                flow.slug: Poller(
                    flow,
                    self.worker_ids[flow.slug],
                    self.engine,
                    self.settings,
                    self.budget,
                    self._launch,
                    self.lifecycle.register,
                    lambda: listener.notified,
                    batcher.room,
                )
                for flow in self.registry
            }
            background = [
                asyncio.create_task(supervise("completion", batcher.run)),
                asyncio.create_task(supervise("heartbeat", self._heartbeats)),
            ]
            if self.settings.fire_schedules and any(flow.schedules for flow in self.registry):
                # only a worker whose flows declare schedules looks at them (a look a
                # second); the others run no query for them
                scheduler = Scheduler(self.engine, list(self.registry))
                background.append(
                    asyncio.create_task(
                        supervise("schedules", functools.partial(scheduler.run, stopping))
                    )
                )
            recovery = asyncio.create_task(supervise("recovery", self._recovery))
            pollers = [
                asyncio.create_task(supervise(f"poll {slug}", functools.partial(p.run, stopping)))
                for slug, p in self._pollers.items()
            ]
            self.ready.set()
            await stopping.wait()
            self.budget.close()
            self._wake_all()
            if all(p.deprecated for p in self._pollers.values()):
                reason = "deprecated"
            deadline = time.monotonic() + self.settings.shutdown_timeout
            # pollers finish the claim in hand (launching what it got) and return; one
            # stuck in a database that does not answer is cut off at the deadline
            await _wait_or_cancel(pollers, deadline)
            recovery.cancel()
            await _wait_or_cancel([recovery], time.monotonic())
            await self._drain(deadline)
        finally:
            self._stop_requested = False
            await _wait_or_cancel(background, time.monotonic())
            end = (self._give_up_at or time.monotonic()) + CLOSE_GRACE
            await _bounded(self._close(listener), end, "closing the worker's connections")
            events.emit(
                "worker.stop",
                {"uptime_s": time.monotonic() - started_at},
                worker_id=str(self._any_worker_id),
                reason=reason,
            )

    async def _close(self, listener: Listener) -> None:
        await listener.close()
        if self.ready is not None and self.ready.is_set():
            try:
                await self.lifecycle.retire()
            except Exception as exc:  # the database may be gone: heartbeat age tells
                logger.warning("could not mark the worker stopped (%s)", exc)
        for engine in self._own_engines:
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()

    @property
    def _any_worker_id(self) -> uuid.UUID:
        return next(iter(self.worker_ids.values()))

    def _wake_all(self) -> None:
        for poller in self._pollers.values():
            poller.wake.set()

    def _wake_flow(self, slug: str) -> None:
        poller = self._pollers.get(slug)
        if poller is not None:
            poller.wake.set()

    def _claim_with(self, tasks: Sequence[ClaimedTask]) -> FollowingClaim | None:
        """The claim that rides in the statement completing ``tasks``, if any."""
        wakeups = self._wakeups
        slug = wakeups.claim_after(tasks) if wakeups is not None else None
        poller = self._pollers.get(slug) if slug is not None else None
        claim = poller.claim_with_completion() if poller is not None else None
        if claim is not None and wakeups is not None:
            wakeups.claiming(tasks)
        return claim

    def _launch(self, task: ClaimedTask) -> None:
        """Run a claimed task; it holds one slot of the budget (taken by its poller)
        until its handler has really ended."""
        assert self._runner is not None and self.budget is not None
        budget = self.budget
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                budget.give(1)

        future = asyncio.create_task(self._runner.run(task, release))
        self._tasks[task.key] = (task, future)
        self._last_busy = time.monotonic()

        def done(f: asyncio.Task[None]) -> None:
            entry = self._tasks.get(task.key)
            if entry is not None and entry[0] is task:
                del self._tasks[task.key]
            self._last_busy = time.monotonic()
            if not f.cancelled() and f.exception() is not None:
                logger.error("running %s failed", task.describe(), exc_info=f.exception())
            elif task.state is TaskState.SETTLED and self._wakeups is not None:
                # its completion has committed (the steps that depend on it may be queued
                # now) or its failure (a retry may be due sooner than the poller knows)
                self._wakeups.settled(task)

        future.add_done_callback(done)

    # --- background loops --------------------------------------------------------

    async def _heartbeats(self) -> None:
        assert self._stopping is not None
        stopping = self._stopping

        async def beat() -> None:
            deprecated = await self.lifecycle.heartbeat()
            for slug in deprecated:
                poller = self._pollers[slug]
                if not poller.deprecated:
                    logger.info("worker for %s was deprecated: no new tasks", slug)
                    poller.deprecated = True
                    poller.wake.set()
            if self._pollers and all(p.deprecated for p in self._pollers.values()):
                stopping.set()
            await self._cancel_ended_runs()
            await self._close_spare_connections()

        await keep_trying(
            "heartbeat", beat, self.settings.heartbeat_interval, Backoff(self.settings.max_backoff)
        )

    def _run_ended_hint(self, run_id: uuid.UUID) -> None:
        """A notification says a run failed: if this worker runs tasks of it, check
        (a notification is a hint, and anyone may send one) and cancel them."""
        if any(task.record.run_id == run_id for task, _ in self._tasks.values()):
            checking = asyncio.ensure_future(self._cancel_ended_runs([run_id]))
            self._checks.add(checking)
            checking.add_done_callback(self._checks.discard)

    async def _cancel_ended_runs(self, run_ids: list[uuid.UUID] | None = None) -> None:
        """Cancel the handlers of tasks whose run has ended (cancelled with cancel_run,
        or failed by another task): their outcome would not count. Checked at every
        heartbeat while tasks run, and at once when a notification says so."""
        running = [task for task, _ in self._tasks.values() if task.state is TaskState.RUNNING]
        held = {task.record.run_id for task in running}
        ids = [rid for rid in (run_ids if run_ids is not None else held) if rid in held]
        if not ids:
            return
        try:
            async with self.engine.connect() as conn:
                ended = set((await conn.execute(worker_queries.ended_runs(ids))).scalars())
        except DB_ERRORS as exc:
            logger.debug("could not check for ended runs (%s)", exc)
            return
        for task in running:
            if task.record.run_id in ended and task.request_cancel():
                logger.info("run %s ended: cancelling %s", task.record.run_id, task.describe())

    async def _close_spare_connections(self) -> None:
        """An idle worker holds two connections: the listener's, and one in its pool
        for polls and heartbeats. Claims and completions written at once open more
        while it is busy; once no task has run for IDLE_HEARTBEATS heartbeats, those
        idle in the pool are closed: the pool's own dispose, run while holding one
        connection, which it keeps (connections in use, the listener's among them,
        carry on and come back to the same pool)."""
        idle_for = time.monotonic() - self._last_busy
        if self._tasks or idle_for < IDLE_HEARTBEATS * self.settings.heartbeat_interval:
            return
        pool = self.engine.pool  # the worker's own engine: a QueuePool (asyncio adapted)
        if isinstance(pool, QueuePool) and pool.checkedin() > 1:
            logger.debug("idle: closing %d spare connection(s)", pool.checkedin() - 1)
            async with self.engine.connect() as conn:
                await conn.run_sync(lambda sync: sync.engine.pool.dispose())

    async def _recovery(self) -> None:
        async def recover() -> None:
            if await self.lifecycle.recover_abandoned():
                # pgflow retries them after its delay: poll, to learn when that is
                self._wake_all()
            orphans = await self.lifecycle.find_orphans(
                lambda key: key in self._tasks,
                lambda: [f for p in self._pollers.values() for f in p.in_flight],
            )
            await self.lifecycle.hand_back_orphans(orphans)

        await keep_trying(
            "recovering tasks",
            recover,
            self.settings.recovery_interval,
            Backoff(self.settings.max_backoff),
        )

    # --- shutdown ----------------------------------------------------------------------

    async def _drain(self, deadline: float) -> None:
        """Let running tasks finish until ``deadline``; hand back the rest, and any task
        the database says this worker holds that no handler runs; give the writes in
        hand SETTLE_GRACE more seconds."""
        running = [future for _, future in self._tasks.values()]
        if running:
            logger.info(
                "waiting up to %.0f s for %d task(s) to finish",
                max(0.0, deadline - time.monotonic()),
                len(running),
            )
            await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
        self._give_up_at = give_up_at = deadline + SETTLE_GRACE
        left = [
            (task, future)
            for task, future in self._tasks.values()
            if task.state in (TaskState.CLAIMED, TaskState.RUNNING)
        ]
        for task, future in left:
            task.state = TaskState.HANDED_BACK  # its handler may no longer settle it
            future.cancel()

        async def hand_back() -> None:
            count = await self.settler.hand_back([task for task, _ in left])
            orphans = await self.lifecycle.find_orphans(lambda key: key in self._tasks, list)
            count += await self.lifecycle.hand_back_orphans(orphans)
            if count:
                logger.info("handed back %d unfinished task(s)", count)
                events.emit(
                    "tasks.handed_back", {"count": count}, worker_id=str(self._any_worker_id)
                )

        await _bounded(hand_back(), give_up_at, "handing back unfinished tasks")
        settling = [future for _, future in self._tasks.values() if not future.done()]
        if settling:
            await asyncio.wait(settling, timeout=max(0.0, give_up_at - time.monotonic()))


def _notice_a_gone_worker(dbapi_connection: Any, record: Any) -> None:
    """A statement the worker abandoned when it stopped (say, a claim waiting for a
    task row another session holds) would otherwise go on in its server session after
    the worker exited, and start tasks for a worker that is gone: the server checks
    every second that the client is still there, and ends the session when it is not.
    PostgreSQL 14 and newer, on platforms that can tell (Linux among them); elsewhere
    the setting is refused, and the worker goes on without it."""
    driver = dbapi_connection.driver_connection
    try:
        await_only(driver.execute("SET client_connection_check_interval = 1000"))
    except Exception as exc:  # older server, or a platform that cannot tell
        logger.debug("client_connection_check_interval not set (%s)", first_line(exc))


async def supervise(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Keep a background loop alive: an unexpected error is logged and the loop
    restarted, so one bad moment never leaves the worker silently idle."""
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the worker's %s loop failed; restarting it", name)
            await asyncio.sleep(1)


async def _wait_or_cancel(tasks: list[asyncio.Task[None]], deadline: float) -> None:
    """Wait for ``tasks`` until ``deadline``, then cancel those still running (and wait
    a moment for them: one stuck on a database that does not answer may not end)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=0.2)


async def _bounded(work: Awaitable[Any], deadline: float, what: str | None = None) -> None:
    """Await ``work`` until ``deadline`` (at least a moment; the database may not
    answer while the worker stops); then cancel it without waiting. Errors are logged,
    not raised."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({task}, timeout=max(0.2, deadline - time.monotonic()))
    if not task.done():
        task.cancel()
        if what is not None:
            logger.warning("%s did not finish in time; giving up", what)
        return
    exc = task.exception()
    if exc is not None and what is not None:
        logger.warning("%s failed (%s)", what, exc)
