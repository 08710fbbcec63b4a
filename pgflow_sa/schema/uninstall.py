"""Remove what the installer added (for Alembic downgrades)."""

from __future__ import annotations

from sqlalchemy import Connection, text

from .installer import _OUR_PUBLISHER_MARK, REALTIME_SEND


def uninstall(conn: Connection, *, pgmq: bool, realtime_send: bool) -> None:
    """Drop the pgflow schema and pgflow-sa's bookkeeping; pgmq (extension or SQL-only)
    when ``pgmq`` and it holds no queue other than the flows'; pgflow-sa's
    realtime.send (never someone else's) when ``realtime_send``. Destroys every
    flow and run."""
    # queues that are not pgflow flows' belong to someone else: then pgmq stays
    foreign_queues = 0
    if pgmq and conn.execute(text("SELECT to_regclass('pgmq.meta') IS NOT NULL")).scalar():
        has_flows = conn.execute(text("SELECT to_regclass('pgflow.flows') IS NOT NULL")).scalar()
        foreign_queues = int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pgmq.meta m WHERE NOT EXISTS "
                    "(SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = m.queue_name)"
                    if has_flows
                    else "SELECT count(*) FROM pgmq.meta"
                )
            ).scalar()
            or 0
        )
    conn.execute(text("DROP SCHEMA IF EXISTS pgflow CASCADE"))
    conn.execute(text("DROP SCHEMA IF EXISTS pgflow_sa CASCADE"))
    if realtime_send:
        comment = conn.execute(
            text("SELECT obj_description(to_regprocedure(:fn), 'pg_proc')"), {"fn": REALTIME_SEND}
        ).scalar()
        if comment is not None and str(comment).startswith(_OUR_PUBLISHER_MARK):
            conn.execute(text("DROP FUNCTION realtime.send(jsonb, text, text, boolean)"))
            empty = conn.execute(
                text(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_class "
                    "WHERE relnamespace = 'realtime'::regnamespace) "
                    "AND NOT EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace)"
                )
            ).scalar()
            if empty:
                conn.execute(text("DROP SCHEMA IF EXISTS realtime"))
    if pgmq and not foreign_queues:
        is_extension = conn.execute(
            text("SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'")
        ).scalar()
        if is_extension:
            conn.execute(text("DROP EXTENSION pgmq CASCADE"))
        conn.execute(text("DROP SCHEMA IF EXISTS pgmq CASCADE"))
