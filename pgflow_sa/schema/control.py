"""The SQL of run control: cancelling a run, recording a retry, reading both back."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Text, bindparam, select, text
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import TextClause

from . import tables

runs, run_retries = tables.runs, tables.run_retries

_ID = PG_UUID(as_uuid=True)


def lock_run(run_id: uuid.UUID) -> Select[Any]:
    """The run's flow and status, its row locked for the transaction (the lock
    pgflow's complete_task takes first, so a settle of the same run waits or is seen)."""
    return (
        select(runs.c.run_id, runs.c.flow_slug, runs.c.status)
        .where(runs.c.run_id == run_id)
        .with_for_update()
    )


# Archives the messages of a run's unfinished tasks, locking them first in msg_id
# order: a claim locks messages before the tasks it starts, so the cancel, which fails
# those tasks next, takes the same order (its run's row it holds already; claims never
# lock runs). A claim holding one of them is waited for, and its task failed next.
_ARCHIVE = """
SELECT count(*) AS archived FROM pgmq.archive(:flow_slug, ARRAY(
    SELECT q.msg_id FROM pgmq.{queue_table} q
    WHERE q.msg_id IN (
        SELECT st.message_id FROM pgflow.step_tasks st
        WHERE st.run_id = :run_id AND st.status IN ('queued', 'started')
          AND st.message_id IS NOT NULL)
    ORDER BY q.msg_id
    FOR UPDATE OF q))
"""


def archive(run_id: uuid.UUID, flow_slug: str) -> tuple[TextClause, dict[str, Any]]:
    """Archive the run's messages (before :func:`cancel`)."""
    from ..dsl import is_safe_slug

    if not is_safe_slug(flow_slug):
        raise ValueError(f"not a pgflow queue name: {flow_slug!r}")
    statement = text(_ARCHIVE.replace("{queue_table}", f"q_{flow_slug.lower()}")).bindparams(
        bindparam("run_id", type_=_ID), bindparam("flow_slug", type_=Text())
    )
    return statement, {"run_id": run_id, "flow_slug": flow_slug}


# Ends a run in progress as pgflow ends a failed one (run and started steps failed,
# run:failed broadcast; its messages archived by :func:`archive` first) and records
# why. Its tasks still queued or started are failed too, so that a worker's later
# settle of one finds it taken (fenced) and nothing it writes counts.
# clock_timestamp(): the caller's transaction may have begun before a task started.
_CANCEL = text(
    """
WITH tasks AS (
    UPDATE pgflow.step_tasks st
    SET status = 'failed', failed_at = clock_timestamp(), error_message = :message
    WHERE st.run_id = :run_id AND st.status IN ('queued', 'started')
    RETURNING st.message_id, st.status
), steps AS (
    UPDATE pgflow.step_states ss
    SET status = 'failed', failed_at = clock_timestamp(), error_message = :message
    WHERE ss.run_id = :run_id AND ss.status = 'started'
    RETURNING ss.step_slug
), run AS (
    UPDATE pgflow.runs r SET status = 'failed', failed_at = clock_timestamp()
    WHERE r.run_id = :run_id AND r.status = 'started'
    RETURNING r.run_id
), recorded AS (
    INSERT INTO pgflow_sa.run_cancellations (run_id, reason) VALUES (:run_id, :reason)
    RETURNING run_id
)
SELECT (SELECT count(*) FROM tasks) AS tasks,
       (SELECT count(*) FROM steps) AS steps,
       (SELECT count(*) FROM run) AS runs,
       (SELECT count(*) FROM recorded) AS recorded,
       (SELECT count(*) FROM realtime.send(
            jsonb_build_object(
                'event_type', 'run:failed', 'run_id', CAST(:run_id AS uuid),
                'flow_slug', CAST(:flow_slug AS text), 'status', 'failed',
                'error_message', CAST(:message AS text), 'failed_at', clock_timestamp()),
            'run:failed', 'pgflow:run:' || CAST(:run_id AS text), false)) AS sent
"""
).bindparams(
    bindparam("run_id", type_=_ID),
    bindparam("flow_slug", type_=Text()),
    bindparam("message", type_=Text()),
    bindparam("reason", type_=Text()),
)


def cancel(
    run_id: uuid.UUID, flow_slug: str, reason: str | None
) -> tuple[TextClause, dict[str, Any]]:
    """Cancel a run whose row :func:`lock_run` locked (and found started), after
    :func:`archive`."""
    message = f"Cancelled: {reason}" if reason else "Cancelled"
    return _CANCEL, {"run_id": run_id, "flow_slug": flow_slug, "message": message, "reason": reason}


def record_retry(run_id: uuid.UUID, retry_of: uuid.UUID, reuse_outputs: bool) -> Any:
    return run_retries.insert().values(
        run_id=run_id, retry_of=retry_of, reuse_outputs=reuse_outputs
    )
