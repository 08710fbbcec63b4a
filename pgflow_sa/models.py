"""Typed results of the client: runs, step states, tasks and run events (pydantic)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class RunStatus(str, enum.Enum):
    """A run's status. pgflow's table says ``failed`` for a cancelled run too;
    pgflow-sa records the cancellation and reports ``cancelled``."""

    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not RunStatus.STARTED


class StepStatus(str, enum.Enum):
    CREATED = "created"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class TaskStatus(str, enum.Enum):
    QUEUED = "queued"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class StepTask(_Frozen):
    """One task of a step (a single step has one, a map step one per element)."""

    task_index: int
    status: TaskStatus
    attempts_count: int
    output: Any = None
    error_message: str | None = None
    message_id: int | None = None
    last_worker_id: uuid.UUID | None = None
    queued_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None


class StepState(_Frozen):
    """A step of a run. ``output`` is the step's output once completed (the list of
    task outputs for a map step); ``attempts`` the most attempts any task took."""

    step_slug: str
    step_type: str
    step_index: int
    status: StepStatus
    remaining_deps: int
    remaining_tasks: int | None = None
    initial_tasks: int | None = None
    error_message: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    attempts: int = 0
    output: Any = None
    tasks: tuple[StepTask, ...] = ()

    @property
    def duration_seconds(self) -> float | None:
        end = self.completed_at or self.failed_at
        if self.started_at is None or end is None:
            return None
        return (end - self.started_at).total_seconds()


class Run(_Frozen):
    """A flow run. ``error`` is the failed step's error message (for a cancelled run
    "Cancelled: <reason>"); ``steps`` is None unless the steps were loaded. ``created`` is False when a start with an existing
    ``run_id`` found the run already there (idempotent start)."""

    run_id: uuid.UUID
    flow_slug: str
    status: RunStatus
    input: Any
    output: Any = None
    remaining_steps: int
    started_at: datetime
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    error: str | None = None
    steps: tuple[StepState, ...] | None = None
    created: bool = True
    #: when it was cancelled (``cancel_run``) and why
    cancelled_at: datetime | None = None
    cancel_reason: str | None = None
    #: the run this one retries (``retry_run``)
    retry_of: uuid.UUID | None = None

    @property
    def cancelled(self) -> bool:
        return self.status is RunStatus.CANCELLED

    @property
    def finished(self) -> bool:
        return self.status.finished

    def step(self, slug: str) -> StepState:
        """The state of one step (``run.step("fetch").status``)."""
        if self.steps is None:
            raise LookupError(
                f"run {self.run_id} was read without its steps; read it with get_run() "
                "or wait_for_run() to have them"
            )
        for state in self.steps:
            if state.step_slug == slug:
                return state
        known = ", ".join(state.step_slug for state in self.steps)
        raise KeyError(f"run {self.run_id} of {self.flow_slug!r} has no step {slug!r} ({known})")


class RunPage(_Frozen):
    """One page of :func:`pgflow_sa.list_runs`; pass ``next_cursor`` as ``after`` for
    the next page (None on the last page)."""

    runs: tuple[Run, ...]
    next_cursor: str | None = None


class RunEvent(_Frozen):
    """A run or step event: ``run:started``, ``run:completed``, ``run:failed``,
    ``step:<slug>:started|completed|failed``. ``payload`` is what pgflow sent (may be
    trimmed, see ``trimmed``), or, when events come from polling, what the tables say."""

    event: str
    run_id: uuid.UUID
    step_slug: str | None = None
    status: str | None = None
    payload: dict[str, Any] = {}
    trimmed: bool = False

    @property
    def is_run_event(self) -> bool:
        return self.step_slug is None

    @property
    def finishes_run(self) -> bool:
        return self.event in ("run:completed", "run:failed")


class FlowStatus(_Frozen):
    """How one flow is doing (:func:`pgflow_sa.flow_status`): ``queued`` messages in its
    pgmq queue (waiting, delayed or being worked on), runs in progress, runs that
    completed / failed (by themselves) / were cancelled within the window, retries
    started then, queued tasks waiting on a concurrency limit, workers with a recent
    heartbeat."""

    flow_slug: str
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int = 0
    retried: int = 0
    waiting_on_limit: int = 0
    live_workers: int
    last_heartbeat_at: datetime | None = None
