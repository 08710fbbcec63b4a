"""Drive a run to its end in-process, with the real pgflow SQL and no polling waits."""

from __future__ import annotations

import asyncio
import collections
import inspect
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from ..client import get_run_async, start_flow_async
from ..config import to_sqlalchemy_url
from ..context import Context
from ..dsl import Flow
from ..exceptions import PgflowSaError
from ..models import Run
from ..schema import functions as fn
from ..schema import worker_queries
from ..worker.handlers import (
    complete_in_async_session,
    complete_in_session,
    error_message,
    handler_input,
    handler_logger,
    json_output,
    typed_input,
)


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
    return create_async_engine(to_sqlalchemy_url(url, "asyncpg"))


class _Sessions:
    """What ``ctx.session`` and ``ctx.async_session`` open: sessions on the run's
    database (a psycopg engine is made on first use of ``ctx.session``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sync: Engine | None = None

    def sync_session(self) -> Session:
        if self._sync is None:
            self._sync = create_engine(to_sqlalchemy_url(self.engine.url, "psycopg"))
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
    injected: collections.Counter[tuple[str, int]] = collections.Counter()
    revealed = False
    while True:
        async with engine.begin() as conn:
            current = await get_run_async(conn, run.run_id, steps=True)
            assert current is not None
            if current.finished or _stopped(current, stop_after):
                return current
            ids = list(
                (
                    await conn.execute(worker_queries.read_run_messages(flow.slug, run.run_id))
                ).scalars()
            )
            tasks = await fn.start_tasks(flow.slug, ids, worker_id).all_async(conn) if ids else []
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
        for task in sorted(tasks, key=lambda t: (t.step_slug, t.task_index)):
            await _run_task(engine, sessions, flow, task, current, injected, fail)


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


async def _run_task(
    engine: AsyncEngine,
    sessions: _Sessions,
    flow: Flow,
    task: Any,
    run: Run,
    injected: collections.Counter[tuple[str, int]],
    fail: dict[str, int],
) -> None:
    step = flow.get_step(task.step_slug)
    key = (task.step_slug, task.task_index)
    if injected[key] < fail.get(task.step_slug, 0):
        injected[key] += 1
        error = error_message(InjectedFailure(f"attempt {injected[key]} of {task.step_slug!r}"))
        async with engine.begin() as conn:
            await fn.fail_task(task.run_id, task.step_slug, task.task_index, error).all_async(conn)
        return
    ctx = Context(
        flow_slug=flow.slug,
        step_slug=task.step_slug,
        flow_input=run.input,
        run_id=task.run_id,
        task_index=task.task_index,
        attempt=_attempt(run, task.step_slug, task.task_index),
        logger=handler_logger(flow.slug, task.step_slug),
        session_factory=sessions.sync_session,
        async_session_factory=sessions.async_session,
    )
    try:
        try:
            value = typed_input(step, handler_input(step, task))
            args = (value, ctx) if step.takes_context else (value,)
            result = step.handler(*args)
            if inspect.isawaitable(result):
                result = await result
            output = json_output(task.step_slug, result)
            # as under a worker: in the handler's session if it used one
            if ctx.used_async_session is not None:
                await complete_in_async_session(ctx.used_async_session, task, output)
                return
            if ctx.used_session is not None:
                complete_in_session(ctx.used_session, task, output)
                return
        finally:  # closing rolls back whatever was not committed
            if ctx.used_async_session is not None:
                await ctx.used_async_session.close()
            if ctx.used_session is not None:
                ctx.used_session.close()
    except Exception as exc:
        async with engine.begin() as conn:
            await fn.fail_task(
                task.run_id, task.step_slug, task.task_index, error_message(exc)
            ).all_async(conn)
        return
    async with engine.begin() as conn:
        await fn.complete_task(task.run_id, task.step_slug, task.task_index, output).all_async(conn)
