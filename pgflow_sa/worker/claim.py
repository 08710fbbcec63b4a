"""Claiming tasks: one concurrency budget for the whole worker, taken before a claim,
and one poller per served flow that reads the queue and starts tasks in one
statement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .. import events
from .._aio import first_of, together
from .._backoff import Backoff
from .._db import DB_ERRORS, ErrorKind, classify, first_line, sqlstate
from ..dsl import Flow
from ..schema import worker_queries
from ..schema.rows import StepTaskRecord
from .direct import DirectStatements
from .settings import WorkerSettings
from .task import ClaimedTask

logger = logging.getLogger("pgflow_sa.worker")

#: claims of one flow that may be in flight at once
LANES = 2
#: seconds between claims of a flow while a concurrency limit holds tasks back (the
#: room another worker's task leaves when it ends comes with no notification)
LIMIT_POLL_INTERVAL = 0.5
#: SQLSTATE of a foreign key violation: start_tasks names a worker row that is gone
_FOREIGN_KEY_VIOLATION = "23503"


class Budget:
    """The worker's concurrency slots. A slot is taken before claiming and held until
    the task's handler has really ended."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.closed = False
        self._changed = asyncio.Event()

    async def take(self, most: int) -> int:
        """Take between 1 and ``most`` slots, waiting for one; 0 once closed."""
        while self.free <= 0 and not self.closed:
            self._changed.clear()
            await self._changed.wait()
        return self.try_take(most)

    def try_take(self, most: int) -> int:
        """Up to ``most`` free slots without waiting (0: none free, or closed)."""
        if self.closed or self.free <= 0:
            return 0
        taken = min(most, self.free)
        self.free -= taken
        return taken

    def close(self) -> None:
        """No more slots are handed out (the worker stops); waiting takers get 0."""
        self.closed = True
        self._changed.set()

    def give(self, count: int = 1) -> None:
        if count:
            self.free += count
            self._changed.set()

    @property
    def in_use(self) -> int:
        return self.size - self.free


