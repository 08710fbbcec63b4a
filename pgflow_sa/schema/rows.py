"""Typed rows returned by the pgflow and pgmq function wrappers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

R = TypeVar("R")


def from_mapping(cls: type[R], mapping: Mapping[Any, Any]) -> R:
    """Build a row dataclass, ignoring columns it does not declare (newer pgmq
    versions add columns to their result types)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in mapping.items() if k in names})


@dataclass(frozen=True, slots=True)
class FlowRow:
    flow_slug: str
    opt_max_attempts: int
    opt_base_delay: int
    opt_timeout: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StepRow:
    flow_slug: str
    step_slug: str
    step_type: str
    step_index: int
    deps_count: int
    opt_max_attempts: int | None
    opt_base_delay: int | None
    opt_timeout: int | None
    created_at: datetime
    opt_start_delay: int | None


@dataclass(frozen=True, slots=True)
class RunRow:
    run_id: UUID
    flow_slug: str
    status: str
    input: Any
    output: Any
    remaining_steps: int
    started_at: datetime
    completed_at: datetime | None
    failed_at: datetime | None


@dataclass(frozen=True, slots=True)
class StepTaskRow:
    flow_slug: str
    run_id: UUID
    step_slug: str
    message_id: int | None
    task_index: int
    status: str
    attempts_count: int
    error_message: str | None
    output: Any
    queued_at: datetime
    completed_at: datetime | None
    failed_at: datetime | None
    started_at: datetime | None
    last_worker_id: UUID | None


@dataclass(frozen=True, slots=True)
class StepTaskRecord:
    """A task claimed by ``pgflow.start_tasks``; ``input`` is as pgflow 0.8.1 builds it."""

    flow_slug: str
    run_id: UUID
    step_slug: str
    input: Any
    msg_id: int
    task_index: int


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A pgmq message (``pgmq.message_record``)."""

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    vt: datetime
    message: Any
    headers: Any = None
    last_read_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """``pgmq.metrics`` of one queue."""

    queue_name: str
    queue_length: int
    newest_msg_age_sec: int | None
    oldest_msg_age_sec: int | None
    total_messages: int
    scrape_time: datetime
    queue_visible_length: int | None = None
