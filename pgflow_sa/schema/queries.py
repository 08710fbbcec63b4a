"""Read queries of the client (runs, step states, tasks) and of event listeners."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

# TextClause is exported by sqlalchemy.sql only from 2.1; the top level has it on 2.0 too.
from sqlalchemy import Select, Text, TextClause, and_, bindparam, literal, select, text, tuple_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.selectable import TextualSelect

from . import tables
from .names import NOTIFY_CHANNEL

runs, step_states, step_tasks, steps = (
    tables.runs,
    tables.step_states,
    tables.step_tasks,
    tables.steps,
)

_run_error = (
    select(step_states.c.error_message)
    .where(step_states.c.run_id == runs.c.run_id, step_states.c.status == "failed")
    .order_by(step_states.c.failed_at)
    .limit(1)
    .scalar_subquery()
    .label("error")
)


def flow_exists(flow_slug: str) -> Select[Any]:
    return select(tables.flows.c.flow_slug).where(tables.flows.c.flow_slug == flow_slug)


def start_flows(flow_slug: str, inputs: list[Any]) -> TextualSelect:
    """``pgflow.start_flow`` once per input, in input order, in one statement: the new
    runs' rows. The inputs travel as one JSON array."""
    return (
        text(
            "SELECT r.* FROM jsonb_array_elements(CAST(:inputs AS jsonb))"
            " WITH ORDINALITY AS i(input, n)"
            " CROSS JOIN LATERAL pgflow.start_flow(:flow_slug, i.input) AS r ORDER BY i.n"
        )
        .bindparams(
            bindparam("inputs", inputs, type_=JSONB()),
            bindparam("flow_slug", flow_slug, type_=Text()),
        )
        .columns(*runs.c)
    )


def run_by_id(run_id: uuid.UUID) -> Select[Any]:
    """The run's columns plus ``error`` (its failed step's message)."""
    return select(runs, _run_error).where(runs.c.run_id == run_id)


def runs_page(
    *,
    flow_slug: str | None,
    status: str | None,
    started_after: datetime | None,
    started_before: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> Select[Any]:
    """Runs, newest first, keyset-paginated on (started_at, run_id)."""
    query = select(runs, _run_error)
    if flow_slug is not None:
        query = query.where(runs.c.flow_slug == flow_slug)
    if status is not None:
        query = query.where(runs.c.status == status)
    if started_after is not None:
        query = query.where(runs.c.started_at >= started_after)
    if started_before is not None:
        query = query.where(runs.c.started_at < started_before)
    if after is not None:
        # literal(): SQLAlchemy 2.0's tuple_() is typed for SQL expressions only.
        started_at, run_id = after
        cursor = tuple_(
            literal(started_at, runs.c.started_at.type), literal(run_id, runs.c.run_id.type)
        )
        query = query.where(tuple_(runs.c.started_at, runs.c.run_id) < cursor)
    return query.order_by(runs.c.started_at.desc(), runs.c.run_id.desc()).limit(limit)


def run_step_states(run_id: uuid.UUID) -> Select[Any]:
    """The run's step states with each step's type and index, in step order."""
    return (
        select(step_states, steps.c.step_type, steps.c.step_index)
        .join(
            steps,
            and_(
                steps.c.flow_slug == step_states.c.flow_slug,
                steps.c.step_slug == step_states.c.step_slug,
            ),
        )
        .where(step_states.c.run_id == run_id)
        .order_by(steps.c.step_index)
    )


def run_tasks(run_id: uuid.UUID) -> Select[Any]:
    return (
        select(step_tasks)
        .where(step_tasks.c.run_id == run_id)
        .order_by(step_tasks.c.step_slug, step_tasks.c.task_index)
    )


def finished_runs(run_ids: Sequence[uuid.UUID]) -> Select[Any]:
    """Which of these runs have finished: (run_id, status) — one query for all of them."""
    return select(runs.c.run_id, runs.c.status).where(
        runs.c.run_id.in_(run_ids), runs.c.status != "started"
    )


def step_statuses(run_ids: Sequence[uuid.UUID]) -> Select[Any]:
    """(run_id, step_slug, status) of every step of these runs — one query for all."""
    return select(step_states.c.run_id, step_states.c.step_slug, step_states.c.status).where(
        step_states.c.run_id.in_(run_ids)
    )


def notifications_enabled() -> TextClause:
    """True when pgflow-sa's pg_notify publisher is installed and not turned off for
    this session's database and role."""
    # from the catalogs, which every role may read (to_regprocedure needs USAGE on
    # schema realtime, which a role that only reads runs may not have)
    return text(
        "SELECT coalesce((SELECT bool_or(obj_description(p.oid, 'pg_proc') LIKE 'pgflow-sa:%')"
        " FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'realtime' AND p.proname = 'send'), false)"
        " AND coalesce(current_setting('pgflow_sa.notify', true), '') <> 'off'"
    )


def flow_status(window_seconds: int, live_seconds: int) -> TextClause:
    """One row per flow: the messages in its queue, runs in
    progress, runs completed and failed in the last ``window_seconds``, and workers
    whose heartbeat is younger than ``live_seconds`` (not deprecated). The run counts
    are ranges of the index ``pgflow_sa_runs_finished`` (pgflow_sa.schema.indexes):
    hence ``coalesce(completed_at, failed_at)``, its expression."""
    return text(
        """
        SELECT f.flow_slug,
               m.queue_length AS queued,
               (SELECT count(*) FROM pgflow.runs r
                 WHERE r.flow_slug = f.flow_slug AND r.status = 'started') AS running,
               (SELECT count(*) FROM pgflow.runs r
                 WHERE r.flow_slug = f.flow_slug AND r.status = 'completed'
                   AND coalesce(r.completed_at, r.failed_at)
                       > now() - make_interval(secs => :window)) AS completed,
               (SELECT count(*) FROM pgflow.runs r
                 WHERE r.flow_slug = f.flow_slug AND r.status = 'failed'
                   AND coalesce(r.completed_at, r.failed_at)
                       > now() - make_interval(secs => :window)) AS failed,
               (SELECT count(*) FROM pgflow.workers w
                 WHERE w.queue_name = f.flow_slug AND w.deprecated_at IS NULL
                   AND w.last_heartbeat_at > now() - make_interval(secs => :live)) AS live_workers,
               (SELECT max(w.last_heartbeat_at) FROM pgflow.workers w
                 WHERE w.queue_name = f.flow_slug) AS last_heartbeat_at
        FROM pgflow.flows f
        CROSS JOIN LATERAL pgmq.metrics(f.flow_slug) m
        ORDER BY f.flow_slug
        """
    ).bindparams(window=window_seconds, live=live_seconds)


#: The LISTEN/NOTIFY channel the publisher uses.
CHANNEL = NOTIFY_CHANNEL
