"""SQL the worker needs beyond the pgflow functions: registration, heartbeats,
handing tasks back, finding stalled tasks, and run inputs for map tasks."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    Text,
    and_,
    bindparam,
    column,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Select, Update

from . import tables

step_tasks, steps, flows, runs, workers = (
    tables.step_tasks,
    tables.steps,
    tables.flows,
    tables.runs,
    tables.workers,
)


def register_workers(rows: Sequence[dict[str, Any]]) -> Any:
    """One pgflow.workers row per served queue: worker_id, queue_name, function_name
    (idempotent, so a retried registration is harmless)."""
    return (
        pg_insert(workers).values(list(rows)).on_conflict_do_nothing(index_elements=["worker_id"])
    )


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


def retire_worker(worker_id: uuid.UUID) -> Update:
    """Mark a worker row done (``deprecated_at``), so it no longer counts as live."""
    return (
        update(workers)
        .where(workers.c.worker_id == worker_id, workers.c.deprecated_at.is_(None))
        .values(deprecated_at=func.now())
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


def run_inputs(run_ids: Sequence[uuid.UUID]) -> Select[Any]:
    return select(runs.c.run_id, runs.c.input).where(runs.c.run_id.in_(run_ids))


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


_CLAIM_SQL = """
WITH msgs AS MATERIALIZED (
    -- hidden for the task's whole time budget at once: the read and start_tasks
    -- commit together, so a message read here is either claimed or has no
    -- queued task behind it (which also covers pgflow 0.8.1's start_tasks not
    -- extending the visibility itself)
    SELECT msg_id FROM pgmq.read(:queue, :vt, :qty)
), claimed AS MATERIALIZED (
    SELECT t.* FROM pgflow.start_tasks(:queue, ARRAY(SELECT msg_id FROM msgs), :worker_id) AS t
)
SELECT m.read_count,
       x.run_id, x.step_slug, x.input, x.msg_id, x.task_index, x.attempt, x.run_input,
       x.run_visible
FROM (SELECT count(*) AS read_count FROM msgs) AS m
LEFT JOIN (
    -- The joins below read with the statement's snapshot, taken before pgmq.read and
    -- start_tasks ran: they never drop a claimed task (LEFT JOIN), and see the
    -- attempts_count before start_tasks' increment. A task row they cannot see was
    -- created after the snapshot, so this is its first attempt; a run they cannot
    -- see (run_visible false) has its input fetched separately when needed.
    SELECT c.run_id, c.step_slug, c.input, c.msg_id, c.task_index,
           coalesce(st.attempts_count, 0) + 1 AS attempt,
           CASE WHEN c.step_slug = ANY(:map_steps) THEN r.input END AS run_input,
           r.run_id IS NOT NULL AS run_visible
    FROM claimed c
    LEFT JOIN pgflow.step_tasks st
      ON st.run_id = c.run_id AND st.step_slug = c.step_slug AND st.task_index = c.task_index
    LEFT JOIN pgflow.runs r ON r.run_id = c.run_id
) AS x ON true
"""


def claim(
    queue: str,
    visibility_timeout: int,
    qty: int,
    worker_id: uuid.UUID,
    map_steps: Sequence[str],
) -> Any:
    """Read up to ``qty`` messages hiding them for ``visibility_timeout`` seconds (the
    flow's longest step timeout plus a margin) and start their tasks, in one statement
    (one round trip, atomic without a transaction block). Rows: read_count, and per
    claimed task run_id, step_slug, input, msg_id, task_index, attempt and (for
    ``map_steps``) run_input; one row of nulls when nothing was claimed."""
    return (
        text(_CLAIM_SQL)
        .bindparams(
            bindparam("queue", queue, type_=Text()),
            bindparam("vt", visibility_timeout, type_=Integer()),
            bindparam("qty", qty, type_=Integer()),
            bindparam("worker_id", worker_id, type_=PG_UUID(as_uuid=True)),
            bindparam("map_steps", list(map_steps), type_=ARRAY(Text())),
        )
        .columns(
            column("read_count", BigInteger()),
            column("run_id", PG_UUID(as_uuid=True)),
            column("step_slug", Text()),
            column("input", JSONB()),
            column("msg_id", BigInteger()),
            column("task_index", Integer()),
            column("attempt", Integer()),
            column("run_input", JSONB()),
        )
    )


_COMPLETE_MANY_SQL = """
SELECT count(*) AS completed
FROM unnest(:run_ids, :step_slugs, :task_indexes) WITH ORDINALITY
     AS t(run_id, step_slug, task_index, n),
LATERAL pgflow.complete_task(t.run_id, t.step_slug, t.task_index, (:outputs) -> (t.n::int - 1))
"""


def complete_many(keys: Sequence[tuple[uuid.UUID, str, int]], outputs: Sequence[Any]) -> Any:
    """``pgflow.complete_task`` for several tasks in one statement. Outputs travel as one
    JSON array, so falsy values (0, false, "", null) stay themselves."""
    return text(_COMPLETE_MANY_SQL).bindparams(
        bindparam("run_ids", [k[0] for k in keys], type_=ARRAY(PG_UUID(as_uuid=True))),
        bindparam("step_slugs", [k[1] for k in keys], type_=ARRAY(Text())),
        bindparam("task_indexes", [k[2] for k in keys], type_=ARRAY(Integer())),
        bindparam("outputs", list(outputs), type_=JSONB(none_as_null=False)),
    )


def read_run_messages(queue: str, run_id: uuid.UUID, qty: int = 1000) -> Any:
    """Visible messages of one run only (pgmq's conditional read), hidden for an hour."""
    return text("SELECT msg_id FROM pgmq.read(:queue, 3600, :qty, :filter)").bindparams(
        bindparam("queue", queue, type_=Text()),
        bindparam("qty", qty, type_=Integer()),
        bindparam("filter", {"run_id": str(run_id)}, type_=JSONB()),
    )


def reveal_run_messages(queue: str, run_id: uuid.UUID) -> Any:
    """Make one run's waiting messages (retry or start delays) visible now."""
    from ..dsl import is_safe_slug

    if not is_safe_slug(queue):
        raise ValueError(f"not a pgflow queue name: {queue!r}")
    return text(
        f"SELECT pgmq.set_vt(:queue, msg_id, 0) FROM pgmq.q_{queue.lower()} "
        "WHERE message @> :filter"
    ).bindparams(
        bindparam("queue", queue, type_=Text()),
        bindparam("filter", {"run_id": str(run_id)}, type_=JSONB()),
    )
