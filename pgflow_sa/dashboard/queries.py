"""The dashboard's reads that the client has no reader for: flow structure (steps,
options and dependencies, one query for every flow), the flows page's counts, and
workers. Runs and run states come from :mod:`pgflow_sa.client`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.sql import Select

from ..schema import tables
from .dag import StepNode

flows, steps, deps, runs, workers, step_tasks = (
    tables.flows,
    tables.steps,
    tables.deps,
    tables.runs,
    tables.workers,
    tables.step_tasks,
)

#: workers listed at most (the most recent heartbeats first)
WORKERS_SHOWN = 200


@dataclass(frozen=True)
class StepInfo:
    node: StepNode
    options: dict[str, int | None]


@dataclass(frozen=True)
class FlowInfo:
    flow_slug: str
    options: dict[str, int]
    created_at: datetime
    steps: tuple[StepInfo, ...]

    @property
    def nodes(self) -> list[StepNode]:
        return [step.node for step in self.steps]


def flow_structure(flow_slug: str | None = None) -> Select[Any]:
    """One row per step (a flow without steps: one row with a null step) with the
    flow's options and the step's dependencies as an array; every flow, or one."""
    dep_slugs = func.array_remove(func.array_agg(deps.c.dep_slug), None)
    query = (
        select(
            flows.c.flow_slug,
            flows.c.opt_max_attempts.label("flow_max_attempts"),
            flows.c.opt_base_delay.label("flow_base_delay"),
            flows.c.opt_timeout.label("flow_timeout"),
            flows.c.created_at,
            steps.c.step_slug,
            steps.c.step_type,
            steps.c.step_index,
            steps.c.opt_max_attempts,
            steps.c.opt_base_delay,
            steps.c.opt_timeout,
            steps.c.opt_start_delay,
            dep_slugs.label("deps"),
        )
        .select_from(
            flows.outerjoin(steps, steps.c.flow_slug == flows.c.flow_slug).outerjoin(
                deps,
                and_(deps.c.flow_slug == steps.c.flow_slug, deps.c.step_slug == steps.c.step_slug),
            )
        )
        # the primary keys: PostgreSQL lets the other columns of both tables follow
        .group_by(flows.c.flow_slug, steps.c.flow_slug, steps.c.step_slug)
        .order_by(flows.c.flow_slug, steps.c.step_index)
    )
    if flow_slug is not None:
        query = query.where(flows.c.flow_slug == flow_slug)
    return query


def flow_infos(rows: Any) -> list[FlowInfo]:
    """:func:`flow_structure`'s rows as one FlowInfo per flow."""
    result: list[FlowInfo] = []
    for row in rows:
        if not result or result[-1].flow_slug != row.flow_slug:
            result.append(
                FlowInfo(
                    flow_slug=row.flow_slug,
                    options={
                        "max_attempts": row.flow_max_attempts,
                        "base_delay": row.flow_base_delay,
                        "timeout": row.flow_timeout,
                    },
                    created_at=row.created_at,
                    steps=(),
                )
            )
        if row.step_slug is None:
            continue
        step = StepInfo(
            node=StepNode(row.step_slug, row.step_type, tuple(sorted(row.deps or ()))),
            options={
                "max_attempts": row.opt_max_attempts,
                "base_delay": row.opt_base_delay,
                "timeout": row.opt_timeout,
                "start_delay": row.opt_start_delay,
            },
        )
        last = result[-1]
        result[-1] = FlowInfo(last.flow_slug, last.options, last.created_at, (*last.steps, step))
    return result


def recent_workers(limit: int = WORKERS_SHOWN) -> Select[Any]:
    """Workers, the most recent heartbeat first (idx_workers_heartbeat)."""
    return select(workers).order_by(workers.c.last_heartbeat_at.desc()).limit(limit)


@dataclass(frozen=True)
class FlowCounts:
    """The flows page's numbers of one flow."""

    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    live_workers: int = 0
    last_heartbeat_at: datetime | None = None


