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


# Ends a run in progress as pgflow ends a failed one (run and started steps failed,
# every message of the run archived, run:failed broadcast) and records why. Its tasks
# still queued or started are failed too, so that a worker's later settle of one
# finds it taken (fenced) and nothing it writes counts. clock_timestamp(): the
# caller's transaction may have begun before a task started.
_CANCEL = text(
    """
WITH tasks AS (
    UPDATE pgflow.step_tasks st
    SET status = 'failed', failed_at = clock_timestamp(), error_message = :message
    WHERE st.run_id = :run_id AND st.status IN ('queued', 'started')
    RETURNING st.message_id, st.status
), archived AS (
    SELECT pgmq.archive(:flow_slug, array_agg(t.message_id)) AS n
    FROM tasks t WHERE t.message_id IS NOT NULL
    HAVING count(t.message_id) > 0
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
       (SELECT count(*) FROM archived) AS archived,
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
    """Cancel a run whose row :func:`lock_run` locked (and found started)."""
    message = f"Cancelled: {reason}" if reason else "Cancelled"
    return _CANCEL, {"run_id": run_id, "flow_slug": flow_slug, "message": message, "reason": reason}


def record_retry(run_id: uuid.UUID, retry_of: uuid.UUID, reuse_outputs: bool) -> Any:
    return run_retries.insert().values(
        run_id=run_id, retry_of=retry_of, reuse_outputs=reuse_outputs
    )
