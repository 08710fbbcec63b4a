"""The worker: claims pgflow tasks, runs their handlers, settles them.

Its parts, one job each: ``claim`` (the concurrency budget and a poller per flow),
``execute`` (a task from handler to settle), ``settle`` (fenced, retried writes),
``lifecycle`` (start-up, heartbeat, recovery) and ``listener`` (wake-ups). This
module wires them together and runs the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from .. import events
from ..config import to_sqlalchemy_url
from ..dsl import Flow
from ..exceptions import ConfigurationError
from ..registry import FlowRegistry
from .backoff import Backoff
from .claim import Budget, Poller
from .execute import FlowInputs, Sessions, TaskRunner
from .lifecycle import Lifecycle, WorkerStartupError, keep_trying
from .listener import Listener
from .settings import WorkerSettings
from .settle import CompletionBatcher, Settler
from .task import ClaimedTask, TaskKey, TaskState

__all__ = ["Worker", "WorkerStartupError"]

logger = logging.getLogger("pgflow_sa.worker")

#: seconds a stopping worker gives the writes in hand after the shutdown timeout
SETTLE_GRACE = 5.0
APPLICATION_NAME = "pgflow-sa worker"


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
        self.engine = self._protocol_engine(url)
        self._own_engines: list[AsyncEngine | Engine] = [self.engine]
        self._async_sessions_engine = engine if isinstance(engine, AsyncEngine) else self.engine
        self._sync_engine = sync_engine or (engine if isinstance(engine, Engine) else None)
        self.worker_ids = {flow.slug: uuid.uuid4() for flow in self.registry}
        self.settler = Settler(self.engine, self.settings.max_backoff, lambda: self._give_up_at)
        self.lifecycle = Lifecycle(self.engine, self.registry, self.worker_ids, self.settings, name)
        self._give_up_at: float | None = None
        self._tasks: dict[TaskKey, tuple[ClaimedTask, asyncio.Task[None]]] = {}
        self._pollers: dict[str, Poller] = {}
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False  # stop() may come before run() has begun
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: TaskRunner | None = None
        self.budget: Budget | None = None
        self.ready: asyncio.Event | None = None  # set once serving (created by run())

    def _protocol_engine(self, url: str | URL) -> AsyncEngine:
        """The worker's own asyncpg engine: a few connections, with the plan cache mode
        and connection lifetime of the settings."""
        return create_async_engine(
            to_sqlalchemy_url(url, "asyncpg"),
            pool_size=3,
            max_overflow=3 + len(self.registry),
            pool_recycle=self.settings.connection_lifetime or -1,
            connect_args={
                "server_settings": {
                    "plan_cache_mode": self.settings.plan_cache_mode,
                    "application_name": APPLICATION_NAME,
                }
            },
        )

    @property
    def sync_engine(self) -> Engine:
        """The engine behind ``ctx.session`` for sync handlers."""
        if self._sync_engine is None:
            self._sync_engine = create_engine(to_sqlalchemy_url(self.engine.url, "psycopg"))
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
        batcher = CompletionBatcher(self.settler)
        self._runner = TaskRunner(
            self.settler,
            batcher.complete,
            Sessions(
                sync=lambda: Session(self.sync_engine),
                async_=lambda: AsyncSession(self._async_sessions_engine),
            ),
            FlowInputs(self.engine),
        )
        listener = Listener(self.engine, self.worker_ids, self._wake_all, self._wake_flow)
        started_at = time.monotonic()
        reason = "stopped"
        background: list[asyncio.Task[None]] = []
        try:
            await self.lifecycle.start()
            if self.settings.use_notifications:
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
                )
                for flow in self.registry
            }
            background = [
                asyncio.create_task(batcher.run()),
                asyncio.create_task(self._heartbeats(listener)),
            ]
            recovery = asyncio.create_task(self._recovery())
            pollers = [asyncio.create_task(p.run(stopping)) for p in self._pollers.values()]
            self.ready.set()
            await stopping.wait()
            if all(p.deprecated for p in self._pollers.values()):
                reason = "deprecated"
            # pollers are not cancelled: each finishes the claim in hand (launching what
            # it got) and returns
            await asyncio.gather(*pollers, return_exceptions=True)
            recovery.cancel()
            await asyncio.gather(recovery, return_exceptions=True)
            await self._drain()
        finally:
            self._stop_requested = False
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await listener.close()
            if self.ready.is_set():
                try:
                    await asyncio.wait_for(self.lifecycle.retire(), SETTLE_GRACE)
                except Exception as exc:  # the database may be gone: heartbeat age tells
                    logger.warning("could not mark the worker stopped (%s)", exc)
            for engine in self._own_engines:
                if isinstance(engine, AsyncEngine):
                    await engine.dispose()
                else:
                    engine.dispose()
            events.emit(
                "worker.stop",
                {"uptime_s": time.monotonic() - started_at},
                worker_id=str(self._any_worker_id),
                reason=reason,
            )

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

        def done(f: asyncio.Task[None]) -> None:
            entry = self._tasks.get(task.key)
            if entry is not None and entry[0] is task:
                del self._tasks[task.key]
            if not f.cancelled() and f.exception() is not None:
                logger.error("running %s failed", task.describe(), exc_info=f.exception())

        future.add_done_callback(done)

    # --- background loops --------------------------------------------------------

    async def _heartbeats(self, listener: Listener) -> None:
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
            if self.settings.use_notifications:
                await listener.ensure()

        await keep_trying(
            "heartbeat", beat, self.settings.heartbeat_interval, Backoff(self.settings.max_backoff)
        )

    async def _recovery(self) -> None:
        async def recover() -> None:
            await self.lifecycle.recover_abandoned()
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

    async def _drain(self) -> None:
        """Let running tasks finish within the shutdown timeout; hand back the rest;
        give the writes in hand a few more seconds."""
        running = [future for _, future in self._tasks.values()]
        if running:
            logger.info(
                "waiting up to %.0f s for %d task(s) to finish",
                self.settings.shutdown_timeout,
                len(running),
            )
            await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
        self._give_up_at = time.monotonic() + SETTLE_GRACE
        left = [
            (task, future)
            for task, future in self._tasks.values()
            if task.state in (TaskState.CLAIMED, TaskState.RUNNING)
        ]
        for task, future in left:
            task.state = TaskState.HANDED_BACK  # its handler may no longer settle it
            future.cancel()
        if left:
            count = await self.settler.hand_back([task for task, _ in left])
            logger.info("handed back %d unfinished task(s)", count)
            events.emit("tasks.handed_back", {"count": count}, worker_id=str(self._any_worker_id))
        settling = [future for _, future in self._tasks.values() if not future.done()]
        if settling:
            await asyncio.wait(settling, timeout=max(0.0, self._give_up_at - time.monotonic()))
