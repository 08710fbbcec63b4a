"""SQL the worker needs beyond the pgflow functions: registration, heartbeats,
handing tasks back, finding stalled tasks, and run inputs for map tasks."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, insert, select, tuple_, update
from sqlalchemy.sql import Insert, Select, Update

from . import tables

step_tasks, steps, flows, runs, workers = (
    tables.step_tasks,
    tables.steps,
    tables.flows,
    tables.runs,
    tables.workers,
)


def register_workers(rows: Sequence[dict[str, Any]]) -> Insert:
    """One pgflow.workers row per served queue: worker_id, queue_name, function_name."""
    return insert(workers).values(list(rows))


def heartbeat(worker_ids: Sequence[uuid.UUID]) -> Update:
    """Touch the heartbeat; returns (worker_id, queue_name, deprecated)."""
    return (
        update(workers)
        .where(workers.c.worker_id.in_(worker_ids))
        .values(last_heartbeat_at=func.now())
        .returning(
            workers.c.worker_id,
            workers.c.queue_name,
            (workers.c.deprecated_at.is_not(None)).label("deprecated"),
        )
    )


def hand_back(worker_id: uuid.UUID, keys: Sequence[tuple[uuid.UUID, str, int]]) -> Update:
    """Put tasks this worker started but will not finish back to ``queued``, without
    counting the attempt; returns their message ids (make those visible again)."""
    return (
        update(step_tasks)
        .where(
            step_tasks.c.status == "started",
            step_tasks.c.last_worker_id == worker_id,
            tuple_(step_tasks.c.run_id, step_tasks.c.step_slug, step_tasks.c.task_index).in_(
                list(keys)
            ),
        )
        .values(
            status="queued",
            started_at=None,
            last_worker_id=None,
            attempts_count=func.greatest(step_tasks.c.attempts_count - 1, 0),
        )
        .returning(step_tasks.c.message_id)
    )


def stalled_tasks(flow_slugs: Sequence[str], margin_seconds: int, limit: int) -> Select[Any]:
    """Tasks started longer ago than their step timeout plus ``margin_seconds`` (their
    worker died), locked so that another worker's recovery skips them."""
    timeout = func.coalesce(steps.c.opt_timeout, flows.c.opt_timeout)
    return (
        select(
            step_tasks.c.run_id,
            step_tasks.c.step_slug,
            step_tasks.c.task_index,
            step_tasks.c.flow_slug,
        )
        .join(
            steps,
            and_(
                steps.c.flow_slug == step_tasks.c.flow_slug,
                steps.c.step_slug == step_tasks.c.step_slug,
            ),
        )
        .join(flows, flows.c.flow_slug == step_tasks.c.flow_slug)
        .where(
            step_tasks.c.flow_slug.in_(flow_slugs),
            step_tasks.c.status == "started",
            step_tasks.c.started_at
            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, timeout + margin_seconds),
        )
        .limit(limit)
        .with_for_update(of=step_tasks, skip_locked=True)
    )


def claimed_details(msg_ids: Sequence[int]) -> Select[Any]:
    """(message_id, attempts_count, run input) of just-claimed tasks: the attempt number
    and the flow input (map tasks don't carry it) for the handler's context."""
    return (
        select(step_tasks.c.message_id, step_tasks.c.attempts_count, runs.c.input)
        .join(runs, runs.c.run_id == step_tasks.c.run_id)
        .where(step_tasks.c.message_id.in_(msg_ids), step_tasks.c.status == "started")
    )


def step_timeouts(flow_slug: str) -> Select[Any]:
    """(step_slug, effective timeout in seconds) of a flow's steps."""
    return (
        select(
            steps.c.step_slug,
            func.coalesce(steps.c.opt_timeout, flows.c.opt_timeout).label("timeout"),
        )
        .join(flows, flows.c.flow_slug == steps.c.flow_slug)
        .where(steps.c.flow_slug == flow_slug)
    )


def pgmq_insert_channel(queue_name: str) -> str:
    """The channel pgmq notifies when notify-on-insert is enabled for a queue."""
    return f"pgmq.q_{queue_name}.INSERT"
