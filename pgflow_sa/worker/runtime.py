"""The worker: claims pgflow tasks, runs their handlers, completes or fails them.

Protocol (pgflow 0.8.1, two phases): in one transaction ``pgmq.read`` the
queue, ``pgflow.start_tasks`` the messages, and extend their visibility to the
step timeout + 2 s (``pgflow.set_vt_batch``; 0.8.1's start_tasks means to but
does not). Then run each handler and ``pgflow.complete_task`` or
``pgflow.fail_task`` it. A worker never claims more tasks than it has free
slots, and reads again as soon as a slot frees. It wakes on pgflow's
``step:*:started`` notifications (and pgmq's notify-on-insert where enabled)
and otherwise polls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from .. import events
from .._db import first_line
from ..config import mask_password, to_sqlalchemy_url
from ..context import Context
from ..dsl import Flow, StepDefinition
from ..exceptions import ConfigurationError, PgflowSaError
from ..registry import FlowRegistry
from ..schema import functions as fn
from ..schema import queries, worker_queries
from ..schema.rows import StepTaskRecord
from ..schema.shapes import read_flow_shape_async
from ..shape import diff_shapes
from ..waiting import parse_notification
from .handlers import (
    OutputError,
    complete_in_async_session,
    complete_in_session,
    error_message,
    flow_input_of,
    handler_input,
    handler_logger,
    json_output,
    typed_input,
)
from .settings import WorkerSettings

logger = logging.getLogger("pgflow_sa.worker")

TaskKey = tuple[uuid.UUID, str, int]
_DB_ERRORS = (DBAPIError, OSError, ConnectionError)


#: how long a worker keeps retrying an unreachable database while starting
STARTUP_RETRY_SECONDS = 30.0


class _StartupConnectionError(Exception):
    """A connection problem while starting (retried)."""


class WorkerStartupError(PgflowSaError):
    """The worker cannot serve its flows; ``details`` says why, line by line."""

    def __init__(self, message: str, details: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


@dataclass
class _Running:
    """One task being run."""

    flow: Flow
    step: StepDefinition
    task: StepTaskRecord
    future: asyncio.Task[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempt: int = 1
    flow_input: Any = None
    handling: bool = True  # the handler has not returned yet (it holds a slot)
    abandoned: bool = False  # a timed-out or shut-down sync handler may not complete it
    settled: bool = False  # completed or failed in the database

    @property
    def key(self) -> TaskKey:
        return (self.task.run_id, self.task.step_slug, self.task.task_index)


class Worker:
    """Serves one or more flows from this process.

    ``engine`` may be the app's own engine: an AsyncEngine (used for everything;
    async handlers get ``ctx.async_session`` from it) or a sync Engine (sync
    handlers get ``ctx.session`` from it; the worker derives an asyncpg engine
    from its URL for the protocol). Without an engine, ``database_url`` is used.
    """

    def __init__(
        self,
        flows: FlowRegistry | Flow | Iterable[Flow],
        database_url: str | URL | None = None,
        *,
        engine: AsyncEngine | Engine | None = None,
        settings: WorkerSettings | None = None,
        name: str = "pgflow-sa",
    ) -> None:
        self.registry = FlowRegistry.of(flows)
        if not len(self.registry):
            raise ConfigurationError("the worker has no flows to serve")
        self.settings = settings or WorkerSettings.from_env()
        self.name = name
        self._own_engines: list[AsyncEngine | Engine] = []
        self._sync_engine: Engine | None = None
        if isinstance(engine, AsyncEngine):
            self.engine = engine
        elif isinstance(engine, Engine):
            self._sync_engine = engine
            self.engine = self._own(
                create_async_engine(
                    to_sqlalchemy_url(engine.url, "asyncpg"), pool_size=3, max_overflow=3
                )
            )
        elif database_url is not None:
            self.engine = self._own(
                create_async_engine(
                    to_sqlalchemy_url(database_url, "asyncpg"), pool_size=3, max_overflow=3
                )
            )
        else:
            raise ConfigurationError("give the worker an engine or a database_url")
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.worker_ids = {flow.slug: uuid.uuid4() for flow in self.registry}
        self._completions: list[tuple[_Running, Any, asyncio.Future[None]]] = []
        self._flush_wake: asyncio.Event | None = None
        self.abandoned_threads = 0
        self.completed = 0
        self.failed = 0
        self._running: dict[TaskKey, _Running] = {}  # claimed and not yet settled
        self._handling = 0  # handlers running now: what max_concurrency bounds
        self._timeouts: dict[tuple[str, str], int] = {}
        self._visibility: dict[str, int] = {}  # seconds a claimed message stays hidden
        self._map_steps: dict[str, list[str]] = {}
        self._deprecated: set[str] = set()
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False  # stop() may come before run() has begun
        self._slot_freed: asyncio.Event | None = None
        self._wake: dict[str, asyncio.Event] = {}
        self._notified = False
        self._listen_conn: Any = None
        self._raw_listener: Any = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready: asyncio.Event | None = None  # set once serving (created by run())

    def _protocol_engine(self, url: str | URL) -> AsyncEngine:
        """The worker's own asyncpg engine: a few connections, the plan cache mode set."""
        return create_async_engine(
            to_sqlalchemy_url(url, "asyncpg"),
            pool_size=3,
            max_overflow=3,
            pool_recycle=self.settings.connection_lifetime or -1,
            connect_args={"server_settings": {"plan_cache_mode": self.settings.plan_cache_mode}},
        )

    def _own(self, engine: AsyncEngine) -> AsyncEngine:
        self._own_engines.append(engine)
        return engine

    @property
    def sync_engine(self) -> Engine:
        """The engine behind ``ctx.session`` for sync handlers."""
        if self._sync_engine is None:
            self._sync_engine = create_engine(to_sqlalchemy_url(self.engine.url, "psycopg"))
            self._own_engines.append(self._sync_engine)
        return self._sync_engine

    # --- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new tasks, in-flight ones finish within
        ``shutdown_timeout`` and the rest are handed back. Safe from any thread, and
        before :meth:`run` has begun (it then returns right after starting up)."""
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self) -> None:
        """Run until :meth:`stop` (or every flow's worker row is deprecated)."""
        self._loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        self._slot_freed = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._wake = {slug: asyncio.Event() for slug in self.worker_ids}
        self._threads = concurrent.futures.ThreadPoolExecutor(
            self.settings.thread_count, thread_name_prefix="pgflow-sa-handler"
        )
        started_at = time.monotonic()
        reason = "stopped"
        flusher: asyncio.Task[None] | None = None
        try:
            await self._startup()
            flusher = asyncio.create_task(self._supervise(self._flush_loop, "completion"))
            events.emit(
                "worker.start",
                worker_id=str(self._any_worker_id),
                name=self.name,
                flows=list(self.worker_ids),
                settings=self.settings.describe(),
            )
            pollers = [
                asyncio.create_task(
                    self._supervise(functools.partial(self._poll, flow), f"poll {flow.slug}")
                )
                for flow in self.registry
            ]
            background = [
                asyncio.create_task(self._supervise(self._heartbeat_loop, "heartbeat")),
                asyncio.create_task(self._supervise(self._recovery_loop, "recovery")),
            ]
            self.ready.set()
            await self._stopping.wait()
            if self._deprecated >= set(self.worker_ids):
                reason = "deprecated"
            # pollers are never cancelled: a claim cut off after the database started
            # its tasks would leave them to stall recovery; they finish the claim in
            # hand (launching what it got) and return
            self._slot_freed.set()
            for wake in self._wake.values():
                wake.set()
            await asyncio.gather(*pollers, return_exceptions=True)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._drain()
        finally:
            self._stop_requested = False
            if flusher is not None:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
            await self._close_listener()
            self._threads.shutdown(wait=False, cancel_futures=True)
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

    async def _supervise(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        """Keep a background loop alive: an unexpected error is logged and the loop
        restarted, so one bad moment never leaves the worker silently idle."""
        assert self._stopping is not None
        while not self._stopping.is_set():
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the worker's %s loop failed; restarting it", name)
                await asyncio.sleep(1)

    @property
    def _any_worker_id(self) -> uuid.UUID:
        return next(iter(self.worker_ids.values()))

    async def _startup(self) -> None:
        """Check the flows and register; a lost or refused connection is retried with
        backoff for up to STARTUP_RETRY_SECONDS before the worker gives up."""
        deadline = time.monotonic() + STARTUP_RETRY_SECONDS
        backoff = 0.1
        while True:
            try:
                await self._startup_once()
                return
            except _StartupConnectionError as exc:
                if time.monotonic() + backoff > deadline:
                    raise WorkerStartupError(str(exc)) from exc.__cause__
                logger.warning("%s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.max_backoff)

    async def _startup_once(self) -> None:
        problems: list[str] = []
        missing: list[str] = []
        try:
            async with self.engine.connect() as conn:
                for flow in self.registry:
                    stored = await read_flow_shape_async(conn, flow.slug)
                    if stored is None:
                        missing.append(flow.slug)
                        continue
                    diff = diff_shapes(flow.shape(), stored)
                    if diff:
                        problems += [f"{flow.slug}: {line}" for line in diff.describe()]
                    rows = (await conn.execute(worker_queries.step_timeouts(flow.slug))).all()
                    self._timeouts.update({(flow.slug, r.step_slug): r.timeout for r in rows})
                    self._visibility[flow.slug] = (
                        max(r.timeout for r in rows) + self.settings.visibility_timeout
                    )
                    self._map_steps[flow.slug] = [s.slug for s in flow.steps if s.is_map]
        except ProgrammingError as exc:
            raise WorkerStartupError(
                f"pgflow is not installed in the database at {mask_password(self.engine.url)} "
                f"({first_line(exc)}): run `pgflow-sa install --database-url URL`"
            ) from exc
        except _DB_ERRORS as exc:
            if _connection_problem(exc):
                raise _StartupConnectionError(
                    f"cannot use the database at {mask_password(self.engine.url)}: "
                    f"{first_line(exc)}"
                ) from exc
            raise WorkerStartupError(
                f"the database at {mask_password(self.engine.url)} refused: {first_line(exc)}"
            ) from exc
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise WorkerStartupError(
                f"flow(s) {names} are not in the database at {mask_password(self.engine.url)}: "
                "create them with `pgflow-sa flows deploy APP --database-url URL` "
                "(or an Alembic migration), then start the worker again",
                [f"missing: {m}" for m in missing],
            )
        if problems:
            raise WorkerStartupError(
                "the flows in the database differ from the code; refusing to start "
                "(pgflow flows cannot change shape in place: deploy a new flow slug, or "
                "update options with a migration)",
                problems,
            )
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    worker_queries.register_workers(
                        [
                            {"worker_id": wid, "queue_name": slug, "function_name": self.name}
                            for slug, wid in self.worker_ids.items()
                        ]
                    )
                )
        except _DB_ERRORS as exc:
            if _connection_problem(exc):
                raise _StartupConnectionError(
                    f"cannot register the worker: {first_line(exc)}"
                ) from exc
            raise
        if self.settings.use_notifications:
            await self._open_listener()

    # --- notifications -------------------------------------------------------

    async def _open_listener(self) -> None:
        try:
            conn = await self.engine.connect()
        except _DB_ERRORS as exc:
            logger.warning("cannot listen for notifications (%s); polling", first_line(exc))
            return
        try:
            enabled = bool((await conn.execute(queries.notifications_enabled())).scalar())
            await conn.commit()
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            if enabled:
                await raw.add_listener(queries.CHANNEL, self._on_pgflow_event)
            for slug in self.worker_ids:
                await raw.add_listener(
                    worker_queries.pgmq_insert_channel(slug), self._on_pgmq_insert
                )
            raw.add_termination_listener(self._on_listener_lost)
            self._listen_conn, self._raw_listener, self._notified = conn, raw, enabled
        except _DB_ERRORS as exc:
            logger.warning("cannot listen for notifications (%s); polling", first_line(exc))
            with contextlib.suppress(Exception):
                await conn.close()

    async def _close_listener(self) -> None:
        conn, raw = self._listen_conn, self._raw_listener
        self._listen_conn = self._raw_listener = None
        self._notified = False
        if conn is not None:
            with contextlib.suppress(Exception):
                raw.remove_termination_listener(self._on_listener_lost)
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_listener_lost(self, raw: Any) -> None:
        if raw is self._raw_listener:
            logger.warning("lost the notification connection; polling until it is back")
            self._listen_conn = self._raw_listener = None
            self._notified = False

    def _on_pgflow_event(self, _c: Any, _pid: int, _channel: str, payload: str) -> None:
        # Called for every pgflow event in the database: decide on cheap substring
        # checks first (the publisher writes "event" as "step:<slug>:started" etc.).
        if ':started"' in payload and '"step:' in payload:
            for wake in self._wake.values():
                wake.set()
            return
        if not events.has_subscribers() or (
            '"run:completed"' not in payload and '"run:failed"' not in payload
        ):
            return
        event = parse_notification(payload)
        if (
            event is not None
            and event.finishes_run
            and event.payload.get("flow_slug") in self.worker_ids
        ):
            events.emit(
                f"run.{event.status}",
                flow_slug=event.payload.get("flow_slug"),
                run_id=str(event.run_id),
            )

    def _on_pgmq_insert(self, _c: Any, _pid: int, channel: str, _payload: str) -> None:
        slug = channel[len("pgmq.q_") : -len(".INSERT")]
        wake = self._wake.get(slug)
        if wake is not None:
            wake.set()

    # --- polling and claiming ------------------------------------------------------

    def _free_slots(self) -> int:
        return self.settings.max_concurrency - self._handling

    def _release_slot(self, running: _Running) -> None:
        """The handler is done: its slot can take a new task while the completion is
        still being committed (so claiming overlaps completing)."""
        if running.handling:
            running.handling = False
            self._handling -= 1
            assert self._slot_freed is not None
            self._slot_freed.set()
            for wake in self._wake.values():
                wake.set()

    async def _poll(self, flow: Flow) -> None:
        assert self._stopping is not None and self._slot_freed is not None
        wake = self._wake[flow.slug]
        backoff = 0.1
        while not self._stopping.is_set() and flow.slug not in self._deprecated:
            free = self._free_slots()
            if free <= 0:
                self._slot_freed.clear()
                if self._stopping.is_set():
                    break
                await self._slot_freed.wait()
                continue
            qty = min(self.settings.batch_size, free)
            wake.clear()
            started = time.monotonic()
            try:
                claimed, read = await self._claim(flow, qty)
            except _DB_ERRORS as exc:
                logger.warning(
                    "polling %s failed (%s); retrying in %.1f s",
                    flow.slug,
                    first_line(exc),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.max_backoff)
                continue
            backoff = 0.1
            events.emit(
                "poll",
                {"messages": read, "duration_s": time.monotonic() - started},
                flow_slug=flow.slug,
                requested=qty,
            )
            for running in claimed:
                self._launch(running)
            if read >= qty:
                continue  # a full batch: there may be more waiting
            interval = (
                self.settings.poll_interval
                if self._notified
                else self.settings.fallback_poll_interval
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), interval)

    async def _claim(self, flow: Flow, qty: int) -> tuple[list[_Running], int]:
        """One round trip: read, start_tasks and extend visibility (see worker_queries.claim)."""
        statement = worker_queries.claim(
            flow.slug,
            self._visibility[flow.slug],
            qty,
            self.worker_ids[flow.slug],
            self._map_steps[flow.slug],
        )
        async with self._autocommit.connect() as conn:
            rows = (await conn.execute(statement)).all()
            claimed = [
                _Running(
                    flow,
                    flow.get_step(row.step_slug),
                    StepTaskRecord(
                        flow.slug, row.run_id, row.step_slug, row.input, row.msg_id, row.task_index
                    ),
                    attempt=row.attempt,
                    flow_input=row.run_input,
                )
                for row in rows
                if row.run_id is not None
            ]
            unseen = {
                r.task.run_id
                for r, row in zip(claimed, [x for x in rows if x.run_id is not None], strict=True)
                if r.step.is_map and not row.run_visible
            }
            if unseen:
                inputs = dict((await conn.execute(worker_queries.run_inputs(list(unseen)))).all())
                for running in claimed:
                    if running.task.run_id in inputs:
                        running.flow_input = inputs[running.task.run_id]
        return claimed, rows[0].read_count if rows else 0

    def _launch(self, running: _Running) -> None:
        assert self._slot_freed is not None
        self._running[running.key] = running
        self._handling += 1
        running.future = asyncio.create_task(self._execute(running))

        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(running.key, None)
            self._release_slot(running)

        running.future.add_done_callback(done)

    # --- running a task --------------------------------------------------------------

    def _context(self, running: _Running) -> Context:
        task = running.task
        known, flow_input = flow_input_of(running.step, task)
        return Context(
            flow_slug=running.flow.slug,
            step_slug=task.step_slug,
            flow_input=flow_input if known else running.flow_input,
            run_id=task.run_id,
            task_index=task.task_index,
            attempt=running.attempt,
            worker_id=self.worker_ids[running.flow.slug],
            logger=handler_logger(running.flow.slug, task.step_slug),
            session_factory=lambda: Session(self.sync_engine),
            async_session_factory=lambda: AsyncSession(self.engine),
        )

    async def _execute(self, running: _Running) -> None:
        task, step = running.task, running.step
        timeout = self._timeouts.get((running.flow.slug, task.step_slug), 60)
        meta: dict[str, Any] = {
            "flow_slug": running.flow.slug,
            "step_slug": task.step_slug,
            "run_id": str(task.run_id),
            "task_index": task.task_index,
        }
        ctx = self._context(running)
        meta["attempt"] = ctx.attempt
        events.emit("task.start", **meta)
        started = time.monotonic()
        try:
            value = typed_input(step, handler_input(step, task))
            args = (value, ctx) if step.takes_context else (value,)
            result: _Output | None
            if inspect.iscoroutinefunction(step.handler):
                result = await _within(self._run_async(running, ctx, args), timeout)
            else:
                pending = cast(
                    "asyncio.Future[_Output | None]",
                    asyncio.wrap_future(self._submit_sync(running, ctx, args)),
                )
                result = await _within(pending, timeout)
            self._release_slot(running)
            if result is not None and not running.settled:
                await self._complete(running, result.value)
        except asyncio.CancelledError:
            running.abandoned = True
            raise
        except asyncio.TimeoutError:
            with running.lock:
                running.abandoned = True
            self._release_slot(running)
            if not inspect.iscoroutinefunction(step.handler):
                self.abandoned_threads += 1
            message = f"TimeoutError: step {task.step_slug!r} did not finish within {timeout} s"
            logger.warning("%s (run %s, task %s)", message, task.run_id, task.task_index)
            events.emit(
                "task.exception",
                {"duration_s": time.monotonic() - started},
                error=message,
                kind="timeout",
                **meta,
            )
            await self._settle(running, error=message)
            return
        except Exception as exc:
            self._release_slot(running)
            kind = "output" if isinstance(exc, OutputError) else "error"
            logger.error(
                "step %s of flow %s failed (run %s, task %s)",
                task.step_slug,
                running.flow.slug,
                task.run_id,
                task.task_index,
                exc_info=exc,
            )
            events.emit(
                "task.exception",
                {"duration_s": time.monotonic() - started},
                error=error_message(exc),
                kind=kind,
                **meta,
            )
            await self._settle(running, error=error_message(exc))
            return
        events.emit("task.stop", {"duration_s": time.monotonic() - started}, **meta)

    async def _run_async(self, running: _Running, ctx: Context, args: tuple[Any, ...]) -> _Output:
        """Run an async handler; when it used ``ctx.async_session``, complete the task in
        that session's transaction too."""
        try:
            output = json_output(running.task.step_slug, await running.step.handler(*args))
            session = ctx.used_async_session
            if session is None:
                return _Output(output)
            await complete_in_async_session(session, running.task, output)
            running.settled = True
            self.completed += 1
            return _Output(output)
        finally:
            if ctx.used_async_session is not None:
                await ctx.used_async_session.close()

    def _submit_sync(
        self, running: _Running, ctx: Context, args: tuple[Any, ...]
    ) -> concurrent.futures.Future[_Output | None]:
        """Run a sync handler in the thread pool (completing in ``ctx.session`` when it
        used it). None: the task was abandoned meanwhile and must not be settled."""
        assert self._threads is not None

        def call() -> _Output | None:
            try:
                output = json_output(running.task.step_slug, running.step.handler(*args))
                session = ctx.used_session
                if session is None:
                    return _Output(output)
                with running.lock:
                    if running.abandoned:
                        session.rollback()
                        return None
                    complete_in_session(session, running.task, output)
                    running.settled = True
                    self.completed += 1
                return _Output(output)
            finally:
                if ctx.used_session is not None:
                    ctx.used_session.close()

        return self._threads.submit(call)

    async def _complete(self, running: _Running, output: Any) -> None:
        """Queue a completion; returns once it is committed. Completions that arrive
        together are committed in one statement (group commit)."""
        assert self._loop is not None and self._flush_wake is not None
        done: asyncio.Future[None] = self._loop.create_future()
        self._completions.append((running, output, done))
        self._flush_wake.set()
        await done

    async def _flush_loop(self) -> None:
        assert self._flush_wake is not None
        backoff = 0.1
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            batch, self._completions = self._completions, []
            if not batch:
                continue
            try:
                async with self._autocommit.connect() as conn:
                    await conn.execute(
                        worker_queries.complete_many(
                            [r.key for r, _, _ in batch], [output for _, output, _ in batch]
                        )
                    )
            except _DB_ERRORS as exc:
                if _connection_problem(exc):
                    logger.warning(
                        "completing %d task(s) failed (%s); retrying in %.1f s",
                        len(batch),
                        first_line(exc),
                        backoff,
                    )
                    self._completions[:0] = batch
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.settings.max_backoff)
                    self._flush_wake.set()
                    continue
                # one of them was refused: settle them one by one to isolate it
                for running, output, done in batch:
                    await self._settle(running, output=output)
                    if not done.done():
                        done.set_result(None)
                continue
            backoff = 0.1
            for running, _, done in batch:
                running.settled = True
                self.completed += 1
                if not done.done():
                    done.set_result(None)

    async def _settle(
        self, running: _Running, *, output: Any = None, error: str | None = None
    ) -> None:
        """complete_task or fail_task, retrying while the database is unreachable."""
        if running.settled:
            return
        task = running.task
        backoff = 0.1
        while True:
            try:
                async with self._autocommit.connect() as conn:
                    if error is None:
                        await fn.complete_task(
                            task.run_id, task.step_slug, task.task_index, output
                        ).all_async(conn)
                    else:
                        await fn.fail_task(
                            task.run_id, task.step_slug, task.task_index, error
                        ).all_async(conn)
                running.settled = True
                if error is None:
                    self.completed += 1
                else:
                    self.failed += 1
                return
            except _DB_ERRORS as exc:
                if not _connection_problem(exc):
                    logger.error(
                        "pgflow refused to settle task %s: %s", running.key, first_line(exc)
                    )
                    return
                logger.warning(
                    "settling task %s failed (%s); retrying in %.1f s",
                    running.key,
                    first_line(exc),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.max_backoff)

    # --- shutdown ----------------------------------------------------------------------

    async def _drain(self) -> None:
        pending = [r.future for r in self._running.values() if r.future is not None]
        if pending:
            logger.info(
                "waiting up to %.0f s for %d task(s) to finish",
                self.settings.shutdown_timeout,
                len(pending),
            )
            await asyncio.wait(pending, timeout=self.settings.shutdown_timeout)
        left = [r for r in self._running.values() if not r.settled]
        if not left:
            return
        for running in left:
            with running.lock:
                running.abandoned = True
            if running.future is not None:
                running.future.cancel()
        await asyncio.gather(*[r.future for r in left if r.future], return_exceptions=True)
        await self._hand_back([r for r in left if not r.settled])

    async def _hand_back(self, left: list[_Running]) -> None:
        by_flow: dict[str, list[_Running]] = {}
        for running in left:
            by_flow.setdefault(running.flow.slug, []).append(running)
        count = 0
        try:
            async with self.engine.begin() as conn:
                for slug, items in by_flow.items():
                    ids = list(
                        (
                            await conn.execute(
                                worker_queries.hand_back(
                                    self.worker_ids[slug], [r.key for r in items]
                                )
                            )
                        ).scalars()
                    )
                    if ids:
                        await fn.pgmq_set_vt(slug, ids, 0).all_async(conn)
                    count += len(ids)
        except _DB_ERRORS as exc:
            logger.error(
                "could not hand back %d unfinished task(s) (%s); recovery will "
                "re-queue them after their timeout",
                len(left),
                first_line(exc),
            )
            return
        logger.info("handed back %d unfinished task(s)", count)
        events.emit("tasks.handed_back", {"count": count}, worker_id=str(self._any_worker_id))

    # --- heartbeats and recovery -----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._stopping is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                async with self.engine.begin() as conn:
                    rows = (
                        await conn.execute(worker_queries.heartbeat(list(self.worker_ids.values())))
                    ).all()
            except _DB_ERRORS as exc:
                logger.warning("heartbeat failed (%s)", first_line(exc))
                continue
            for row in rows:
                if row.deprecated and row.queue_name not in self._deprecated:
                    logger.info("worker for %s was deprecated: no new tasks", row.queue_name)
                    self._deprecated.add(row.queue_name)
                    self._wake[row.queue_name].set()
            if self._deprecated >= set(self.worker_ids):
                self._stopping.set()
                return
            if self.settings.use_notifications and self._listen_conn is None:
                await self._open_listener()

    async def recover_stalled(self) -> int:
        """Fail (so pgflow retries them, or gives up after max_attempts) tasks that were
        started longer ago than their timeout + stall_margin: their worker died. Locked
        rows are skipped, so two workers never recover the same task."""
        count = 0
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    worker_queries.stalled_tasks(
                        list(self.worker_ids), self.settings.stall_margin, 100
                    )
                )
            ).all()
            for row in rows:
                await fn.fail_task(
                    row.run_id,
                    row.step_slug,
                    row.task_index,
                    "Stalled: no result within the step timeout plus "
                    f"{self.settings.stall_margin} s; its worker probably died",
                ).all_async(conn)
                count += 1
        if count:
            logger.warning("recovered %d stalled task(s)", count)
            events.emit("tasks.recovered", {"count": count}, flow_slugs=list(self.worker_ids))
        return count

    async def _recovery_loop(self) -> None:
        while True:
            try:
                await self.recover_stalled()
            except _DB_ERRORS as exc:
                logger.warning("recovering stalled tasks failed (%s)", first_line(exc))
            await asyncio.sleep(self.settings.recovery_interval)


@dataclass(frozen=True)
class _Output:
    """A handler's JSON-ready output."""

    value: Any


T = TypeVar("T")


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await`` with a deadline; raises TimeoutError. (asyncio.timeout, on Python 3.11+,
    avoids wait_for's extra task per call.)"""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


def _connection_problem(exc: BaseException) -> bool:
    """A lost or unreachable database (worth retrying), not a refusal by SQL."""
    if isinstance(exc, (OperationalError, InterfaceError, OSError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
