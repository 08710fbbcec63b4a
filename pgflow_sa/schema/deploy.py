"""Create flows in the database from their compiled SQL."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from ..compiler import compile_flow
from ..dsl import Flow
from ..exceptions import PgflowSaError
from ..shape import diff_shapes
from .shapes import read_flow_shape


class FlowConflictError(PgflowSaError):
    """A flow in the database differs from the code."""


@dataclass
class DeployReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    #: schedule names added, updated and removed to match the code
    schedules_added: list[str] = field(default_factory=list)
    schedules_updated: list[str] = field(default_factory=list)
    schedules_removed: list[str] = field(default_factory=list)


def deploy_flows(
    target: Connection | Engine | str | URL, flows: Flow | Iterable[Flow]
) -> DeployReport:
    """Create the flows missing from the database and sync their schedules, as
    ``pgflow-sa flows deploy`` does.

    ``target`` is a Connection (the work joins its transaction, which the caller
    commits) or an Engine or URL (one transaction of its own). Flows already there and
    identical are left alone; if any flow differs from the code, nothing is created
    and :class:`FlowConflictError` says what differs. The stored schedules of these
    flows become those the code declares (see
    :func:`pgflow_sa.schedules.manage.sync_schedules`)."""
    from ..registry import FlowRegistry

    chosen = list(FlowRegistry.of(flows))
    if isinstance(target, Connection):
        return _deploy(target, chosen)
    from .._db import database_errors, sync_engine

    engine = sync_engine(target)
    with database_errors(engine.url, PgflowSaError), engine.begin() as conn:
        return _deploy(conn, chosen)


def _deploy(conn: Connection, flows: list[Flow]) -> DeployReport:
    report = DeployReport()
    to_create: list[Flow] = []
    conflicts: list[str] = []
    for flow in flows:
        stored = read_flow_shape(conn, flow.slug)
        if stored is None:
            to_create.append(flow)
            continue
        diff = diff_shapes(flow.shape(), stored)
        if diff:
            conflicts += [f"{flow.slug}: {line}" for line in diff.describe()]
        else:
            report.unchanged.append(flow.slug)
    if conflicts:
        raise FlowConflictError(
            "flows in the database differ from the code, nothing was deployed: "
            + "; ".join(conflicts)
            + ". Deploy the changed flow under a new slug (e.g. my_flow_v2), or change "
            "options with an Alembic migration"
        )
    from ..schedules.manage import refuse_taken_names, sync_schedules

    # before anything is written, also on a caller's Connection
    refuse_taken_names(conn, [s.stored() for flow in flows for s in flow.schedules])
    for flow in to_create:
        run_compiled(conn, compile_flow(flow))
        report.created.append(flow.slug)
    synced = sync_schedules(conn, flows)
    report.schedules_added = [d["name"] for d in synced.added]
    report.schedules_updated = [c.name for c in synced.changed]
    report.schedules_removed = [d["name"] for d in synced.removed]
    return report


_DROP_FLOW_SQL = (
    "DELETE FROM pgflow.step_tasks WHERE flow_slug = :slug",
    "DELETE FROM pgflow.step_states WHERE flow_slug = :slug",
    "DELETE FROM pgflow.runs WHERE flow_slug = :slug",
    "DELETE FROM pgflow.deps WHERE flow_slug = :slug",
    "DELETE FROM pgflow.steps WHERE flow_slug = :slug",
    "DELETE FROM pgflow.workers WHERE queue_name = :slug",
    "DELETE FROM pgflow.flows WHERE flow_slug = :slug",
    "SELECT pgmq.drop_queue(:slug) WHERE EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = :slug)",
)


def drop_flow(conn: Connection, flow_slug: str) -> None:
    """Delete a flow with its runs, steps and queue (pgflow 0.8.1 has no function for
    it). Destroys run history: only for explicit opt-ins."""
    for statement in _DROP_FLOW_SQL:
        conn.execute(text(statement), {"slug": flow_slug})


def drop_flow_script(flow_slug: str, *, delete_runs: bool) -> str:
    """:func:`drop_flow` as one SQL script (a DO block, no parameters). Unless
    ``delete_runs``, it refuses (raises) when the flow has runs."""
    from .installer import sql_literal

    slug = sql_literal(flow_slug)
    message = sql_literal(
        f"pgflow flow {flow_slug.replace('%', '%%')!r} has % run(s), and dropping the flow "
        "deletes them: keep the flow, or opt in by passing delete_runs=True to this "
        "DropFlowOp in the migration"
    )
    refuse = (
        ""
        if delete_runs
        else f"""
  SELECT count(*) INTO runs FROM pgflow.runs WHERE flow_slug = {slug};
  IF runs > 0 THEN
    RAISE EXCEPTION {message}, runs;
  END IF;"""
    )
    deletes = "".join(f"\n  {s.replace(':slug', slug)};" for s in _DROP_FLOW_SQL[:-1])
    return f"""DO $pgflow_sa$
DECLARE
  runs bigint;
BEGIN{refuse}{deletes}
  IF EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = {slug}) THEN
    PERFORM pgmq.drop_queue({slug});
  END IF;
END
$pgflow_sa$;"""


def set_option_sql(flow_slug: str, step_slug: str | None, column: str, value: int | None) -> str:
    """:func:`set_option` as one SQL statement (no parameters)."""
    from .installer import sql_literal

    if column not in {"opt_max_attempts", "opt_base_delay", "opt_timeout", "opt_start_delay"}:
        raise ValueError(f"{column!r} is not a pgflow option column")
    new = "NULL" if value is None else str(int(value))
    where = f"flow_slug = {sql_literal(flow_slug)}"
    if step_slug is None:
        return f"UPDATE pgflow.flows SET {column} = {new} WHERE {where};"
    return f"UPDATE pgflow.steps SET {column} = {new} WHERE {where} AND step_slug = {sql_literal(step_slug)};"


def run_compiled(conn: Connection, statements: Iterable[str]) -> None:
    """Execute statements from :func:`pgflow_sa.compile_flow` (no parameters)."""
    for statement in statements:
        conn.exec_driver_sql(statement)


def set_option(
    conn: Connection, flow_slug: str, step_slug: str | None, column: str, value: int | None
) -> None:
    """Change a flow option (``step_slug`` None) or step option in place."""
    from . import tables

    if step_slug is None:
        conn.execute(
            tables.flows.update()
            .where(tables.flows.c.flow_slug == flow_slug)
            .values({column: value})
        )
    else:
        conn.execute(
            tables.steps.update()
            .where(tables.steps.c.flow_slug == flow_slug, tables.steps.c.step_slug == step_slug)
            .values({column: value})
        )
