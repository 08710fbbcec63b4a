"""Drive a run to its end in-process, with the real pgflow SQL and no polling waits."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from ..client import get_run_async, start_flow_async
from ..config import async_engine_from_url, to_sqlalchemy_url
from ..dsl import Flow
from ..exceptions import PgflowSaError
from ..models import Run
from ..pooler import psycopg_connect_args
from ..schema import functions as fn
from ..schema import worker_queries
from ..worker.execute import FlowInputs, Sessions, TaskRunner
from ..worker.settle import Settler
from ..worker.task import ClaimedTask


class InjectedFailure(Exception):
    """Raised in place of a handler by ``fail={...}``; a handler may raise it too."""


class RunStuckError(PgflowSaError):
    """The run can make no progress: no task is ready and it has not finished."""


async def run_flow_async(
    target: AsyncEngine | Engine | str | URL,
    flow: Flow,
    input: Any,
    *,
    fail: Mapping[str, int] | None = None,
    stop_after: str | None = None,
) -> Run:
    """Start a run and process its tasks in-process until it completes or fails.

    Handlers run as a worker would run them (same input shaping, typed inputs,
    JSON outputs, ``ExceptionType: message`` failures). Retry delays and
    ``start_delay`` are skipped: waiting messages are made visible at once.
    ``fail={"step": n}`` makes the first n attempts of each task of that step
    fail (as ``InjectedFailure``) without calling the handler;
    ``stop_after="step"`` returns once that step has completed or failed.
    Handlers get ``ctx.session`` / ``ctx.async_session`` as under a worker: their
    writes commit with the task's completion, or roll back when they raise.
    Returns the run with its steps and tasks.
    """
    engine = _async_engine(target)
    sessions = _Sessions(engine)
    try:
        return await _drive(engine, sessions, flow, input, dict(fail or {}), stop_after)
    finally:
        sessions.dispose()
        if engine is not target:
            await engine.dispose()


def run_flow(
    target: Engine | str | URL,
    flow: Flow,
    input: Any,
    *,
    fail: Mapping[str, int] | None = None,
    stop_after: str | None = None,
) -> Run:
    """Blocking :func:`run_flow_async` (for sync tests)."""
    return asyncio.run(run_flow_async(target, flow, input, fail=fail, stop_after=stop_after))


def _async_engine(target: AsyncEngine | Engine | str | URL) -> AsyncEngine:
    if isinstance(target, AsyncEngine):
        return target
    url = target.url if isinstance(target, Engine) else target
    return async_engine_from_url(url)


class _Sessions:
    """What ``ctx.session`` and ``ctx.async_session`` open: sessions on the run's
    database (a psycopg engine is made on first use of ``ctx.session``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sync: Engine | None = None

    def sync_session(self) -> Session:
        if self._sync is None:
            self._sync = create_engine(
                to_sqlalchemy_url(self.engine.url, "psycopg"),
                connect_args=psycopg_connect_args(),
            )
        return Session(self._sync)

    def async_session(self) -> AsyncSession:
        return AsyncSession(self.engine)

    def dispose(self) -> None:
        if self._sync is not None:
            self._sync.dispose()


async def _drive(
    engine: AsyncEngine,
    sessions: _Sessions,
    flow: Flow,
    input: Any,
    fail: dict[str, int],
    stop_after: str | None,
) -> Run:
    for slug in fail:
        flow.get_step(slug)  # unknown step: KeyError naming the flow's steps
    if stop_after is not None:
        flow.get_step(stop_after)
    worker_id = uuid.uuid4()
    async with engine.begin() as conn:
        run = await start_flow_async(conn, flow, input)
        await conn.execute(
            worker_queries.register_workers(
                [
                    {
                        "worker_id": worker_id,
                        "queue_name": flow.slug,
                        "function_name": "pgflow-sa:testing",
                    }
                ]
            )
        )
    try:
        return await _work(engine, sessions, flow, run, worker_id, fail, stop_after)
    finally:  # the run's in-process "worker" is done: it no longer counts as live
        async with engine.begin() as conn:
            await conn.execute(worker_queries.retire_worker(worker_id))


async def _work(
    engine: AsyncEngine,
    sessions: _Sessions,
    flow: Flow,
    run: Run,
    worker_id: uuid.UUID,
    fail: dict[str, int],
    stop_after: str | None,
) -> Run:
    settler = Settler(engine, max_backoff=1.0)

    async def complete(task: ClaimedTask, output: Any) -> None:
        await settler.complete([(task, output)])

    runner = TaskRunner(
        settler,
        complete,
        Sessions(sync=sessions.sync_session, async_=sessions.async_session),
        FlowInputs(engine),
    )
    injected: collections.Counter[tuple[str, int]] = collections.Counter()
    revealed = False
    while True:
        async with engine.begin() as conn:
            current = await get_run_async(conn, run.run_id, steps=True)
            assert current is not None
            if current.finished or _stopped(current, stop_after):
                return current
            # not dict(rows): SQLAlchemy 2.0 types a Row as a Sequence (2.1: a tuple)
            timeouts: dict[str, int] = {
                row.step_slug: row.timeout
                for row in await conn.execute(worker_queries.step_timeouts(flow.slug))
            }
            ids = list(
                (
                    await conn.execute(worker_queries.read_run_messages(flow.slug, run.run_id))
                ).scalars()
            )
            tasks = await fn.start_tasks(flow.slug, ids, worker_id).all_async(conn) if ids else []
            started_at = (await conn.execute(select(func.now()))).scalar_one()
        if not tasks:
            if revealed:
                raise RunStuckError(
                    f"run {run.run_id} of flow {flow.slug!r} has no ready task and has not "
                    f"finished (status {current.status.value}, {current.remaining_steps} "
                    "step(s) remaining)"
                )
            async with engine.begin() as conn:  # skip retry delays and start delays
                await conn.execute(worker_queries.reveal_run_messages(flow.slug, run.run_id))
            revealed = True
            continue
        revealed = False
        for record in sorted(tasks, key=lambda t: (t.step_slug, t.task_index)):
            task = ClaimedTask(
                flow=flow,
                step=flow.get_step(record.step_slug),
                record=record,
                worker_id=worker_id,
                started_at=started_at,
                attempt=_attempt(current, record.step_slug, record.task_index),
                timeout=timeouts[record.step_slug],
                flow_input=current.input,
            )
            key = (record.step_slug, record.task_index)
            if injected[key] < fail.get(record.step_slug, 0):
                injected[key] += 1
                await runner.run(task, handler=_injected(injected[key], record.step_slug))
            else:
                await runner.run(task)


def _injected(attempt: int, step_slug: str) -> Any:
    def inject(*_: Any) -> None:
        raise InjectedFailure(f"attempt {attempt} of {step_slug!r}")

    return inject


def _attempt(run: Run, step_slug: str, task_index: int) -> int:
    """The attempt number (``run`` was read before start_tasks counted this attempt)."""
    for step in run.steps or ():
        if step.step_slug == step_slug:
            for task in step.tasks:
                if task.task_index == task_index:
                    return task.attempts_count + 1
    return 1


def _stopped(run: Run, stop_after: str | None) -> bool:
    if stop_after is None or run.steps is None:
        return False
    return any(
        s.step_slug == stop_after and s.status.value in ("completed", "failed") for s in run.steps
    )