class Poller:
    """Reads one flow's queue whenever the worker has free slots and the queue may have
    work: woken by notifications, or after a poll interval."""

    def __init__(
        self,
        flow: Flow,
        worker_id: uuid.UUID,
        engine: AsyncEngine,
        settings: WorkerSettings,
        budget: Budget,
        launch: Callable[[ClaimedTask], None],
        reregister: Callable[[], Awaitable[None]],
        notified: Callable[[], bool],
        room: asyncio.Event,
    ) -> None:
        self.flow = flow
        self.worker_id = worker_id
        self.wake = asyncio.Event()
        self._statements = DirectStatements(engine)
        self._settings = settings
        self._budget = budget
        self._launch = launch
        self._reregister = reregister
        self._notified = notified
        self._room = room
        #: claims whose statement may have started tasks not yet launched
        self.in_flight: set[asyncio.Future[None]] = set()
        self.deprecated = False
        #: the latest claim left messages it could not take (a full batch, or visible
        #: messages another read held): a freed slot may take more at once
        self.more_waiting = False
        #: loop time of the polling lane's next read when nothing wakes it: set by the
        #: latest claim of any lane that found the queue drained (it knows when the
        #: next hidden message becomes visible)
        self._poll_at = 0.0
        self._poll_moved = asyncio.Event()
        #: the flow has concurrency limits (pgflow_sa.flow_limits): claimed in turns
        self._limited = flow.limits() is not None
        self._held_back_since: float | None = None
        self._stopping: asyncio.Event | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Claim until stopped or deprecated, in LANES lanes: a wake-up that arrives
        while one lane is reading starts a claim in another at once."""
        self._stopping = stopping
        await together(*(self._lane(stopping, polls=i == 0) for i in range(LANES)))

    async def _lane(self, stopping: asyncio.Event, polls: bool) -> None:
        """One lane. The lane that ``polls`` claims at once and then whenever woken or
        a poll is due; the others only when woken."""
        backoff = Backoff(self._settings.max_backoff)
        claim_now = polls
        while not stopping.is_set() and not self.deprecated:
            if not claim_now:
                await self._woken(stopping, polls)
            claim_now = False
            if not self._room.is_set():  # completions to write first
                await first_of(self._room, stopping)
            qty = await self._budget.take(self._settings.batch_size)
            if qty == 0 or self.deprecated or stopping.is_set():
                self._budget.give(qty)
                break
            self.wake.clear()
            started = time.monotonic()
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.in_flight.add(done)
            try:
                claimed, read, visible_in = await self._claim(qty)
            except DB_ERRORS as exc:
                self._budget.give(qty)
                await self._after_error(exc, backoff, stopping)
                claim_now = polls
                continue
            finally:
                self.in_flight.discard(done)
                done.set_result(None)
            backoff.reset()
            # a full batch: there may be more waiting
            claim_now = self._claimed(qty, len(claimed), read, visible_in, started)

    def _claimed(
        self, qty: int, claimed: int, read: int, visible_in: float | None, started: float
    ) -> bool:
        """After a claim of ``qty`` slots: the slots not used go back, the next idle
        read is scheduled; whether to claim again at once (it read a full batch)."""
        self._budget.give(qty - claimed)
        # (a limit holding messages back: a slot this worker frees may take one)
        self.more_waiting = (
            read >= qty
            or (visible_in is not None and visible_in <= 0)
            or self._held_back_since is not None
        )
        events.emit(
            "poll",
            {"messages": read, "duration_s": time.monotonic() - started},
            flow_slug=self.flow.slug,
            requested=qty,
        )
        if read >= qty:
            return True
        loop = asyncio.get_running_loop()
        self._poll_at = loop.time() + self._idle_interval(visible_in)
        self._poll_moved.set()
        return False

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    def claim_with_completion(self) -> FollowingClaim | None:
        """A claim to make in the statement that writes completions of this flow (see
        worker_queries.complete_and_claim), holding slots of the budget taken now; None
        when there is none to make (no free slot, the flow has limits, or it stops)."""
        if self._limited or self.deprecated or self._stopping is None or self.stopping:
            return None
        if not self._room.is_set():
            return None
        qty = self._budget.try_take(self._settings.batch_size)
        if not qty:
            return None
        return FollowingClaim(self, qty)

    def _idle_interval(self, visible_in: float | None) -> float:
        interval = (
            self._settings.poll_interval
            if self._notified()
            else self._settings.fallback_poll_interval
        )
        if visible_in is not None:
            # no notification says when a hidden message (a retry's, a start delay's)
            # becomes visible: read again then. One visible already was locked by
            # another worker's read, which is taking it
            interval = min(
                interval,
                visible_in if visible_in > 0 else self._settings.fallback_poll_interval,
            )
        return interval

    async def _woken(self, stopping: asyncio.Event, polls: bool) -> None:
        """Until a wake-up (taken, so that one wake-up starts one claim) or the stop;
        for the polling lane also until the next poll is due (another lane's claim
        may bring it forward)."""
        loop = asyncio.get_running_loop()
        while not self.wake.is_set() and not stopping.is_set():
            if not polls:
                await first_of(self.wake, stopping)
                continue
            remaining = self._poll_at - loop.time()
            if remaining <= 0:
                return
            self._poll_moved.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(first_of(self.wake, stopping, self._poll_moved), remaining)
        self.wake.clear()

    async def _after_error(
        self, exc: BaseException, backoff: Backoff, stopping: asyncio.Event
    ) -> None:
        kind = classify(exc)
        if kind is ErrorKind.RACE:
            logger.debug("claim on %s raced a new task (%s); again", self.flow.slug, exc)
            return
        if sqlstate(exc) == _FOREIGN_KEY_VIOLATION:
            logger.warning(
                "the worker row for %s is gone (the flow was dropped or the row deleted); "
                "registering again",
                self.flow.slug,
            )
            with contextlib.suppress(*DB_ERRORS):
                await self._reregister()
        delay = await backoff.sleep(stopping)
        log = logger.warning if kind.transient else logger.error
        log(
            "claiming tasks of %s failed (%s: %s); retried after %.1f s",
            self.flow.slug,
            kind.value,
            first_line(exc),
            delay,
        )

    async def _claim(self, qty: int) -> tuple[list[ClaimedTask], int, float | None]:
        """One round trip (see worker_queries.claim), or for a flow with limits a
        transaction of two (worker_queries.limited_claim); every claimed task is
        launched before this returns. (claimed, messages read, seconds until the next
        hidden message becomes visible or None)."""
        return await self._take(await self._claim_rows(qty, self._limited), qty)

    async def _take(self, rows: list[Any], qty: int) -> tuple[list[ClaimedTask], int, float | None]:
        """Launch the tasks of a claim's rows; as :meth:`_claim`."""
        if rows and bool(rows[0].limited) != self._limited:
            # limits were set or removed (a worker of the flow started with others):
            # the statement that read nothing for this flow is the wrong one now
            self._limited = bool(rows[0].limited)
            logger.info(
                "flow %s %s concurrency limits",
                self.flow.slug,
                "has" if self._limited else "no longer has",
            )
            if self._limited:
                rows = await self._claim_rows(qty, True)
        claimed = self._tasks_from(rows)
        for task in claimed:
            self._launch(task)
        if not rows:
            return claimed, 0, None
        return self._visible_in(rows[0], claimed)

    def _tasks_from(self, rows: list[Any]) -> list[ClaimedTask]:
        return [
            ClaimedTask(
                flow=self.flow,
                step=self.flow.get_step(row.step_slug),
                record=StepTaskRecord(
                    self.flow.slug, row.run_id, row.step_slug, row.input, row.msg_id, row.task_index
                ),
                worker_id=self.worker_id,
                started_at=row.started_at,
                attempt=row.attempt,
                timeout=row.timeout,
                reused=bool(row.reused),
                reused_output=row.reused_output,
            )
            for row in rows
            if row.run_id is not None
        ]

    def _visible_in(
        self, first: Any, claimed: list[ClaimedTask]
    ) -> tuple[list[ClaimedTask], int, float | None]:
        visible_in = None
        if first.next_visible_at is not None:
            # both times are the database's: no clock skew
            visible_in = (first.next_visible_at - first.started_at).total_seconds()
        if first.held_back:
            # a task of another worker that ends frees room without a notification (the
            # messages held back are visible: next_visible_at says nothing then)
            visible_in = LIMIT_POLL_INTERVAL
            if self._held_back_since is None:
                self._held_back_since = time.monotonic()
                events.emit("limit.wait", flow_slug=self.flow.slug)
        elif self._held_back_since is not None:
            events.emit(
                "limit.clear",
                {"waited_s": time.monotonic() - self._held_back_since},
                flow_slug=self.flow.slug,
            )
            self._held_back_since = None
        return claimed, first.read_count, visible_in

    async def _claim_rows(self, qty: int, limited: bool) -> list[Any]:
        margin = self._settings.visibility_timeout
        if not limited:
            statement = worker_queries.claim(self.flow.slug, margin, qty, self.worker_id)
            return await self._statements.rows(statement)
        # in one transaction: the lock lasts until the claim commits
        statement = worker_queries.limited_claim(self.flow.slug, margin, qty, self.worker_id)
        return await self._statements.rows(
            statement, after=worker_queries.limits_lock_key(self.flow.slug)
        )


