"""SQL the worker needs beyond the pgflow functions: registration, heartbeats,
handing tasks back, finding stalled tasks, and run inputs for map tasks."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    TIMESTAMP,
    BigInteger,
    Boolean,
    Float,
    Integer,
    Text,
    bindparam,
    column,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Select, Update
from sqlalchemy.sql.base import Executable
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


Query = tuple[Executable, dict[str, Any]]
"""A constant statement and the values of its parameters: ``conn.execute(*query)``.
The statements are built once, so SQLAlchemy finds each compiled in its cache without
rebuilding its cache key (which cost about a millisecond per call, types included)."""

_FENCE_BINDS = (
    bindparam("run_ids", type_=ARRAY(PG_UUID(as_uuid=True))),
    bindparam("step_slugs", type_=ARRAY(Text())),
    bindparam("task_indexes", type_=ARRAY(Integer())),
    bindparam("worker_ids", type_=ARRAY(PG_UUID(as_uuid=True))),
    bindparam("started_ats", type_=ARRAY(TIMESTAMP(timezone=True))),
)


def _fence_params(fences: Sequence[Fence]) -> dict[str, Any]:
    ordered = sorted(fences, key=lambda f: (str(f[0]), f[1], f[2]))
    return {
        "run_ids": [f[0] for f in ordered],
        "step_slugs": [f[1] for f in ordered],
        "task_indexes": [f[2] for f in ordered],
        "worker_ids": [f[3] for f in ordered],
        "started_ats": [f[4] for f in ordered],
    }


# Locks the rows of the tasks still held as fenced (started, by that worker, at that
# started_at), in key order so that two settling statements never deadlock; a row changed
# meanwhile is re-checked against the fence after its lock is granted (READ COMMITTED).
#
# The runs' rows are locked first, in run order: pgflow's complete_task locks a run, then
# its step states, but 0.8.1's fail_task the step state first (its run-locking CTE is
# never referenced, so it never runs), which deadlocked against a complete_task of the
# same run in another session. Holding the run first, every settle takes the locks in
# complete_task's order. (A MATERIALIZED CTE runs only when referenced: owned joins it.)
_OWNED = """
run_locks AS MATERIALIZED (
    SELECT r.run_id, r.status FROM pgflow.runs r
    WHERE r.run_id = ANY(:run_ids)
    ORDER BY r.run_id
    FOR UPDATE OF r
), owned AS MATERIALIZED (
    SELECT t.run_id, t.step_slug, t.task_index, t.n
    FROM unnest(:run_ids, :step_slugs, :task_indexes, :worker_ids, :started_ats)
         WITH ORDINALITY AS t(run_id, step_slug, task_index, worker_id, started_at, n)
    JOIN (SELECT run_id FROM run_locks) AS locked ON locked.run_id = t.run_id
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


def _fenced_call(call: str, values: Any) -> Executable:
    """A statement calling ``call`` (SQL naming ``o.*`` and ``:values``, the task's value
    at ``o.n``) for each task still held as its fence says; it returns the keys it was
    called for (a missing key: the task was lost)."""
    sql = f"""
WITH {_OWNED}
SELECT o.run_id, o.step_slug, o.task_index
FROM owned o
CROSS JOIN LATERAL (SELECT count(*) FROM {call}) AS settled
ORDER BY o.run_id, o.step_slug, o.task_index
"""
    return text(sql).bindparams(*_FENCE_BINDS, values).columns(*_SETTLED)


# pgflow 0.8.1's complete_task leaves a task of a failed run as it is (started), so it
# would stay held until taken for stalled; fail_task ends such a task (failed, message
# archived, no retry) with a reason naming the step that failed the run. The run's
# status is the one run_locks read when its lock was granted: the statement's snapshot
# was taken before it waited, and would not show a failure committed meanwhile.
_COMPLETE_OR_END = """(SELECT CASE WHEN r.status = 'failed' THEN (
    SELECT count(*) FROM pgflow.fail_task(o.run_id, o.step_slug, o.task_index, format(
        'Discarded: the run failed before this task finished (step %s: %s)',
        (SELECT ss.step_slug FROM pgflow.step_states ss
          WHERE ss.run_id = o.run_id AND ss.status = 'failed' ORDER BY ss.failed_at LIMIT 1),
        (SELECT ss.error_message FROM pgflow.step_states ss
          WHERE ss.run_id = o.run_id AND ss.status = 'failed' ORDER BY ss.failed_at LIMIT 1))))
  ELSE (SELECT count(*) FROM pgflow.complete_task(
    o.run_id, o.step_slug, o.task_index, (:values) -> (o.n::int - 1)))
  END FROM run_locks r WHERE r.run_id = o.run_id) AS outcome"""
# outputs travel as one JSON array, so falsy values stay themselves
_COMPLETE_FENCED = _fenced_call(
    _COMPLETE_OR_END, bindparam("values", type_=JSONB(none_as_null=False))
)
_FAIL_FENCED = _fenced_call(
    "pgflow.fail_task(o.run_id, o.step_slug, o.task_index, (:values)[o.n::int])",
    bindparam("values", type_=ARRAY(Text())),
)


def _in_fence_order(fences: Sequence[Fence], values: Sequence[Any]) -> list[Any]:
    order = sorted(
        range(len(fences)), key=lambda i: (str(fences[i][0]), fences[i][1], fences[i][2])
    )
    return [values[i] for i in order]


def complete_fenced(fences: Sequence[Fence], outputs: Sequence[Any]) -> Query:
    """``pgflow.complete_task`` for each task still held as its fence says; returns the
    keys it settled. A task whose run failed meanwhile is failed instead, saying so
    (its output is not kept, as pgflow keeps nothing of a failed run)."""
    return _COMPLETE_FENCED, {
        **_fence_params(fences),
        "values": _in_fence_order(fences, outputs),
    }


def fail_fenced(fences: Sequence[Fence], messages: Sequence[str]) -> Query:
    """``pgflow.fail_task`` (retry or give up, as pgflow decides) for each task still
    held as its fence says; returns the keys it failed."""
    return _FAIL_FENCED, {**_fence_params(fences), "values": _in_fence_order(fences, messages)}


_HAND_BACK_FENCED = (
    text(
        f"""
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
    )
    .bindparams(*_FENCE_BINDS, bindparam("delay", type_=Integer()))
    .columns(*_SETTLED)
)


def hand_back_fenced(fences: Sequence[Fence], delay_seconds: int = 0) -> Query:
    """Put tasks still held as their fences say back to ``queued`` without counting the
    attempt, and make their messages visible after ``delay_seconds``; returns the keys
    handed back."""
    return _HAND_BACK_FENCED, {**_fence_params(fences), "delay": delay_seconds}


_SETTLED_BY = (
    text(
        """
SELECT st.run_id, st.step_slug, st.task_index
FROM unnest(:run_ids, :step_slugs, :task_indexes, :worker_ids, :started_ats)
     AS t(run_id, step_slug, task_index, worker_id, started_at)
JOIN pgflow.step_tasks st
  ON st.run_id = t.run_id AND st.step_slug = t.step_slug AND st.task_index = t.task_index
WHERE st.status IN ('completed', 'failed') AND st.last_worker_id = t.worker_id
  AND st.started_at = t.started_at
"""
    )
    .bindparams(*_FENCE_BINDS)
    .columns(*_SETTLED)
)


def settled_by(fences: Sequence[Fence]) -> Query:
    """Of these tasks, those completed or failed by the attempt their fence names (a
    final settle keeps last_worker_id and started_at)."""
    return _SETTLED_BY, _fence_params(fences)


_ABANDONED_TASKS = (
    text(
        """
SELECT st.run_id, st.step_slug, st.task_index, st.last_worker_id AS worker_id,
       st.started_at
FROM pgflow.step_tasks st
LEFT JOIN pgflow.workers w ON w.worker_id = st.last_worker_id
WHERE st.flow_slug = ANY(:flow_slugs) AND st.status = 'started'
  AND (w.worker_id IS NULL
       OR w.last_heartbeat_at < now() - make_interval(secs => :margin))
ORDER BY st.run_id, st.step_slug, st.task_index
LIMIT :limit
"""
    )
    .bindparams(
        bindparam("flow_slugs", type_=ARRAY(Text())),
        bindparam("margin", type_=Float()),
        bindparam("limit", type_=Integer()),
    )
    .columns(
        *_SETTLED,
        column("worker_id", PG_UUID(as_uuid=True)),
        column("started_at", TIMESTAMP(timezone=True)),
    )
)


def abandoned_tasks(flow_slugs: Sequence[str], margin_seconds: float, limit: int) -> Query:
    """Started tasks of the given flows whose worker is gone: its ``pgflow.workers`` row
    is missing, or has not heartbeaten for ``margin_seconds``. A live worker's task is
    never listed, however long it runs. Rows are not locked here: the fenced fail
    that follows locks the runs first, then the tasks, as every settle does (locking
    the tasks here first deadlocked with completions), and of two recovering workers
    the fence lets one fail a task. Returns fences."""
    return _ABANDONED_TASKS, {
        "flow_slugs": list(flow_slugs),
        "margin": float(margin_seconds),
        "limit": limit,
    }


def held_tasks(worker_ids: Sequence[uuid.UUID]) -> Any:
    """Tasks the database says these worker ids hold (status started). Returns fences."""
    return select(
        step_tasks.c.run_id,
        step_tasks.c.step_slug,
        step_tasks.c.task_index,
        step_tasks.c.last_worker_id.label("worker_id"),
        step_tasks.c.started_at,
    ).where(step_tasks.c.status == "started", step_tasks.c.last_worker_id.in_(worker_ids))


def set_flow_limits(flow_slug: str, limits: Any) -> Any:
    """Store a flow's limits (a ``dsl.FlowLimits``), or remove them (None); returns the
    limits stored before as (max_concurrency, max_running_runs, step_limits), no row
    when there were none."""
    table = tables.flow_limits
    before = (
        select(table.c.max_concurrency, table.c.max_running_runs, table.c.step_limits)
        .where(table.c.flow_slug == flow_slug)
        .with_for_update()
        .cte("before")
    )
    if limits is None:
        change: Any = (
            delete(table)
            .where(table.c.flow_slug == flow_slug)
            .returning(table.c.flow_slug)
            .cte("change")
        )
    else:
        values = {
            "flow_slug": flow_slug,
            "max_concurrency": limits.max_concurrency,
            "max_running_runs": limits.max_running_runs,
            "step_limits": dict(limits.step_limits),
        }
        change = (
            pg_insert(table)
            .values(**values)
            .on_conflict_do_update(
                index_elements=["flow_slug"],
                set_={
                    **{k: v for k, v in values.items() if k != "flow_slug"},
                    "updated_at": func.now(),
                },
            )
            .returning(table.c.flow_slug)
            .cte("change")
        )
    return select(before, select(func.count()).select_from(change).scalar_subquery().label("n"))


def ended_runs(run_ids: Sequence[uuid.UUID]) -> Select[Any]:
    """Of these runs, those that are no longer in progress (cancelled, failed)."""
    return select(runs.c.run_id).where(runs.c.run_id.in_(run_ids), runs.c.status != "started")


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


# hidden for the flow's longest step timeout (as it is now) plus a margin: the read
# and start_tasks commit together, so a message read here is either claimed or has no
# queued task behind it (which also covers pgflow 0.8.1's start_tasks not extending
# the visibility itself)
_HIDE_FOR = """(SELECT max(coalesce(s.opt_timeout, f.opt_timeout))::int + :vt_margin
         FROM pgflow.steps s JOIN pgflow.flows f ON f.flow_slug = s.flow_slug
         WHERE s.flow_slug = :queue)"""

# A flow with a row in pgflow_sa.flow_limits is claimed by _LIMITED_CLAIM_SQL only: this
# statement reads nothing for it (one primary-key lookup on a small table) and says so.
_CLAIM_SQL = """
WITH limits AS MATERIALIZED (
    SELECT EXISTS (SELECT 1 FROM pgflow_sa.flow_limits l WHERE l.flow_slug = :queue) AS limited
), msgs AS MATERIALIZED (
    SELECT msg_id FROM pgmq.read(
        :queue, {hide_for}, CASE WHEN (SELECT limited FROM limits) THEN 0 ELSE :qty END)
), held AS (SELECT false AS held_back)
{tail}"""

# The claim of a flow with limits, run in a transaction after
# pg_advisory_xact_lock(limits_lock_key(queue)): claims of the flow take turns, and this
# statement's snapshot, taken after the lock was granted, sees every task the previous
# claim started. It counts the started tasks of the flow (pgflow's index of started
# tasks: there are few), picks visible messages in queue order that fit the room left
# (steps at their limit are skipped where the queue is read; runs over the run limit
# wait before their first task, in the order they were queued), hides them (pgmq's
# set_vt) and starts their tasks as the plain claim does.
_LIMITED_CLAIM_SQL = """
WITH lim AS MATERIALIZED (
    SELECT l.max_concurrency, l.max_running_runs, l.step_limits
    FROM pgflow_sa.flow_limits l WHERE l.flow_slug = :queue
), limits AS MATERIALIZED (
    SELECT EXISTS (SELECT 1 FROM lim) AS limited
), started AS MATERIALIZED (
    SELECT st.step_slug, st.run_id FROM pgflow.step_tasks st
    WHERE st.status = 'started' AND st.flow_slug = :queue
), step_room AS MATERIALIZED (
    SELECT e.key AS step_slug,
           greatest(e.value::int - (SELECT count(*) FROM started WHERE started.step_slug = e.key),
                    0) AS room
    FROM lim CROSS JOIN LATERAL jsonb_each_text(lim.step_limits) AS e
), flow_room AS MATERIALIZED (
    SELECT coalesce((SELECT greatest(lim.max_concurrency - (SELECT count(*) FROM started), 0)
                     FROM lim WHERE lim.max_concurrency IS NOT NULL), :qty) AS room
), active AS MATERIALIZED (
    -- runs admitted, and runs with a task started (one that began before the run
    -- limit was set, or was claimed by a worker that ignores limits)
    SELECT a.run_id FROM pgflow_sa.admitted_runs a
    JOIN pgflow.runs r ON r.run_id = a.run_id
    WHERE a.flow_slug = :queue AND r.status = 'started'
    UNION
    SELECT DISTINCT s.run_id FROM started s
), run_room AS MATERIALIZED (
    -- null: no run limit
    SELECT (SELECT greatest(lim.max_running_runs - (SELECT count(*) FROM active), 0)
            FROM lim WHERE lim.max_running_runs IS NOT NULL) AS room
), forget AS (
    -- admissions of runs that ended (or are gone) are no longer needed
    DELETE FROM pgflow_sa.admitted_runs a
    WHERE a.flow_slug = :queue
      AND NOT EXISTS (SELECT 1 FROM pgflow.runs r WHERE r.run_id = a.run_id AND r.status = 'started')
    RETURNING a.run_id
), candidates AS MATERIALIZED (
    SELECT q.msg_id, q.message ->> 'step_slug' AS step_slug,
           (q.message ->> 'run_id')::uuid AS run_id
    FROM pgmq.{queue_table} q
    WHERE q.vt <= clock_timestamp()
      AND (SELECT room FROM flow_room) > 0
      AND NOT ((q.message ->> 'step_slug') IN (SELECT step_slug FROM step_room WHERE room = 0))
      AND ((SELECT room FROM run_room) IS NULL OR (SELECT room FROM run_room) > 0
           OR (q.message ->> 'run_id')::uuid IN (SELECT run_id FROM active))
    ORDER BY q.msg_id
    LIMIT :scan
    FOR UPDATE SKIP LOCKED
), by_run AS (
    SELECT c.*, c.run_id IN (SELECT run_id FROM active) AS admitted,
           min(c.msg_id) OVER (PARTITION BY c.run_id) AS run_first
    FROM candidates c
), fits_runs AS (
    SELECT b.* FROM (
        SELECT b.*, dense_rank() OVER (PARTITION BY b.admitted ORDER BY b.run_first) AS run_rank
        FROM by_run b
    ) AS b
    WHERE (SELECT room FROM run_room) IS NULL OR b.admitted
       OR b.run_rank <= (SELECT room FROM run_room)
), fits_steps AS (
    SELECT f.* FROM (
        SELECT f.*, row_number() OVER (PARTITION BY f.step_slug ORDER BY f.msg_id) AS step_rank
        FROM fits_runs f
    ) AS f
    LEFT JOIN step_room sr ON sr.step_slug = f.step_slug
    WHERE sr.room IS NULL OR f.step_rank <= sr.room
), chosen AS MATERIALIZED (
    SELECT f.msg_id, f.run_id, f.admitted FROM fits_steps f
    ORDER BY f.msg_id
    LIMIT least(:qty, (SELECT room FROM flow_room))
), msgs AS MATERIALIZED (
    SELECT c.msg_id FROM chosen c
    CROSS JOIN LATERAL pgmq.set_vt(:queue, c.msg_id, {hide_for}) AS v
), admit AS (
    INSERT INTO pgflow_sa.admitted_runs (run_id, flow_slug)
    SELECT run_id, :queue FROM (
        SELECT c.run_id FROM chosen c WHERE NOT c.admitted
        UNION SELECT s.run_id FROM started s
    ) AS runs_in_progress
    WHERE (SELECT room FROM run_room) IS NOT NULL
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
), held AS (
    -- a visible message left behind: a limit holds it back (the caller polls soon)
    SELECT EXISTS (
        SELECT 1 FROM pgmq.{queue_table} q
        WHERE q.vt <= clock_timestamp() AND q.msg_id <> ALL (ARRAY(SELECT msg_id FROM chosen))
    ) AS held_back,
    (SELECT count(*) FROM forget) + (SELECT count(*) FROM admit) AS bookkeeping
)
{tail}"""

_CLAIM_TAIL = """, claimed AS MATERIALIZED (
    SELECT t.* FROM pgflow.start_tasks(:queue, ARRAY(SELECT msg_id FROM msgs), :worker_id) AS t
)
SELECT m.read_count,
       x.run_id, x.step_slug, x.input, x.msg_id, x.task_index, x.attempt, x.timeout,
       x.reused, x.reused_output,
       now() AS started_at, -- what start_tasks stamped: the transaction's start
       -- when the next message hidden now (a retry's or a start delay's, or one held by
       -- a worker that may die) becomes visible: an idle worker sleeps until then
       (SELECT q.vt FROM pgmq.{queue_table} q
        WHERE q.msg_id <> ALL (ARRAY(SELECT msg_id FROM msgs))
        ORDER BY q.vt LIMIT 1) AS next_visible_at,
       (SELECT limited FROM limits) AS limited,
       (SELECT held_back FROM held) AS held_back{settled_columns}
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
           coalesce(s.opt_timeout, f.opt_timeout) AS timeout,
           reuse.reused IS NOT NULL AS reused, reuse.output AS reused_output
    FROM claimed c
    LEFT JOIN pgflow.steps s ON s.flow_slug = :queue AND s.step_slug = c.step_slug
    LEFT JOIN pgflow.flows f ON f.flow_slug = :queue
    -- a retry that reuses outputs: the output of the same task in the run it retries
    -- (or before, see pgflow_sa.reused_output); nothing when there is no retry
    LEFT JOIN LATERAL (
        SELECT true AS reused, ro.reused_output AS output
        FROM pgflow_sa.reused_output(c.run_id, c.step_slug, c.task_index) AS ro
    ) AS reuse ON true
) AS x ON true
"""

_CLAIM_COLUMNS = (
    column("read_count", BigInteger()),
    column("run_id", PG_UUID(as_uuid=True)),
    column("step_slug", Text()),
    column("input", JSONB()),
    column("msg_id", BigInteger()),
    column("task_index", Integer()),
    column("attempt", Integer()),
    column("timeout", Integer()),
    column("reused", Boolean()),
    column("reused_output", JSONB(none_as_null=False)),
    column("started_at", TIMESTAMP(timezone=True)),
    column("next_visible_at", TIMESTAMP(timezone=True)),
    column("limited", Boolean()),
    column("held_back", Boolean()),
)


def _claim_sql(template: str, queue: str, settled_columns: str = "") -> Executable:
    from ..dsl import is_safe_slug

    if not is_safe_slug(queue):
        raise ValueError(f"not a pgflow queue name: {queue!r}")
    sql = (
        template.replace("{tail}", _CLAIM_TAIL.replace("{settled_columns}", settled_columns))
        .replace("{hide_for}", _HIDE_FOR)
        .replace("{queue_table}", f"q_{queue.lower()}")
    )
    return text(sql).bindparams(
        bindparam("queue", type_=Text()),
        bindparam("vt_margin", type_=Integer()),
        bindparam("qty", type_=Integer()),
        bindparam("worker_id", type_=PG_UUID(as_uuid=True)),
    )


@functools.cache
def _claim_statement(queue: str) -> Executable:
    return _claim_sql(_CLAIM_SQL, queue).columns(*_CLAIM_COLUMNS)  # type: ignore[attr-defined,no-any-return]


@functools.cache
def _limited_claim_statement(queue: str) -> Executable:
    return (  # type: ignore[no-any-return]
        _claim_sql(_LIMITED_CLAIM_SQL, queue)
        .bindparams(bindparam("scan", type_=Integer()))  # type: ignore[attr-defined]
        .columns(*_CLAIM_COLUMNS)
    )


def claim(queue: str, vt_margin: int, qty: int, worker_id: uuid.UUID) -> Query:
    """Read up to ``qty`` messages and start their tasks in one statement (one round
    trip, atomic without a transaction block). The messages stay hidden for the
    flow's longest step timeout plus ``vt_margin`` seconds. Rows: read_count, and per
    claimed task run_id, step_slug, input, msg_id, task_index, attempt (for display:
    read before start_tasks counted it), the step's timeout as it is now, whether its
    output is reused from the run a retry retries (and that output), the started_at
    that start_tasks stamped (the fence), when the next message hidden now becomes
    visible (null: none), whether the flow has limits (then nothing was read: claim
    it with :func:`limited_claim`) and whether a limit held messages back; one row of
    nulls but the last four when nothing was claimed."""
    return _claim_statement(queue), {
        "queue": queue,
        "vt_margin": vt_margin,
        "qty": qty,
        "worker_id": worker_id,
    }


#: candidates a limited claim looks at beyond what it may take: messages of runs or
#: steps over a limit are passed over within this window
LIMITED_SCAN_MIN = 100


def limits_lock_key(queue: str) -> Query:
    """Take the transaction-level advisory lock that limited claims of ``queue`` hold
    (see :func:`limited_claim`)."""
    return _LIMITS_LOCK, {"key": f"pgflow_sa limits {queue}"}


_LIMITS_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))").bindparams(
    bindparam("key", type_=Text())
)


def limited_claim(queue: str, vt_margin: int, qty: int, worker_id: uuid.UUID) -> Query:
    """:func:`claim` for a flow with limits (``pgflow_sa.flow_limits``): run it in a
    transaction after :func:`limits_lock_key`'s lock, so that the limits hold across
    every worker. Same rows as :func:`claim`."""
    return _limited_claim_statement(queue), {
        "queue": queue,
        "vt_margin": vt_margin,
        "qty": qty,
        "worker_id": worker_id,
        "scan": max(LIMITED_SCAN_MIN, qty * 4),
    }


# A completion and the next claim of the same flow in one statement (one round trip,
# one commit): ``settled`` completes the fenced tasks as complete_fenced does, and the
# claim reads the queue only after it (``limits`` names ``settled`` first, ``alive``
# names ``limits``, and the read's size names both). pgmq.read and start_tasks are
# VOLATILE: they read with a snapshot of their own, taken after complete_task ran, so
# they see the steps it started and the outputs their tasks' inputs are made of (the
# statement's own snapshot does not: the claim's attempt subquery counts such a task as
# a first attempt, which it is).
#
# ``alive`` locks the worker's row FOR SHARE after the completions, so that READ
# COMMITTED re-reads it then: a worker that retired (stopped) while this statement
# waited for a lock claims nothing. That lock holds the worker's heartbeat and its
# retiring until the statement ends, so from then on the statement waits for no lock
# longer than ``lock_timeout`` (set after the completions, which may wait as long as
# they must): past it the statement fails, and the worker completes alone. A message enqueued by a transaction that began
# after this one is put back at once (visible again) rather than started: pgflow stamps
# started_at with the transaction's start, which must not precede the task's queued_at.
_COMPLETE_AND_CLAIM_SQL = f"""
WITH {_OWNED}, settled AS MATERIALIZED (
    SELECT o.run_id, o.step_slug, o.task_index
    FROM owned o
    CROSS JOIN LATERAL (SELECT count(*) FROM {_COMPLETE_OR_END}) AS s
), limits AS MATERIALIZED (
    SELECT CASE WHEN (SELECT count(*) FROM settled) >= 0 THEN
        CASE WHEN set_config('lock_timeout', :lock_timeout, true) IS NOT NULL THEN EXISTS (
            SELECT 1 FROM pgflow_sa.flow_limits l WHERE l.flow_slug = :queue) END
    END AS limited
), alive AS MATERIALIZED (
    SELECT w.worker_id FROM pgflow.workers w
    WHERE w.worker_id = :worker_id AND w.deprecated_at IS NULL
      AND (SELECT limited FROM limits) IS NOT NULL
    FOR SHARE OF w
), fetched AS MATERIALIZED (
    SELECT r.msg_id, r.enqueued_at FROM pgmq.read(
        :queue, {{hide_for}},
        CASE WHEN (SELECT limited FROM limits) OR NOT EXISTS (SELECT 1 FROM alive) THEN 0
             ELSE :qty END) AS r
), msgs AS MATERIALIZED (
    SELECT r.msg_id FROM fetched r WHERE r.enqueued_at <= now()
), put_back AS MATERIALIZED (
    SELECT count(*) AS n FROM fetched r
    CROSS JOIN LATERAL pgmq.set_vt(:queue, r.msg_id, 0) AS v
    WHERE r.enqueued_at > now()
), held AS (SELECT false AS held_back)
{{tail}}"""

_SETTLED_COLUMNS = """,
       ARRAY(SELECT s.run_id FROM settled s ORDER BY s.run_id, s.step_slug, s.task_index)
         AS settled_run_ids,
       ARRAY(SELECT s.step_slug FROM settled s ORDER BY s.run_id, s.step_slug, s.task_index)
         AS settled_step_slugs,
       ARRAY(SELECT s.task_index FROM settled s ORDER BY s.run_id, s.step_slug, s.task_index)
         AS settled_task_indexes,
       (SELECT n FROM put_back) AS put_back"""


@functools.cache
def _complete_and_claim_statement(queue: str) -> Executable:
    return (  # type: ignore[no-any-return]
        _claim_sql(_COMPLETE_AND_CLAIM_SQL, queue, _SETTLED_COLUMNS)
        .bindparams(  # type: ignore[attr-defined]
            *_FENCE_BINDS,
            bindparam("values", type_=JSONB(none_as_null=False)),
            bindparam("lock_timeout", type_=Text()),
        )
        .columns(
            *_CLAIM_COLUMNS,
            column("settled_run_ids", ARRAY(PG_UUID(as_uuid=True))),
            column("settled_step_slugs", ARRAY(Text())),
            column("settled_task_indexes", ARRAY(Integer())),
            column("put_back", BigInteger()),
        )
    )


def complete_and_claim(
    fences: Sequence[Fence],
    outputs: Sequence[Any],
    queue: str,
    vt_margin: int,
    qty: int,
    worker_id: uuid.UUID,
    lock_timeout_ms: int,
) -> Query:
    """:func:`complete_fenced` of tasks of flow ``queue``, then :func:`claim` of up to
    ``qty`` of its messages, in one statement: the claim sees the steps the completions
    started. Rows as :func:`claim`'s (never limited: a flow with limits reads nothing
    here, and says so; nor a worker that retired meanwhile), each also carrying the keys
    that were settled (``settled_run_ids``, ``settled_step_slugs``,
    ``settled_task_indexes``) and how many messages it read were put back (``put_back``:
    enqueued after it began). Once the completions are written, no lock is waited for
    longer than ``lock_timeout_ms``."""
    return _complete_and_claim_statement(queue), {
        **_fence_params(fences),
        "values": _in_fence_order(fences, outputs),
        "queue": queue,
        "vt_margin": vt_margin,
        "qty": qty,
        "worker_id": worker_id,
        "lock_timeout": f"{lock_timeout_ms}ms",
    }


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
