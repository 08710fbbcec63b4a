"""The dashboard's reads that the client has no reader for: flow structure (steps,
options and dependencies, one query for every flow) and workers. Runs, run states
and flow status come from :mod:`pgflow_sa.client`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.sql import Select

from ..schema import tables
from .dag import StepNode

flows, steps, deps, workers = tables.flows, tables.steps, tables.deps, tables.workers

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
