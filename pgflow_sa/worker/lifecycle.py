"""A worker's life around its tasks: the start-up checks and registration, the
heartbeat (which keeps its tasks its own), and recovery of tasks whose worker is
gone, including this worker's own tasks that no handler runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .. import events
from .._backoff import Backoff
from .._db import DB_ERRORS, ErrorKind, classify, first_line, sqlstate
from ..config import mask_password
from ..exceptions import PgflowSaError, deploy_advice
from ..registry import FlowRegistry
from ..schema import worker_queries
from ..schema.shapes import read_flow_shape_async
from ..schema.worker_queries import Fence
from ..shape import diff_shapes
from .settings import WorkerSettings
from .task import TaskKey

logger = logging.getLogger("pgflow_sa.worker")

#: how long a worker keeps retrying an unreachable database while starting
STARTUP_RETRY_SECONDS = 30.0


class WorkerStartupError(PgflowSaError):
    """The worker cannot serve its flows; ``details`` says why, line by line."""

    def __init__(self, message: str, details: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


def _describe_limits(limits: tuple[Any, ...] | None) -> str:
    if limits is None:
        return "none"
    flow, runs, steps = limits
    parts = [f"{flow} task(s) of the flow"] if flow is not None else []
    parts += [f"{runs} run(s) in progress"] if runs is not None else []
    parts += [f"{n} task(s) of step {slug}" for slug, n in sorted((steps or {}).items())]
    return ", ".join(parts) or "none"


class Lifecycle:
    def __init__(
        self,
        engine: AsyncEngine,
        registry: FlowRegistry,
        worker_ids: Mapping[str, uuid.UUID],
        settings: WorkerSettings,
        name: str,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._worker_ids = dict(worker_ids)
        self._settings = settings
        self._name = name
        self.recovered = 0
        self.adopted = 0

    @property
    def _rows(self) -> list[dict[str, Any]]:
        return [
            {"worker_id": wid, "queue_name": slug, "function_name": self._name}
            for slug, wid in self._worker_ids.items()
        ]

    # --- start-up ----------------------------------------------------------------

    async def start(self, stopping: asyncio.Event) -> bool:
        """Check the flows and register; connection problems (including a server that
        is still starting) are retried for up to STARTUP_RETRY_SECONDS. False: a stop
        was asked for meanwhile (one asked for before is honoured after starting)."""
        deadline = time.monotonic() + STARTUP_RETRY_SECONDS
        backoff = Backoff(self._settings.max_backoff)
        stopped_before = stopping.is_set()
        while True:
            attempt = asyncio.ensure_future(self._start_once())
            if not stopped_before:
                stop = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not attempt.done():  # the database may not answer: do not wait
                    attempt.cancel()
                    return False
            try:
                await attempt
                return True
            except DB_ERRORS as exc:
                where = mask_password(self._engine.url)
                if not classify(exc).transient:
                    if sqlstate(exc) in ("42P01", "3F000", "42883"):  # no such table/schema
                        raise WorkerStartupError(
                            f"pgflow is not installed in the database at {where} "
                            f"({first_line(exc)}): run `pgflow-sa install --database-url URL`"
                        ) from exc
                    raise WorkerStartupError(
                        f"the database at {where} refused: {first_line(exc)}"
                    ) from exc
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise WorkerStartupError(
                        f"cannot use the database at {where}: {first_line(exc)}"
                    ) from exc
                logger.warning(
                    "cannot use the database at %s (%s); retrying in %.1f s",
                    where,
                    first_line(exc),
                    delay,
                )
                if not stopped_before:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stopping.wait(), delay)
                        return False
                else:
                    await asyncio.sleep(delay)

    async def _start_once(self) -> None:
        await self._check_flows()
        await self._store_limits()
        await self.register()

    async def _store_limits(self) -> None:
        """Write each served flow's concurrency limits (none: remove them) to
        ``pgflow_sa.flow_limits``, where every worker's claims read them: the limits
        of the worker that started last hold."""
        try:
            async with self._engine.begin() as conn:
                for flow in self._registry:
                    limits = flow.limits()
                    result = await conn.execute(worker_queries.set_flow_limits(flow.slug, limits))
                    before = result.first()
                    was = None if before is None else tuple(before)[:3]
                    now = None
                    if limits is not None:
                        now = (limits.max_concurrency, limits.max_running_runs, limits.step_limits)
                    if was != now:
                        logger.info(
                            "concurrency limits of %s: %s (were %s)",
                            flow.slug,
                            _describe_limits(now),
                            _describe_limits(was),
                        )
        except DB_ERRORS as exc:
            if sqlstate(exc) == "42P01":  # no such table
                raise WorkerStartupError(
                    "pgflow-sa's run-control tables are missing from the database at "
                    f"{mask_password(self._engine.url)} (installed by an older pgflow-sa): "
                    "run `pgflow-sa install` (or generate and apply an Alembic migration)"
                ) from exc
            raise

    async def _check_flows(self) -> None:
        problems: list[str] = []
        missing: list[str] = []
        async with self._engine.connect() as conn:
            for flow in self._registry:
                stored = await read_flow_shape_async(conn, flow.slug)
                if stored is None:
                    missing.append(flow.slug)
                    continue
                diff = diff_shapes(flow.shape(), stored)
                if diff:
                    problems += [f"{flow.slug}: {line}" for line in diff.describe()]
        where = mask_password(self._engine.url)
        if missing:
            names = ", ".join(repr(m) for m in missing)
            # the CLI names its workers pgflow-sa:APP, so its advice can name the APP
            app = self._name.partition("pgflow-sa:")[2] or None
            raise WorkerStartupError(
                f"flow(s) {names} are not in the database at {where}",
                [
                    f"{deploy_advice(missing, app)}, then start the worker again",
                    *(f"missing: {m}" for m in missing),
                ],
            )
        if problems:
            raise WorkerStartupError(
                "the flows in the database differ from the code; refusing to start "
                "(pgflow flows cannot change shape in place: deploy a new flow slug, or "
                "update options with a migration)",
                problems,
            )

    async def register(self) -> None:
        """Insert this worker's rows (idempotent)."""
        async with self._engine.begin() as conn:
            await conn.execute(worker_queries.register_workers(self._rows))

    # --- heartbeat -----------------------------------------------------------------

    async def heartbeat(self) -> set[str]:
        """Touch (or re-create) this worker's rows; the queues whose row is deprecated."""
        async with self._engine.begin() as conn:
            rows = (await conn.execute(worker_queries.heartbeat(self._rows))).all()
        return {row.queue_name for row in rows if row.deprecated}

    async def retire(self) -> None:
        """Mark this worker's rows stopped (``deprecated_at``)."""
        async with self._engine.begin() as conn:
            for wid in self._worker_ids.values():
                await conn.execute(worker_queries.retire_worker(wid))

    # --- recovery ------------------------------------------------------------------

    async def recover_abandoned(self) -> int:
        """Fail (pgflow then retries them, or gives up after max_attempts) the started
        tasks of the served flows whose worker is gone: no heartbeat for
        ``stall_margin`` seconds, or no worker row. Fenced, so of two recovering
        workers one fails a task (the other finds it no longer held)."""
        count = 0
        margin = self._settings.stall_margin
        async with self._engine.begin() as conn:
            rows = (
                await conn.execute(
                    *worker_queries.abandoned_tasks(list(self._worker_ids), margin, 100)
                )
            ).all()
            if rows:
                fences: list[Fence] = [
                    (r.run_id, r.step_slug, r.task_index, r.worker_id, r.started_at) for r in rows
                ]
                message = (
                    f"Stalled: its worker stopped heartbeating for {margin} s "
                    "(killed, or cut off from the database)"
                )
                done = (
                    await conn.execute(*worker_queries.fail_fenced(fences, [message] * len(fences)))
                ).all()
                count = len(done)
        if count:
            self.recovered += count
            logger.warning("recovered %d task(s) of workers that are gone", count)
            events.emit("tasks.recovered", {"count": count}, flow_slugs=list(self._worker_ids))
        return count

    async def find_orphans(
        self,
        known: Callable[[TaskKey], bool],
        claims_in_flight: Callable[[], list[asyncio.Future[None]]],
    ) -> list[Fence]:
        """Tasks the database says this worker holds but no handler of it runs (a
        claim whose answer was lost with its connection). Claims in flight when the
        database was read are waited for first, so a task they are about to launch is
        never taken for an orphan."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(worker_queries.held_tasks(list(self._worker_ids.values())))
            ).all()
        if not rows:
            return []
        pending = claims_in_flight()
        if pending:
            await asyncio.wait(pending, timeout=30)
        return [
            (r.run_id, r.step_slug, r.task_index, r.worker_id, r.started_at)
            for r in rows
            if not known((r.run_id, r.step_slug, r.task_index))
        ]

    async def hand_back_orphans(self, fences: list[Fence]) -> int:
        """Return orphaned tasks to the queue without counting their attempt."""
        if not fences:
            return 0
        async with self._engine.begin() as conn:
            count = len((await conn.execute(*worker_queries.hand_back_fenced(fences))).all())
        if count:
            self.adopted += count
            logger.warning(
                "handed back %d task(s) this worker had claimed but never ran (the "
                "claim's answer was lost with its connection)",
                count,
            )
            events.emit(
                "tasks.handed_back",
                {"count": count},
                worker_id=str(next(iter(self._worker_ids.values()))),
            )
        return count


async def keep_trying(
    what: str,
    action: Callable[[], Awaitable[Any]],
    interval: float,
    backoff: Backoff,
) -> None:
    """Run ``action`` every ``interval`` seconds forever; after a database error, wait
    the backoff delay instead (and log it)."""
    while True:
        try:
            await action()
            backoff.reset()
            await asyncio.sleep(interval)
        except DB_ERRORS as exc:
            kind = classify(exc)
            delay = backoff.next_delay()
            log = logger.warning if kind is not ErrorKind.REFUSED else logger.error
            log("%s failed (%s: %s); again in %.1f s", what, kind.value, first_line(exc), delay)
            await asyncio.sleep(min(delay, interval) if kind.transient else interval)
