"""SQL the worker needs beyond the pgflow functions: registration, heartbeats,
handing tasks back, finding stalled tasks, and run inputs for map tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    TIMESTAMP,
    BigInteger,
    Float,
    Integer,
    Text,
    bindparam,
    column,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Select, Update
from sqlalchemy.sql.expression import ColumnClause

from . import tables

step_tasks, steps, flows, runs, workers = (
    tables.step_tasks,
    tables.steps,
    tables.flows,
    tables.runs,
    tables.workers,
)


def register_workers(rows: Sequence[dict[str, Any]]) -> Any:
    """One pgflow.workers row per served queue: worker_id, queue_name, function_name.
    Idempotent; a worker id that stopped before (``deprecated_at``) serves again."""
    statement = pg_insert(workers).values(list(rows))
    return statement.on_conflict_do_update(
        index_elements=["worker_id"],
        set_={"deprecated_at": None, "last_heartbeat_at": func.now()},
    )


def heartbeat(rows: Sequence[dict[str, Any]]) -> Any:
    """Touch the heartbeat of each served queue's row, re-creating a row that was
    deleted (a flow dropped and deployed again deletes its queue's worker rows);
    returns (worker_id, queue_name, deprecated)."""
    statement = pg_insert(workers).values(list(rows))
    return statement.on_conflict_do_update(
        index_elements=["worker_id"], set_={"last_heartbeat_at": func.now()}
    ).returning(
        workers.c.worker_id,
        workers.c.queue_name,
        (workers.c.deprecated_at.is_not(None)).label("deprecated"),
    )


def retire_worker(worker_id: uuid.UUID) -> Update:
    """Mark a worker row done (``deprecated_at``), so it no longer counts as live."""
    return (
        update(workers)
        .where(workers.c.worker_id == worker_id, workers.c.deprecated_at.is_(None))
        .values(deprecated_at=func.now())
    )


Fence = tuple[uuid.UUID, str, int, uuid.UUID, datetime]
"""(run_id, step_slug, task_index, worker_id, started_at): who holds a task, since when.
``pgflow.start_tasks`` stamps ``started_at`` with its transaction's start, so it names
one attempt exactly (a retry, a recovery or a hand-back changes or clears it)."""


def _fence_params(fences: Sequence[Fence]) -> list[Any]:
    ordered = sorted(fences, key=lambda f: (str(f[0]), f[1], f[2]))
    return [
        bindparam("run_ids", [f[0] for f in ordered], type_=ARRAY(PG_UUID(as_uuid=True))),
        bindparam("step_slugs", [f[1] for f in ordered], type_=ARRAY(Text())),
        bindparam("task_indexes", [f[2] for f in ordered], type_=ARRAY(Integer())),
        bindparam("worker_ids", [f[3] for f in ordered], type_=ARRAY(PG_UUID(as_uuid=True))),
        bindparam("started_ats", [f[4] for f in ordered], type_=ARRAY(TIMESTAMP(timezone=True))),
    ]


# Locks the rows of the tasks still held as fenced (started, by that worker, at that
# started_at), in key order so that two settling statements never deadlock; a row changed
# meanwhile is re-checked against the fence after its lock is granted (READ COMMITTED).
_OWNED = """
owned AS MATERIALIZED (
    SELECT t.run_id, t.step_slug, t.task_index, t.n
    FROM unnest(:run_ids, :step_slugs, :task_indexes, :worker_ids, :started_ats)
         WITH ORDINALITY AS t(run_id, step_slug, task_index, worker_id, started_at, n)
    JOIN pgflow.step_tasks st
      ON st.run_id = t.run_id AND st.step_slug = t.step_slug AND st.task_index = t.task_index
    WHERE st.status = 'started' AND st.last_worker_id = t.worker_id
      AND st.started_at = t.started_at
    ORDER BY t.run_id, t.step_slug, t.task_index
    FOR UPDATE OF st
)"""

_SETTLED: list[ColumnClause[Any]] = [
    column("run_id", PG_UUID(as_uuid=True)),
    column("step_slug", Text()),
    column("task_index", Integer()),
]


def _call_fenced(
    fences: Sequence[Fence],
    call: str,
    bind: Callable[[list[Any]], Any],
    values: Sequence[Any],
) -> Any:
    """``call`` (SQL naming ``o.*`` and ``:values``: ``bind`` makes that parameter from
    the values in fence order, the task's at ``o.n``) for each task still held as its
    fence says, in one statement; returns the keys it was called for (a missing key:
    the task was lost)."""
    order = sorted(
        range(len(fences)), key=lambda i: (str(fences[i][0]), fences[i][1], fences[i][2])
    )
    sql = f"""
WITH {_OWNED}
SELECT o.run_id, o.step_slug, o.task_index
FROM owned o
CROSS JOIN LATERAL (SELECT count(*) FROM {call}) AS settled
ORDER BY o.run_id, o.step_slug, o.task_index
"""
    return (
        text(sql)
        .bindparams(*_fence_params(fences), bind([values[i] for i in order]))
        .columns(*_SETTLED)
    )


# pgflow 0.8.1's complete_task leaves a task of a failed run as it is (started), so it
# would stay held until taken for stalled; fail_task ends such a task (failed, message
# archived, no retry) with a reason naming the step that failed the run.
_COMPLETE_OR_END = """(SELECT CASE WHEN r.status = 'failed' THEN (
    SELECT count(*) FROM pgflow.fail_task(o.run_id, o.step_slug, o.task_index, format(
        'Discarded: the run failed before this task finished (step %s: %s)',
        (SELECT ss.step_slug FROM pgflow.step_states ss
          WHERE ss.run_id = o.run_id AND ss.status = 'failed' ORDER BY ss.failed_at LIMIT 1),
        (SELECT ss.error_message FROM pgflow.step_states ss
          WHERE ss.run_id = o.run_id AND ss.status = 'failed' ORDER BY ss.failed_at LIMIT 1))))
  ELSE (SELECT count(*) FROM pgflow.complete_task(
    o.run_id, o.step_slug, o.task_index, (:values) -> (o.n::int - 1)))
  END FROM pgflow.runs r WHERE r.run_id = o.run_id) AS outcome"""


def complete_fenced(fences: Sequence[Fence], outputs: Sequence[Any]) -> Any:
    """``pgflow.complete_task`` for each task still held as its fence says; returns the
    keys it settled. Outputs travel as one JSON array, so falsy values stay
    themselves. A task whose run failed meanwhile is failed instead, saying so (its
    output is not kept, as pgflow keeps nothing of a failed run)."""
    return _call_fenced(
        fences,
        _COMPLETE_OR_END,
        lambda ordered: bindparam("values", ordered, type_=JSONB(none_as_null=False)),
        outputs,
    )


def fail_fenced(fences: Sequence[Fence], messages: Sequence[str]) -> Any:
    """``pgflow.fail_task`` (retry or give up, as pgflow decides) for each task still
    held as its fence says; returns the keys it failed."""
    return _call_fenced(
        fences,
        "pgflow.fail_task(o.run_id, o.step_slug, o.task_index, (:values)[o.n::int])",
        lambda ordered: bindparam("values", ordered, type_=ARRAY(Text())),
        messages,
    )


def hand_back_fenced(fences: Sequence[Fence], delay_seconds: int = 0) -> Any:
    """Put tasks still held as their fences say back to ``queued`` without counting the
    attempt, and make their messages visible after ``delay_seconds``; returns the keys
    handed back."""
    sql = f"""
WITH {_OWNED},
back AS (
    UPDATE pgflow.step_tasks st
    SET status = 'queued', started_at = NULL, last_worker_id = NULL,
        attempts_count = greatest(st.attempts_count - 1, 0)
    FROM owned o
    WHERE st.run_id = o.run_id AND st.step_slug = o.step_slug AND st.task_index = o.task_index
    RETURNING st.run_id, st.step_slug, st.task_index, st.flow_slug, st.message_id
)
SELECT b.run_id, b.step_slug, b.task_index
FROM back b
CROSS JOIN LATERAL (
    SELECT count(*) FROM pgmq.set_vt(b.flow_slug, b.message_id, :delay)
    WHERE b.message_id IS NOT NULL
) AS v
"""
    return (
        text(sql)
        .bindparams(*_fence_params(fences), bindparam("delay", delay_seconds, type_=Integer()))
        .columns(*_SETTLED)
    )


def settled_by(fences: Sequence[Fence]) -> Any:
    """Of these tasks, those completed or failed by the attempt their fence names (a
    final settle keeps last_worker_id and started_at)."""
    sql = """
SELECT st.run_id, st.step_slug, st.task_index
FROM unnest(:run_ids, :step_slugs, :task_indexes, :worker_ids, :started_ats)
     AS t(run_id, step_slug, task_index, worker_id, started_at)
JOIN pgflow.step_tasks st
  ON st.run_id = t.run_id AND st.step_slug = t.step_slug AND st.task_index = t.task_index
WHERE st.status IN ('completed', 'failed') AND st.last_worker_id = t.worker_id
  AND st.started_at = t.started_at
"""
    return text(sql).bindparams(*_fence_params(fences)).columns(*_SETTLED)


def abandoned_tasks(flow_slugs: Sequence[str], margin_seconds: float, limit: int) -> Any:
    """Started tasks of the given flows whose worker is gone: its ``pgflow.workers`` row
    is missing, or has not heartbeaten for ``margin_seconds``. A live worker's task is
    never listed, however long it runs. Rows are locked (SKIP LOCKED), so two
    recovering workers never take the same task. Returns fences."""
    sql = """
SELECT st.run_id, st.step_slug, st.task_index, st.last_worker_id AS worker_id,
       st.started_at
FROM pgflow.step_tasks st
LEFT JOIN pgflow.workers w ON w.worker_id = st.last_worker_id
WHERE st.flow_slug = ANY(:flow_slugs) AND st.status = 'started'
  AND (w.worker_id IS NULL
       OR w.last_heartbeat_at < now() - make_interval(secs => :margin))
ORDER BY st.run_id, st.step_slug, st.task_index
LIMIT :limit
FOR UPDATE OF st SKIP LOCKED
"""
    return (
        text(sql)
        .bindparams(
            bindparam("flow_slugs", list(flow_slugs), type_=ARRAY(Text())),
            bindparam("margin", float(margin_seconds), type_=Float()),
            bindparam("limit", limit, type_=Integer()),
        )
        .columns(
            *_SETTLED,
            column("worker_id", PG_UUID(as_uuid=True)),
            column("started_at", TIMESTAMP(timezone=True)),
        )
    )


def held_tasks(worker_ids: Sequence[uuid.UUID]) -> Any:
    """Tasks the database says these worker ids hold (status started). Returns fences."""
    return select(
        step_tasks.c.run_id,
        step_tasks.c.step_slug,
        step_tasks.c.task_index,
        step_tasks.c.last_worker_id.label("worker_id"),
        step_tasks.c.started_at,
    ).where(step_tasks.c.status == "started", step_tasks.c.last_worker_id.in_(worker_ids))


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
    -- hidden for the flow's longest step timeout (as it is now) plus a margin: the
    -- read and start_tasks commit together, so a message read here is either claimed
    -- or has no queued task behind it (which also covers pgflow 0.8.1's start_tasks
    -- not extending the visibility itself)
    SELECT msg_id FROM pgmq.read(
        :queue,
        (SELECT max(coalesce(s.opt_timeout, f.opt_timeout))::int + :vt_margin
         FROM pgflow.steps s JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
         WHERE s.flow_slug = :queue),
        :qty)
), claimed AS MATERIALIZED (
    SELECT t.* FROM pgflow.start_tasks(:queue, ARRAY(SELECT msg_id FROM msgs), :worker_id) AS t
)
SELECT m.read_count,
       x.run_id, x.step_slug, x.input, x.msg_id, x.task_index, x.attempt, x.timeout,
       now() AS started_at -- what start_tasks stamped: the transaction's start
FROM (SELECT count(*) AS read_count FROM msgs) AS m
LEFT JOIN (
    -- The reads below use the statement's snapshot, taken before pgmq.read and
    -- start_tasks ran: they never drop a claimed task (LEFT JOIN), and see the
    -- attempts_count before start_tasks' increment. A task row they cannot see was
    -- created after the snapshot, so this is its first attempt. attempts_count is a
    -- subquery per claimed task, so it is always a primary-key lookup: as a join the
    -- planner, expecting 1,000 rows from the function scan, hashes the whole
    -- step_tasks table, and every claim costs O(backlog).
    SELECT c.run_id, c.step_slug, c.input, c.msg_id, c.task_index,
           coalesce((SELECT st.attempts_count FROM pgflow.step_tasks st
                     WHERE st.run_id = c.run_id AND st.step_slug = c.step_slug
                       AND st.task_index = c.task_index), 0) + 1 AS attempt,
           coalesce(s.opt_timeout, f.opt_timeout) AS timeout
    FROM claimed c
    LEFT JOIN pgflow.steps s ON s.flow_slug = :queue AND s.step_slug = c.step_slug
    LEFT JOIN pgflow.flows f ON f.flow_slug = :queue
) AS x ON true
"""


def claim(queue: str, vt_margin: int, qty: int, worker_id: uuid.UUID) -> Any:
    """Read up to ``qty`` messages and start their tasks in one statement (one round
    trip, atomic without a transaction block). The messages stay hidden for the
    flow's longest step timeout plus ``vt_margin`` seconds. Rows: read_count, and per
    claimed task run_id, step_slug, input, msg_id, task_index, attempt (for display:
    read before start_tasks counted it), the step's timeout as it is now and the
    started_at that start_tasks stamped (the fence); one row of nulls when nothing was claimed."""
    return (
        text(_CLAIM_SQL)
        .bindparams(
            bindparam("queue", queue, type_=Text()),
            bindparam("vt_margin", vt_margin, type_=Integer()),
            bindparam("qty", qty, type_=Integer()),
            bindparam("worker_id", worker_id, type_=PG_UUID(as_uuid=True)),
        )
        .columns(
            column("read_count", BigInteger()),
            column("run_id", PG_UUID(as_uuid=True)),
            column("step_slug", Text()),
            column("input", JSONB()),
            column("msg_id", BigInteger()),
            column("task_index", Integer()),
            column("attempt", Integer()),
            column("timeout", Integer()),
            column("started_at", TIMESTAMP(timezone=True)),
        )
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
