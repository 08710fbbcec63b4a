"""Running one claimed task from its handler to its settle. The worker and the
testing kit's ``run_flow`` both run every task through :class:`TaskRunner`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .. import events
from .._db import caused_by_lost_connection, classify, first_line
from ..context import Context
from ..schema import worker_queries
from .handlers import (
    OutputError,
    SessionSettleError,
    complete_in_async_session,
    complete_in_session,
    error_message,
    flow_input_of,
    handler_input,
    handler_logger,
    json_output,
    storable,
    typed_input,
)
from .settle import Settler
from .task import ClaimedTask, TaskState

logger = logging.getLogger("pgflow_sa.worker")

T = TypeVar("T")

#: seconds before a task handed back after a lost connection is offered again
RECONNECT_DELAY = 1
#: hand-backs after lost connections in a row, per task, before its handler's error
#: counts as a failure (a handler whose query kills its own backend every time)
MAX_RECONNECTS = 3


@dataclass(frozen=True)
class Sessions:
    """What ``ctx.session`` and ``ctx.async_session`` open."""

    sync: Callable[[], Session]
    async_: Callable[[], AsyncSession]


class FlowInputs:
    """Flow inputs of runs, read once per run when a map task's handler needs one
    (map tasks carry only their element), kept for the most recent runs."""

    def __init__(self, engine: Any, size: int = 256) -> None:
        self._engine = engine
        self._size = size
        self._cache: collections.OrderedDict[uuid.UUID, asyncio.Future[Any]] = (
            collections.OrderedDict()
        )

    async def get(self, run_id: uuid.UUID) -> Any:
        future = self._cache.get(run_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._cache[run_id] = future
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
            try:
                async with self._engine.connect() as conn:
                    row = (await conn.execute(worker_queries.run_inputs([run_id]))).first()
            except BaseException as exc:
                # not cached: the next task of the run reads again
                if self._cache.get(run_id) is future:
                    del self._cache[run_id]
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
                    future.exception()  # retrieved here; waiters get it raised
                raise
            future.set_result(None if row is None else row.input)
        else:
            self._cache.move_to_end(run_id)
        return await asyncio.shield(future)


@dataclass
class _Result:
    """How a handler ended."""

    kind: str  # output | committed | lost | error | timeout | cancelled
    output: Any = None
    error: BaseException | None = None


class TaskRunner:
    """Runs a task's handler (async on the loop, sync in a thread of its own) within
    the step timeout, then settles it: completion (batched through ``complete``, or
    in the handler's own session), failure, or hand-back when the handler lost its
    database connection. ``release`` is called once the handler has really ended (a
    timed-out sync handler's thread may outlive its task)."""

    def __init__(
        self,
        settler: Settler,
        complete: Callable[[ClaimedTask, Any], Awaitable[None]],
        sessions: Sessions,
        flow_inputs: FlowInputs,
    ) -> None:
        self.settler = settler
        self._complete = complete
        self._sessions = sessions
        self._flow_inputs = flow_inputs
        #: sync handlers that outran their timeout (a thread cannot be stopped: it
        #: keeps its slot until it ends)
        self.abandoned_threads = 0
        self._reconnects: collections.OrderedDict[tuple[Any, ...], int] = collections.OrderedDict()

    async def run(
        self,
        task: ClaimedTask,
        release: Callable[[], None] = lambda: None,
        handler: Callable[..., Any] | None = None,
    ) -> None:
        """Run ``task`` (with ``handler`` in place of the step's, if given)."""
        task.state = TaskState.RUNNING
        record = task.record
        meta: dict[str, Any] = {
            "flow_slug": task.flow.slug,
            "step_slug": record.step_slug,
            "run_id": str(record.run_id),
            "task_index": record.task_index,
            "attempt": task.attempt,
        }
        if task.reused:
            # a retry reusing outputs: this task completed in the run retried, and its
            # inputs are the same; its output is written again, the handler not run
            release()
            task.state = TaskState.SETTLING
            await self._complete(task, task.reused_output)
            events.emit("task.reused", **meta)
            return
        events.emit("task.start", **meta)
        started = time.monotonic()
        try:
            result = await self._call(task, handler or task.step.handler, release)
        except asyncio.CancelledError:
            if task.state is TaskState.RUNNING:
                task.state = TaskState.HANDED_BACK  # shutdown hands it back
            raise
        if task.state is not TaskState.RUNNING:
            return  # shutdown took it over meanwhile
        task.state = TaskState.SETTLING
        elapsed = {"duration_s": time.monotonic() - started}
        if result.kind == "output":
            await self._complete(task, result.output)
        elif result.kind == "committed":
            task.state = TaskState.SETTLED
            self.settler.completed += 1
        elif result.kind == "lost":
            self.settler.mark_lost(task)
        elif result.kind == "cancelled":
            logger.info("the run of %s ended: its handler was cancelled", task.describe())
            events.emit("task.cancelled", elapsed, **meta)
            # cancel_run has failed the task already (then this writes nothing); a run
            # that another task failed leaves it started: the fenced completion of a
            # task of a failed run ends it, saying which step failed the run and why
            await self._complete(task, None)
            return
        elif result.kind == "timeout":
            message = (
                f"TimeoutError: step {record.step_slug!r} did not finish within {task.timeout} s"
            )
            logger.warning("%s (run %s, task %s)", message, record.run_id, record.task_index)
            events.emit("task.exception", elapsed, error=message, kind="timeout", **meta)
            await self.settler.fail([(task, message)])
            return
        else:
            await self._settle_error(task, result.error, elapsed, meta)
            return
        events.emit("task.stop", elapsed, **meta)

    async def _settle_error(
        self,
        task: ClaimedTask,
        error: BaseException | None,
        elapsed: dict[str, float],
        meta: dict[str, Any],
    ) -> None:
        assert error is not None
        record = task.record
        message: str | None = None
        if isinstance(error, SessionSettleError) and error.__cause__ is not None:
            cause = error.__cause__
            if classify(cause).transient and self._may_reconnect(task):
                # the handler's writes rolled back with the completion: run it again
                logger.warning(
                    "completing %s in the handler's session failed (%s); handing it back",
                    task.describe(),
                    first_line(cause),
                )
                await self.settler.hand_back([task], RECONNECT_DELAY)
                return
            error = cause
            message = storable(f"pgflow refused the output: {first_line(cause)}")
        elif caused_by_lost_connection(error) and self._may_reconnect(task):
            logger.warning(
                "the handler of %s lost its database connection (%s); handing it back",
                task.describe(),
                first_line(error),
            )
            await self.settler.hand_back([task], RECONNECT_DELAY)
            return
        kind = "output" if isinstance(error, OutputError) else "error"
        logger.error(
            "step %s of flow %s failed (run %s, task %s)",
            record.step_slug,
            task.flow.slug,
            record.run_id,
            record.task_index,
            exc_info=error,
        )
        message = message or error_message(error)
        events.emit("task.exception", elapsed, error=message, kind=kind, **meta)
        await self.settler.fail([(task, message)])

    def _may_reconnect(self, task: ClaimedTask) -> bool:
        """Whether a task whose handler lost its connection may be handed back once
        more (at most MAX_RECONNECTS times in a row in this worker)."""
        key = task.key
        count = self._reconnects.pop(key, 0) + 1
        if count > MAX_RECONNECTS:
            return False
        self._reconnects[key] = count
        while len(self._reconnects) > 1000:
            self._reconnects.popitem(last=False)
        return True

    async def _context(self, task: ClaimedTask) -> Context:
        record, step = task.record, task.step
        known, flow_input = flow_input_of(step, record)
        if not known and step.takes_context:
            flow_input = task.flow_input
            if flow_input is None:
                flow_input = await self._flow_inputs.get(record.run_id)
        return Context(
            flow_slug=task.flow.slug,
            step_slug=record.step_slug,
            flow_input=flow_input,
            run_id=record.run_id,
            task_index=record.task_index,
            attempt=task.attempt,
            worker_id=task.worker_id,
            logger=handler_logger(task.flow.slug, record.step_slug),
            session_factory=self._sessions.sync,
            async_session_factory=self._sessions.async_,
            cancel_event=task.cancelled,
        )

    async def _call(
        self, task: ClaimedTask, handler: Callable[..., Any], release: Callable[[], None]
    ) -> _Result:
        try:
            ctx = await self._context(task)
            value = typed_input(task.step, handler_input(task.step, task.record))
        except Exception as exc:
            release()
            return _Result("error", error=exc)
        args = (value, ctx) if task.step.takes_context else (value,)
        loop = asyncio.get_running_loop()
        if inspect.iscoroutinefunction(handler):
            running = asyncio.ensure_future(_run_async(handler, args, ctx, task))
            task.on_cancel = running.cancel
            try:
                if task.cancelled.is_set():
                    running.cancel()
                done, _ = await asyncio.wait({running}, timeout=task.timeout)
                if not done:
                    running.cancel()
                    await asyncio.wait({running})
                    return _Result("timeout")
                return _Result("cancelled") if running.cancelled() else running.result()
            except asyncio.CancelledError:  # the worker stops: the handler with it
                running.cancel()
                raise
            finally:
                task.on_cancel = None
                release()
        ended = _in_thread(lambda: _run_sync(handler, args, ctx, task), release)
        cancelled: asyncio.Future[None] = loop.create_future()
        task.on_cancel = functools.partial(_resolve, cancelled)
        if task.cancelled.is_set():
            _resolve(cancelled)
        racing: list[asyncio.Future[Any]] = [ended, cancelled]
        try:
            done, _ = await asyncio.wait(
                racing, timeout=task.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            task.on_cancel = None
        if ended in done:
            cancelled.cancel()
            result: _Result = ended.result()
            return result
        # a thread cannot be stopped: it keeps its slot until it ends, and what it
        # returns or writes through ctx.session then no longer counts (fenced)
        self.abandoned_threads += 1
        if cancelled in done:
            return _Result("cancelled")
        cancelled.cancel()
        return _Result("timeout")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _run_async(
    handler: Callable[..., Any], args: tuple[Any, ...], ctx: Context, task: ClaimedTask
) -> _Result:
    try:
        output = json_output(task.record.step_slug, await handler(*args))
        session = ctx.used_async_session
        if session is None:
            return _Result("output", output)
        held = await complete_in_async_session(session, task.fence, output)
        return _Result("committed" if held else "lost", output)
    except Exception as exc:
        return _Result("error", error=exc)
    finally:
        if ctx.used_async_session is not None:
            await ctx.used_async_session.close()


def _run_sync(
    handler: Callable[..., Any], args: tuple[Any, ...], ctx: Context, task: ClaimedTask
) -> _Result:
    try:
        output = json_output(task.record.step_slug, handler(*args))
        session = ctx.used_session
        if session is None:
            return _Result("output", output)
        held = complete_in_session(session, task.fence, output)
        return _Result("committed" if held else "lost", output)
    except Exception as exc:
        return _Result("error", error=exc)
    finally:
        if ctx.used_session is not None:
            ctx.used_session.close()


def _in_thread(call: Callable[[], T], ended: Callable[[], None]) -> asyncio.Future[T]:
    """Run ``call`` in a daemon thread of its own (a hung handler cannot keep the
    process from exiting); ``ended`` runs on the loop when the thread ends."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        ended()
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # pragma: no cover - _run_sync catches Exception
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker stopped
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=target, name="pgflow-sa-handler", daemon=True).start()
    return future
