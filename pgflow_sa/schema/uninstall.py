"""Remove what the installer added (for Alembic downgrades), as one SQL script that
decides everything when it runs, so that it works offline (``alembic ... --sql``) too."""

from __future__ import annotations

from sqlalchemy import Connection

from .installer import _OUR_PUBLISHER_MARK, REALTIME_SEND, run_script, sql_literal

# Objects outside pgflow's schemas that depend on pgflow's tables, types or functions
# (foreign keys, views, column defaults...): DROP SCHEMA pgflow CASCADE would drop them.
# A view's dependency is recorded for its rewrite rule: named by the view instead.
_DEPENDENTS_SQL = """
    SELECT string_agg(DISTINCT o.type || ' ' || o.identity, ', ')
    FROM (
      SELECT CASE WHEN d.classid = 'pg_rewrite'::regclass THEN 'pg_class'::regclass
                  ELSE d.classid END AS classid,
             CASE WHEN d.classid = 'pg_rewrite'::regclass THEN r.ev_class
                  ELSE d.objid END AS objid
      FROM pg_depend d
      LEFT JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
      WHERE d.deptype = 'n' AND (
        (d.refclassid = 'pg_class'::regclass AND d.refobjid IN (
          SELECT oid FROM pg_class WHERE relnamespace::regnamespace::text IN ('pgflow', 'pgflow_sa')))
        OR (d.refclassid = 'pg_proc'::regclass AND d.refobjid IN (
          SELECT oid FROM pg_proc WHERE pronamespace::regnamespace::text IN ('pgflow', 'pgflow_sa')))
        OR (d.refclassid = 'pg_type'::regclass AND d.refobjid IN (
          SELECT oid FROM pg_type WHERE typnamespace::regnamespace::text IN ('pgflow', 'pgflow_sa')))
      )
    ) dep
    CROSS JOIN LATERAL pg_identify_object(dep.classid, dep.objid, 0) o
    WHERE coalesce(o.schema, '') NOT IN ('pgflow', 'pgflow_sa', 'pgmq', 'realtime')
"""


_REFUSAL = (
    "pgflow cannot be uninstalled: other objects depend on it (%). Drop or change them "
    "first, or opt in to dropping them with it: pass cascade=True to this "
    "UninstallPgflowOp in the migration"
)


def uninstall_script(*, pgmq: bool, realtime_send: bool, cascade: bool = False) -> str:
    """The uninstall as one SQL script (a DO block, no parameters).

    Drops the pgflow schema and pgflow-sa's bookkeeping; pgmq (extension or SQL-only)
    when ``pgmq`` and it holds no queue other than the flows'; pgflow-sa's
    realtime.send (never someone else's) when ``realtime_send``. Destroys every flow
    and run. Unless ``cascade``, it refuses (raises, naming them) while objects
    outside pgflow depend on it, such as an app's foreign key to pgflow.runs or a view
    over it; with ``cascade`` those objects are dropped too (tables keep their rows
    and lose the foreign key)."""
    fn = sql_literal(REALTIME_SEND)
    refuse = (
        ""
        if cascade
        else f"""
  SELECT ({_DEPENDENTS_SQL}) INTO dependents;
  IF dependents IS NOT NULL THEN
    RAISE EXCEPTION '{_REFUSAL}', dependents;
  END IF;"""
    )
    drop_pgmq = (
        """
  -- queues that are not pgflow flows' belong to someone else: then pgmq stays
  IF to_regclass('pgmq.meta') IS NOT NULL THEN
    IF to_regclass('pgflow.flows') IS NOT NULL THEN
      SELECT count(*) INTO foreign_queues FROM pgmq.meta m
      WHERE NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = m.queue_name);
    ELSE
      SELECT count(*) INTO foreign_queues FROM pgmq.meta;
    END IF;
  END IF;"""
        if pgmq
        else ""
    )
    publisher = (
        f"""
  IF coalesce(obj_description(to_regprocedure({fn}), 'pg_proc'), '')
      LIKE '{_OUR_PUBLISHER_MARK}%' THEN
    DROP FUNCTION realtime.send(jsonb, text, text, boolean);
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = 'realtime'::regnamespace)
       AND NOT EXISTS (SELECT 1 FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace)
    THEN
      DROP SCHEMA IF EXISTS realtime;
    END IF;
  END IF;"""
        if realtime_send
        else ""
    )
    pgmq_drop = (
        """
  IF foreign_queues = 0 THEN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pgmq') THEN
      DROP EXTENSION pgmq CASCADE;
    END IF;
    DROP SCHEMA IF EXISTS pgmq CASCADE;
  END IF;"""
        if pgmq
        else ""
    )
    return f"""DO $pgflow_sa$
DECLARE
  dependents text;
  foreign_queues bigint := 0;
BEGIN{refuse}{drop_pgmq}
  DROP SCHEMA IF EXISTS pgflow CASCADE;
  DROP SCHEMA IF EXISTS pgflow_sa CASCADE;{publisher}{pgmq_drop}
END
$pgflow_sa$;"""


def uninstall(conn: Connection, *, pgmq: bool, realtime_send: bool, cascade: bool = True) -> None:
    """Run :func:`uninstall_script` in the connection's transaction."""
    run_script(conn, uninstall_script(pgmq=pgmq, realtime_send=realtime_send, cascade=cascade))
