"""A claimed task and the states it goes through in a worker."""

from __future__ import annotations

import enum
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..dsl import Flow, StepDefinition
from ..schema.rows import StepTaskRecord
from ..schema.worker_queries import Fence

TaskKey = tuple[uuid.UUID, str, int]


class TaskState(enum.Enum):
    """claimed -> running -> settling -> settled | handed_back | lost."""

    CLAIMED = "claimed"
    #: its handler runs (or, timed out or shut down, its thread has not ended yet)
    RUNNING = "running"
    #: its handler ended; the completion or failure is being written
    SETTLING = "settling"
    #: completed or failed in the database by this worker
    SETTLED = "settled"
    #: put back to queued by this worker (shutdown, lost connection in the handler)
    HANDED_BACK = "handed_back"
    #: the database no longer says this worker holds it at this attempt
    LOST = "lost"

    @property
    def final(self) -> bool:
        return self in (TaskState.SETTLED, TaskState.HANDED_BACK, TaskState.LOST)


@dataclass(eq=False)
class ClaimedTask:
    """A task this worker started: what to run, and the fence that every settle of
    it must still match (worker id and the ``started_at`` of this attempt)."""

    flow: Flow
    step: StepDefinition
    record: StepTaskRecord
    worker_id: uuid.UUID
    #: what start_tasks stamped on the row for this attempt
    started_at: datetime
    attempt: int
    #: the step timeout in seconds, as the database said when the task was claimed
    timeout: int
    state: TaskState = TaskState.CLAIMED
    #: settled by the worker's own completion statement (which publishes pgflow's
    #: events for the steps it started), not failed nor completed in a handler's session
    completed: bool = False
    #: its completion statement also claimed tasks of its flow (so the steps that
    #: completion started need no wake-up)
    claim_followed: bool = False
    #: the flow input, for handlers of map steps (their task input is the element)
    flow_input: Any = field(default=None, repr=False)
    #: a retry reusing outputs: this task completed in the run retried, with this output
    reused: bool = False
    reused_output: Any = field(default=None, repr=False)
    #: set when the run ended while the task runs (cancelled, or failed by another
    #: task): the handler is cancelled (async) or sees ``ctx.cancelled`` (sync)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    #: what cancels the running handler (set by the runner while it runs)
    on_cancel: Callable[[], object] | None = field(default=None, repr=False)

    def request_cancel(self) -> bool:
        """The run ended: cancel the handler (call on the worker's loop). False when it
        was asked before."""
        if self.cancelled.is_set():
            return False
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()
        return True

    @property
    def key(self) -> TaskKey:
        return (self.record.run_id, self.record.step_slug, self.record.task_index)

    @property
    def fence(self) -> Fence:
        return (*self.key, self.worker_id, self.started_at)

    def describe(self) -> str:
        r = self.record
        return f"{r.flow_slug}/{r.step_slug}[{r.task_index}] of run {r.run_id} (attempt {self.attempt})"
