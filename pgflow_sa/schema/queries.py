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


_cancellations, _retries = tables.run_cancellations, tables.run_retries


def _runs_with_control() -> Select[Any]:
    """Runs' columns plus ``error`` (the failed step's message), and from pgflow-sa's
    run control ``cancelled_at`` and ``cancel_reason`` (cancelled runs) and
    ``retry_of`` (runs started by retry_run): primary-key lookups."""
    return select(
        runs,
        _run_error,
        _cancellations.c.cancelled_at,
        _cancellations.c.reason.label("cancel_reason"),
        _retries.c.retry_of,
    ).select_from(
        runs.outerjoin(_cancellations, _cancellations.c.run_id == runs.c.run_id).outerjoin(
            _retries, _retries.c.run_id == runs.c.run_id
        )
    )


def run_by_id(run_id: uuid.UUID) -> Select[Any]:
    """The run's columns plus error, cancellation and retry (see _runs_with_control)."""
    return _runs_with_control().where(runs.c.run_id == run_id)


def runs_page(
    *,
    flow_slug: str | None,
    status: str | None,
    started_after: datetime | None,
    started_before: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
    retry_of: uuid.UUID | None = None,
) -> Select[Any]:
    """Runs, newest first, keyset-paginated on (started_at, run_id). ``status``
    'cancelled' is a failed run that was cancelled; 'failed' one that was not."""
    query = _runs_with_control()
    if flow_slug is not None:
        query = query.where(runs.c.flow_slug == flow_slug)
    if status == "cancelled":
        query = query.where(runs.c.status == "failed", _cancellations.c.run_id.is_not(None))
    elif status == "failed":
        query = query.where(runs.c.status == "failed", _cancellations.c.run_id.is_(None))
    elif status is not None:
        query = query.where(runs.c.status == status)
    if retry_of is not None:
        query = query.where(_retries.c.retry_of == retry_of)
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
    """One row per flow: the messages in its queue, runs in progress, runs completed,
    failed and cancelled in the last ``window_seconds`` and retries started then, the
    queued tasks of steps at a concurrency limit (or of a flow at its own), and workers
    whose heartbeat is younger than ``live_seconds`` (not deprecated). The completed
    and failed counts are ranges of the index ``pgflow_sa_runs_finished``
    (pgflow_sa.schema.indexes): hence ``coalesce(completed_at, failed_at)``, its
    expression."""
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
                       > now() - make_interval(secs => :window)
                   AND NOT EXISTS (SELECT 1 FROM pgflow_sa.run_cancellations c
                                    WHERE c.run_id = r.run_id)) AS failed,
               (SELECT count(*) FROM pgflow_sa.run_cancellations c
                  JOIN pgflow.runs r ON r.run_id = c.run_id
                 WHERE r.flow_slug = f.flow_slug
                   AND c.cancelled_at > now() - make_interval(secs => :window)) AS cancelled,
               (SELECT count(*) FROM pgflow_sa.run_retries rr
                  JOIN pgflow.runs r ON r.run_id = rr.run_id
                 WHERE r.flow_slug = f.flow_slug
                   AND rr.created_at > now() - make_interval(secs => :window)) AS retried,
               coalesce((
                 SELECT count(*) FROM pgflow.step_tasks q
                 WHERE q.flow_slug = f.flow_slug AND q.status = 'queued'
                   AND (
                     (l.max_concurrency IS NOT NULL AND l.max_concurrency <= (
                        SELECT count(*) FROM pgflow.step_tasks s
                        WHERE s.status = 'started' AND s.flow_slug = f.flow_slug))
                     OR (l.step_limits ->> q.step_slug)::int <= (
                        SELECT count(*) FROM pgflow.step_tasks s
                        WHERE s.status = 'started' AND s.flow_slug = f.flow_slug
                          AND s.step_slug = q.step_slug)
                     OR (l.max_running_runs IS NOT NULL
                         AND NOT EXISTS (SELECT 1 FROM pgflow_sa.admitted_runs a
                                          WHERE a.run_id = q.run_id)
                         AND l.max_running_runs <= (
                           SELECT count(*) FROM pgflow_sa.admitted_runs a
                             JOIN pgflow.runs ar ON ar.run_id = a.run_id
                           WHERE a.flow_slug = f.flow_slug AND ar.status = 'started')))
               ), 0) AS waiting_on_limit,
               (SELECT count(*) FROM pgflow.workers w
                 WHERE w.queue_name = f.flow_slug AND w.deprecated_at IS NULL
                   AND w.last_heartbeat_at > now() - make_interval(secs => :live)) AS live_workers,
               (SELECT max(w.last_heartbeat_at) FROM pgflow.workers w
                 WHERE w.queue_name = f.flow_slug) AS last_heartbeat_at
        FROM pgflow.flows f
        CROSS JOIN LATERAL pgmq.metrics(f.flow_slug) m
        -- a flow without limits counts no waiting task (and reads no task)
        LEFT JOIN pgflow_sa.flow_limits l ON l.flow_slug = f.flow_slug
        ORDER BY f.flow_slug
        """
    ).bindparams(window=window_seconds, live=live_seconds)


#: The LISTEN/NOTIFY channel the publisher uses.
CHANNEL = NOTIFY_CHANNEL