# Not the client's flow_status: its counts of runs that finished in the window have
# no index to use (completed_at, failed_at), so at 100,000 runs it took 0.3-0.8 s.
# Here the window is over runs *started* in it (pgflow_sa_runs_started_at), and runs
# in progress are counted whenever they started (idx_runs_status).


def run_counts(window: timedelta) -> Select[Any]:
    """Per flow and status: runs started within ``window``, and all runs."""
    recent = runs.c.started_at >= func.now() - window
    return (
        select(
            runs.c.flow_slug,
            runs.c.status,
            func.count().filter(recent).label("recent"),
            func.count().label("every"),
        )
        .where(or_(recent, runs.c.status == "started"))
        .group_by(runs.c.flow_slug, runs.c.status)
    )


def queue_lengths() -> Select[Any]:
    """Messages in every pgmq queue (one call of pgmq.metrics_all)."""
    metrics = func.pgmq.metrics_all().table_valued("queue_name", "queue_length")
    return select(metrics.c.queue_name, metrics.c.queue_length)


def worker_counts(live: timedelta) -> Select[Any]:
    """Per queue: workers with a heartbeat within ``live`` (not deprecated), and the
    last heartbeat."""
    is_live = and_(
        workers.c.deprecated_at.is_(None), workers.c.last_heartbeat_at > func.now() - live
    )
    return select(
        workers.c.queue_name,
        func.count().filter(is_live).label("live"),
        func.max(workers.c.last_heartbeat_at).label("last_heartbeat_at"),
    ).group_by(workers.c.queue_name)


def flow_counts(run_rows: Any, queue_rows: Any, worker_rows: Any) -> dict[str, FlowCounts]:
    """The three queries' rows as FlowCounts per flow slug (queue = flow slug)."""
    values: dict[str, dict[str, Any]] = {}
    for row in run_rows:
        own = values.setdefault(row.flow_slug, {})
        if row.status == "started":
            own["running"] = row.every
        elif row.status in ("completed", "failed"):
            own[row.status] = row.recent
    for row in queue_rows:
        values.setdefault(row.queue_name, {})["queued"] = row.queue_length
    for row in worker_rows:
        own = values.setdefault(row.queue_name, {})
        own["live_workers"], own["last_heartbeat_at"] = row.live, row.last_heartbeat_at
    return {slug: FlowCounts(**own) for slug, own in values.items()}


def task_window(run_id: Any, after: int, size: int) -> Select[Any]:
    """The run's tasks with ``after < task_index <= after + size`` in every step, and
    each step's task 0 (a single step's output, which its dependents received).
    pgflow numbers a step's tasks 0..n-1, so this range is keyset pagination on
    task_index; the primary key (run_id, step_slug, task_index) finds the rows
    without reading the other tasks' inputs or outputs."""
    index = step_tasks.c.task_index
    return (
        select(step_tasks)
        .where(
            step_tasks.c.run_id == run_id,
            or_(index == 0, and_(index > after, index <= after + size)),
        )
        .order_by(step_tasks.c.step_slug, index)
    )


def task_counts(run_id: Any) -> Select[Any]:
    """(step_slug, status, n): the run's tasks counted per step and status."""
    return (
        select(step_tasks.c.step_slug, step_tasks.c.status, func.count().label("n"))
        .where(step_tasks.c.run_id == run_id)
        .group_by(step_tasks.c.step_slug, step_tasks.c.status)
        .order_by(step_tasks.c.step_slug, step_tasks.c.status)
    )


def task_with_deps(
    run_id: Any, step_slug: str, task_index: int, deps: Sequence[str]
) -> Select[Any]:
    """One task, and every task of the steps it depends on (what its input was made
    of), by primary key."""
    return (
        select(step_tasks)
        .where(
            step_tasks.c.run_id == run_id,
            or_(
                and_(step_tasks.c.step_slug == step_slug, step_tasks.c.task_index == task_index),
                step_tasks.c.step_slug.in_(list(deps)),
            ),
        )
        .order_by(step_tasks.c.step_slug, step_tasks.c.task_index)
    )
