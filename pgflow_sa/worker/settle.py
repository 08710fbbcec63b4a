"""Settling tasks: every completion, failure and hand-back is fenced (it applies only
while the task is still started by this worker at this attempt, checked in the same
statement as the write) and retried through transient database errors, so a result
is never thrown away and never written twice."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .. import events
from .._aio import together
from .._backoff import Backoff
from .._db import DB_ERRORS, ErrorKind, classify, first_line
from ..schema import worker_queries
from .claim import FollowingClaim
from .direct import DirectStatements
from .handlers import storable
from .task import ClaimedTask, TaskKey, TaskState

logger = logging.getLogger("pgflow_sa.worker")

#: seconds before a task whose failure pgflow refused to store is offered again: a
#: refusal of both its error and the short message saying so is a lack of privileges
#: or a constraint, which a retry right away would only meet again
REFUSED_FAIL_DELAY = 60


class _Refused(Exception):
    """The database refused a settling statement (not worth retrying)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(first_line(cause))


class Settler:
    """Writes the outcome of tasks. ``deadline()`` returns a ``time.monotonic()`` after
    which retries stop (set when a shutdown runs out of time), or None."""

    def __init__(
        self,
        engine: AsyncEngine,
        max_backoff: float,
        deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        self._statements = DirectStatements(engine)
        self._max_backoff = max_backoff
        self._deadline = deadline
        self.completed = 0
        self.failed = 0
        self.handed_back = 0
        self.lost = 0

    async def complete(self, items: Sequence[tuple[ClaimedTask, Any]]) -> None:
        """Complete tasks with their outputs in one statement. A refusal (say, an
        output PostgreSQL cannot store) is isolated by completing them one by one;
        the refused task is failed with the reason instead."""
        if not items:
            return
        statement = worker_queries.complete_fenced(
            [t.fence for t, _ in items], [output for _, output in items]
        )
        try:
            done = await self._write(statement, f"completing {len(items)} task(s)")
        except _Refused as refused:
            if len(items) > 1:
                for item in items:
                    await self.complete([item])
                return
            task = items[0][0]
            logger.error("pgflow refused to complete %s: %s", task.describe(), refused)
            await self.fail([(task, f"pgflow refused the output: {refused}")])
            return
        if done is None:
            return
        await self._completed(items, done)

    async def complete_and_claim(
        self, items: Sequence[tuple[ClaimedTask, Any]], claim: FollowingClaim
    ) -> None:
        """:meth:`complete` with ``claim`` in the same statement (all ``items`` of the
        claim's flow). Should that statement fail, the claim is dropped and the
        completions are written by :meth:`complete`, with its retries and isolation
        of refusals (a statement that did commit before its answer was lost settles
        nothing twice: it is fenced; what it claimed is an orphan, handed back)."""
        statement = worker_queries.complete_and_claim(
            [t.fence for t, _ in items], [output for _, output in items], *claim.arguments
        )
        try:
            rows = await self._statements.rows(statement)
        except DB_ERRORS as exc:
            claim.failed()
            logger.debug("completing with a claim failed (%s); completing alone", first_line(exc))
            await self.complete(items)
            return
        except BaseException:
            claim.failed()
            raise
        first = rows[0]
        done = set(
            zip(
                first.settled_run_ids,
                first.settled_step_slugs,
                first.settled_task_indexes,
                strict=True,
            )
        )
        for task, _ in items:
            task.claim_followed = True
        await claim.claimed(rows, self.hand_back)
        await self._completed(items, done)

    async def _completed(
        self, items: Sequence[tuple[ClaimedTask, Any]], done: set[TaskKey]
    ) -> None:
        for task, _ in items:
            task.completed = task.key in done
        await self._record([t for t, _ in items], done, TaskState.SETTLED)
        self.completed += sum(1 for t, _ in items if t.key in done)

    async def fail(self, items: Sequence[tuple[ClaimedTask, str]]) -> None:
        """Fail tasks (pgflow retries them after its delay, or gives up). A refusal is
        isolated by failing them one by one; a task whose failure is refused is failed
        once more with a short message saying so, and handed back for later when that
        is refused too (the worker's role may not write the task's error at all)."""
        if not items:
            return
        try:
            await self._fail(items)
        except _Refused as refused:
            if len(items) > 1:
                for item in items:
                    await self.fail([item])
                return
            task, message = items[0]
            logger.error("pgflow refused to fail %s: %s", task.describe(), refused)
            fallback = f"the error could not be stored ({refused}); it began: {message[:200]!r}"
            try:
                await self._fail([(task, storable(fallback))])
            except _Refused as again:
                logger.error(
                    "pgflow refused to fail %s even with a short message (%s): check that "
                    "the worker's role may UPDATE pgflow.step_tasks (`pgflow-sa roles` "
                    "grants it) and that no constraint or trigger added there refuses "
                    "errors; handing it back, to be run again in %d s",
                    task.describe(),
                    again,
                    REFUSED_FAIL_DELAY,
                )
                await self.hand_back([task], REFUSED_FAIL_DELAY)

    async def _fail(self, items: Sequence[tuple[ClaimedTask, str]]) -> None:
        """One statement failing ``items``; raises _Refused when pgflow refuses it."""
        statement = worker_queries.fail_fenced(
            [t.fence for t, _ in items], [message for _, message in items]
        )
        done = await self._write(statement, f"failing {len(items)} task(s)")
        if done is None:
            return
        await self._record([t for t, _ in items], done, TaskState.SETTLED)
        self.failed += sum(1 for t, _ in items if t.key in done)

    async def hand_back(self, tasks: Sequence[ClaimedTask], delay_seconds: int = 0) -> int:
        """Return tasks to the queue without counting their attempt; their messages
        become visible after ``delay_seconds``."""
        if not tasks:
            return 0
        statement = worker_queries.hand_back_fenced([t.fence for t in tasks], delay_seconds)
        try:
            done = await self._write(statement, f"handing back {len(tasks)} task(s)")
        except _Refused as refused:
            logger.error("pgflow refused to hand back %d task(s): %s", len(tasks), refused)
            return 0
        if done is None:
            return 0
        await self._record(tasks, done, TaskState.HANDED_BACK)
        self.handed_back += len(done)
        return len(done)

    async def _record(
        self, tasks: Sequence[ClaimedTask], done: set[TaskKey], state: TaskState
    ) -> None:
        missed = [task for task in tasks if task.key not in done]
        for task in tasks:
            if task.key in done:
                task.state = state
        if not missed:
            return
        # not held any more: settled by this same attempt through another path (its
        # handler's session completed it while a timeout or a shutdown raced it), or lost
        try:
            ours = {
                (r.run_id, r.step_slug, r.task_index)
                for r in await self._statements.rows(
                    worker_queries.settled_by([t.fence for t in missed])
                )
            }
        except DB_ERRORS:
            ours = set()
        for task in missed:
            if task.key in ours:
                task.state = TaskState.SETTLED
            else:
                self.mark_lost(task)

    def mark_lost(self, task: ClaimedTask) -> None:
        task.state = TaskState.LOST
        self.lost += 1
        logger.warning(
            "lost task %s: the database no longer says this worker holds this attempt "
            "(it was completed, failed or handed back meanwhile, or taken over because "
            "this worker looked gone); nothing more of it was written",
            task.describe(),
        )
        events.emit(
            "task.lost",
            flow_slug=task.record.flow_slug,
            step_slug=task.record.step_slug,
            run_id=str(task.record.run_id),
            task_index=task.record.task_index,
            attempt=task.attempt,
        )

    async def _write(self, statement: worker_queries.Query, what: str) -> set[TaskKey] | None:
        """Run a fenced statement; the keys it settled. Transient errors are retried
        with backoff (a retried statement is fenced too, so a write that did commit
        before the connection broke is not repeated). None: gave up at the deadline."""
        backoff = Backoff(self._max_backoff)
        while True:
            try:
                rows = await self._statements.rows(statement)
                return {(r.run_id, r.step_slug, r.task_index) for r in rows}
            except DB_ERRORS as exc:
                kind = classify(exc)
                if kind is ErrorKind.REFUSED:
                    raise _Refused(exc) from exc
                deadline = self._deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    logger.error(
                        "%s failed (%s) and the worker is out of time; the tasks will be "
                        "recovered by another worker once this one is gone",
                        what,
                        first_line(exc),
                    )
                    return None
                delay = 0.0 if kind is ErrorKind.RACE else backoff.next_delay()
                logger.warning(
                    "%s failed (%s: %s); retrying in %.1f s",
                    what,
                    kind.value,
                    first_line(exc),
                    delay,
                )
                await asyncio.sleep(delay)


class CompletionBatcher:
    """Group commit: completions that arrive while statements are being written go
    together in the next one. Each statement costs a fixed overhead (its commit, its
    notifications) besides pgflow's work per task, so bigger batches drain faster.
    ``writers`` statements are written at once, on as many connections: pgflow's
    complete_task is most of the database's work per task, and one connection writing
    alone keeps one server core busy at most. Tasks go in key order within a statement,
    so two statements lock the rows of the runs they share in the same order. At most
    ``max_batch`` go in one statement (it holds its row locks until it commits), and
    claiming waits while ``max_backlog`` completions are unwritten, so a worker never
    runs far ahead of what it has stored."""

    def __init__(
        self,
        settler: Settler,
        max_batch: int = 500,
        max_backlog: int = 2000,
        writers: int = 2,
        claim_for: Callable[[Sequence[ClaimedTask]], FollowingClaim | None] = lambda tasks: None,
    ) -> None:
        """``claim_for(tasks)``: a claim to make in the statement completing ``tasks``
        (see :meth:`Settler.complete_and_claim`), or None."""
        self._settler = settler
        self._claim_for = claim_for
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._writers = writers
        self._pending: list[tuple[ClaimedTask, Any, asyncio.Future[None]]] = []
        self._writing = 0
        self._wake = asyncio.Event()
        #: set while there is room for more completions (claiming may go on)
        self.room = asyncio.Event()
        self.room.set()

    async def complete(self, task: ClaimedTask, output: Any) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((task, output, done))
        self._wake.set()
        self._update_room()
        await done

    def _update_room(self) -> None:
        if len(self._pending) + self._writing < self._max_backlog:
            self.room.set()
        else:
            self.room.clear()

    async def run(self) -> None:
        """Write pending completions until cancelled (cancel only when none are
        awaited any more)."""
        # a writer that fails ends the others: the supervisor restarts them all
        await together(*(self._write_loop() for _ in range(self._writers)))

    async def _write_loop(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._writing += len(batch)
            try:
                items = [(task, output) for task, output, _ in batch]
                claim = self._claim_for([task for task, _ in items])
                if claim is None:
                    await self._settler.complete(items)
                else:
                    await self._settler.complete_and_claim(items, claim)
            except BaseException as exc:
                for _, _, done in batch:
                    if done.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        done.cancel()
                    else:
                        done.set_exception(exc)
                raise
            finally:
                self._writing -= len(batch)
                self._update_room()
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)