class FollowingClaim:
    """A claim of a poller's flow made by the statement that writes completions of the
    flow (one round trip for both: the steps they start are claimed at once). It holds
    ``qty`` slots of the budget from :meth:`Poller.claim_with_completion` until
    :meth:`claimed` or :meth:`failed`, and counts as a claim in flight meanwhile (so
    that no task it starts is taken for an orphan)."""

    def __init__(self, poller: Poller, qty: int) -> None:
        self.poller = poller
        self.qty = qty
        self._started = time.monotonic()
        self._in_flight: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        poller.in_flight.add(self._in_flight)

    @property
    def arguments(self) -> tuple[str, int, int, uuid.UUID, int]:
        """queue, vt_margin, qty, worker_id, lock_timeout_ms of
        worker_queries.complete_and_claim. The lock timeout: the statement holds the
        worker's row (its heartbeat waits) for at most a quarter of the time between a
        heartbeat and the stall margin, and at most half a second (the worker's row
        is marked stopped within its close grace)."""
        poller = self.poller
        settings = poller._settings
        spare = settings.stall_margin - settings.heartbeat_interval
        lock_timeout_ms = max(20, min(500, int(spare * 1000 / 4)))
        return (
            poller.flow.slug,
            settings.visibility_timeout,
            self.qty,
            poller.worker_id,
            lock_timeout_ms,
        )

    async def claimed(
        self, rows: list[Any], hand_back: Callable[[list[ClaimedTask]], Awaitable[int]]
    ) -> None:
        """The statement committed: launch what it claimed, or ``hand_back`` all of it
        (never run, no attempt counted) when the worker is stopping meanwhile."""
        poller = self.poller
        if rows and rows[0].put_back:
            poller.wake.set()  # messages it could not start are visible again
        if poller.stopping:
            poller._budget.give(self.qty)
            self._end()
            tasks = poller._tasks_from(rows)
            if tasks:
                await hand_back(tasks)
            return
        try:
            tasks, read, visible_in = await poller._take(rows, self.qty)
        except DB_ERRORS as exc:  # the claim again, with limits that appeared
            poller._budget.give(self.qty)
            logger.warning("claiming tasks of %s failed (%s)", poller.flow.slug, first_line(exc))
            poller.wake.set()
            return
        finally:
            self._end()
        if poller._claimed(self.qty, len(tasks), read, visible_in, self._started):
            poller.wake.set()  # a full batch: there may be more waiting

    def failed(self) -> None:
        """The statement did not commit (the completions are written without it)."""
        self.poller._budget.give(self.qty)
        self._end()
        self.poller.wake.set()

    def _end(self) -> None:
        self.poller.in_flight.discard(self._in_flight)
        if not self._in_flight.done():
            self._in_flight.set_result(None)
