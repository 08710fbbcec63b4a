"""Read a flow's shape back from the pgflow tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.sql import Select

from ..shape import FlowShape, StepShape
from . import tables
from .functions import AsyncExecutor, SyncExecutor


def _statements(flow_slug: str) -> tuple[Select[Any], Select[Any], Select[Any]]:
    flows, steps, deps = tables.flows, tables.steps, tables.deps
    return (
        select(flows.c.opt_max_attempts, flows.c.opt_base_delay, flows.c.opt_timeout).where(
            flows.c.flow_slug == flow_slug
        ),
        select(
            steps.c.step_slug,
            steps.c.step_type,
            steps.c.opt_max_attempts,
            steps.c.opt_base_delay,
            steps.c.opt_timeout,
            steps.c.opt_start_delay,
        )
        .where(steps.c.flow_slug == flow_slug)
        .order_by(steps.c.step_index),
        select(deps.c.step_slug, deps.c.dep_slug).where(deps.c.flow_slug == flow_slug),
    )


def _shape(
    flow_slug: str,
    flow: Row[Any] | None,
    steps: Sequence[Row[Any]],
    deps: Sequence[Row[Any]],
) -> FlowShape | None:
    if flow is None:
        return None
    by_step: dict[str, list[str]] = {}
    for dep in deps:
        by_step.setdefault(dep.step_slug, []).append(dep.dep_slug)
    return FlowShape(
        slug=flow_slug,
        max_attempts=flow.opt_max_attempts,
        base_delay=flow.opt_base_delay,
        timeout=flow.opt_timeout,
        steps=tuple(
            StepShape(
                slug=s.step_slug,
                step_type=s.step_type,
                deps=tuple(sorted(by_step.get(s.step_slug, []))),
                max_attempts=s.opt_max_attempts,
                base_delay=s.opt_base_delay,
                timeout=s.opt_timeout,
                start_delay=s.opt_start_delay,
            )
            for s in steps
        ),
    )


def read_flow_shape(conn: SyncExecutor, flow_slug: str) -> FlowShape | None:
    """The flow as stored in the database, or None when it is not there."""
    flow_q, steps_q, deps_q = _statements(flow_slug)
    flow = conn.execute(flow_q).one_or_none()
    if flow is None:
        return None
    return _shape(flow_slug, flow, conn.execute(steps_q).all(), conn.execute(deps_q).all())


async def read_flow_shape_async(conn: AsyncExecutor, flow_slug: str) -> FlowShape | None:
    """:func:`read_flow_shape` for async connections and sessions."""
    flow_q, steps_q, deps_q = _statements(flow_slug)
    flow = (await conn.execute(flow_q)).one_or_none()
    if flow is None:
        return None
    steps = (await conn.execute(steps_q)).all()
    deps = (await conn.execute(deps_q)).all()
    return _shape(flow_slug, flow, steps, deps)


def list_flow_slugs(conn: SyncExecutor) -> list[str]:
    """Slugs of every flow in the database."""
    return list(
        conn.execute(select(tables.flows.c.flow_slug).order_by(tables.flows.c.flow_slug)).scalars()
    )
