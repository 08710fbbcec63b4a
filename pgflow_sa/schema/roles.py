"""Least-privilege roles: one for workers, one for the apps that start and read runs.

pgflow's functions run with their caller's privileges (SECURITY INVOKER), so a role
that calls ``pgflow.start_flow`` or ``pgflow.complete_task`` needs privileges on every
table those functions touch, pgmq's queue tables included. The grants below are what
pgflow-sa's worker and client use, found by running them as these roles, and no
more. They are SQL text made in one place (:func:`grant_statements`), so a migration
can emit them as they are.

Queue tables (``pgmq.q_<flow>``, ``pgmq.a_<flow>``) are made when a flow is deployed:
those of the flows already there are granted now, later ones by default privileges of
the role that runs the statements, which therefore has to be the role that deploys
flows (usually the owner of the pgflow schema).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from ..exceptions import PgflowSaError

DEFAULT_WORKER_ROLE = "pgflow_worker"
DEFAULT_CLIENT_ROLE = "pgflow_client"

_SIMPLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# names PostgreSQL reserves for roles (pg_* are its predefined roles)
_RESERVED_NAMES = {"public", "none", "current_user", "session_user", "current_role"}


class RoleError(PgflowSaError):
    """The roles could not be created or granted."""


@dataclass(frozen=True)
class Grant:
    """``GRANT privileges ON target``, and why the role needs it."""

    privileges: str
    target: str
    why: str


_TASK_KEY = "flow_slug, run_id, step_slug, task_index, message_id"

#: What ``pgflow-sa worker`` does: checks its flows, claims (pgmq.read and
#: pgflow.start_tasks), completes and fails tasks (pgflow.complete_task, fail_task and
#: the fenced statements around them), hands tasks back, recovers tasks of workers
#: that are gone, registers and heartbeats.
WORKER_GRANTS: tuple[Grant, ...] = (
    Grant("USAGE", "SCHEMA pgflow", "pgflow's tables and functions"),
    Grant("USAGE", "SCHEMA pgmq", "the queues: read, hide, archive, send"),
    Grant("USAGE", "SCHEMA realtime", "pgflow's functions publish events with realtime.send"),
    Grant(
        "SELECT",
        "TABLE pgflow.flows, pgflow.steps, pgflow.deps",
        "start-up check of the flows' shapes; timeouts, retries and dependencies",
    ),
    Grant(
        "SELECT, INSERT (run_id, flow_slug, input, remaining_steps), "
        "UPDATE (status, output, remaining_steps, completed_at, failed_at)",
        "TABLE pgflow.runs",
        "run inputs; complete_task and fail_task finish or fail the run; schedules start runs",
    ),
    Grant(
        "SELECT, INSERT (flow_slug, run_id, step_slug, remaining_deps, initial_tasks), "
        "UPDATE (status, remaining_tasks, remaining_deps, initial_tasks, "
        "started_at, completed_at, failed_at, error_message)",
        "TABLE pgflow.step_states",
        "complete_task and fail_task move steps on and start the next ones; schedules start runs",
    ),
    Grant(
        f"SELECT, INSERT ({_TASK_KEY}), UPDATE (status, attempts_count, started_at, "
        "last_worker_id, output, error_message, completed_at, failed_at)",
        "TABLE pgflow.step_tasks",
        "start_tasks claims, complete_task/fail_task settle (and queue the next "
        "steps' tasks), hand-backs and recovery",
    ),
    Grant(
        "SELECT, INSERT (worker_id, queue_name, function_name), "
        "UPDATE (last_heartbeat_at, deprecated_at)",
        "TABLE pgflow.workers",
        "registration, heartbeats, retirement; recovery reads other workers' heartbeats",
    ),
    Grant("USAGE", "SCHEMA pgflow_sa", "the schedules the worker fires"),
    Grant(
        "SELECT, UPDATE (next_fire_at, last_fired_tick)",
        "TABLE pgflow_sa.schedules",
        "the scheduler reads the schedules and moves their next fire time",
    ),
    Grant(
        "SELECT, INSERT (schedule_name, tick, flow_slug, run_id, manual), UPDATE (run_id, error)",
        "TABLE pgflow_sa.schedule_runs",
        "each fired tick is claimed once, with the run it started (or why none started)",
    ),
    Grant(
        "SELECT",
        "TABLE pgflow_sa.run_cancellations, pgflow_sa.run_retries",
        "runs read back with their cancellation; a retry's claims reuse outputs",
    ),
    Grant(
        "SELECT, INSERT, UPDATE, DELETE",
        "TABLE pgflow_sa.flow_limits",
        "a worker writes its flows' concurrency limits; claims read them",
    ),
    Grant(
        "SELECT, INSERT, DELETE",
        "TABLE pgflow_sa.admitted_runs",
        "claims under a run limit admit runs and forget finished ones",
    ),
)

#: What an app does with pgflow_sa.start_flow, get_run, list_runs, flow_status,
#: wait_for_run and watch_run (and the start, runs and status commands).
CLIENT_GRANTS: tuple[Grant, ...] = (
    Grant("USAGE", "SCHEMA pgflow", "pgflow's tables and functions"),
    Grant("USAGE", "SCHEMA pgmq", "start_flow sends the first steps' messages"),
    Grant("USAGE", "SCHEMA realtime", "start_flow publishes run:started with realtime.send"),
    Grant("USAGE", "SCHEMA pgflow_sa", "`pgflow-sa status` checks the install"),
    Grant(
        "SELECT",
        "TABLE pgflow_sa.schema_migrations",
        "`pgflow-sa status` checks the install",
    ),
    Grant(
        "SELECT",
        "TABLE pgflow.flows, pgflow.steps, pgflow.deps, pgflow.workers",
        "flow lookup, step order, flow_status's live workers",
    ),
    Grant(
        "SELECT, INSERT (run_id, flow_slug, input, remaining_steps), "
        "UPDATE (status, output, remaining_steps, completed_at, failed_at)",
        "TABLE pgflow.runs",
        "reading runs; start_flow creates the run (and completes a run with no tasks); "
        "cancel_run fails it",
    ),
    Grant(
        "SELECT, INSERT (flow_slug, run_id, step_slug, remaining_deps, initial_tasks), "
        "UPDATE (status, remaining_tasks, remaining_deps, initial_tasks, started_at, "
        "completed_at, failed_at, error_message)",
        "TABLE pgflow.step_states",
        "reading runs; start_flow creates the step states and starts the root steps; "
        "cancel_run fails the started ones",
    ),
    Grant(
        f"SELECT, INSERT ({_TASK_KEY}), UPDATE (status, failed_at, error_message)",
        "TABLE pgflow.step_tasks",
        "reading runs; start_flow queues the root steps' tasks; cancel_run fails the "
        "unfinished ones",
    ),
    Grant(
        "SELECT, INSERT",
        "TABLE pgflow_sa.run_cancellations, pgflow_sa.run_retries",
        "cancel_run and retry_run record what they did; runs are read back with it",
    ),
    Grant(
        "SELECT",
        "TABLE pgflow_sa.flow_limits, pgflow_sa.admitted_runs",
        "flow_status counts the tasks waiting on a concurrency limit",
    ),
    Grant(
        "SELECT, UPDATE (paused, next_fire_at, updated_at)",
        "TABLE pgflow_sa.schedules",
        "list_schedules, pause_schedule, resume_schedule and trigger_schedule",
    ),
    Grant(
        "SELECT, INSERT (schedule_name, tick, flow_slug, run_id, manual)",
        "TABLE pgflow_sa.schedule_runs",
        "trigger_schedule records the run it starts",
    ),
)

#: On every queue table of a flow (``pgmq.q_<flow>`` and ``pgmq.a_<flow>``): default
#: privileges cannot tell the two apart, so both get the same.
WORKER_QUEUE_TABLES = "SELECT, INSERT, UPDATE, DELETE"
#: (DELETE: cancel_run archives the run's messages, as pgflow does when a run fails)
CLIENT_QUEUE_TABLES = "SELECT, INSERT, DELETE"
#: On each ``pgmq.q_<flow>_msg_id_seq``: pgmq.metrics (flow_status) reads it.
CLIENT_QUEUE_SEQUENCES = "SELECT"


def check_role_name(name: str, what: str = "role") -> str:
    """``name`` when it is a plain lower-case SQL identifier, else :class:`RoleError`."""
    if not _SIMPLE_NAME.fullmatch(name) or name in _RESERVED_NAMES or name.startswith("pg_"):
        raise RoleError(
            f"{what} name {name!r} is not a simple identifier: use lower-case letters, "
            "digits and underscores, starting with a letter or underscore, at most 63 "
            "characters, not starting with pg_"
        )
    return name


def _quoted(name: str) -> str:
    return f'"{name}"'


def _create_role(name: str) -> str:
    return (
        "DO $$ BEGIN\n"
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN\n"
        f"    CREATE ROLE {_quoted(name)} NOLOGIN;\n"
        "  END IF;\n"
        "EXCEPTION WHEN duplicate_object THEN NULL;  -- created meanwhile\n"
        "END $$"
    )


_GRANT_QUEUES = """-- the queue tables of the flows deployed so far
DO $$
DECLARE
  queue text;
  q text;
  a text;
BEGIN
  FOR queue IN SELECT m.queue_name FROM pgmq.meta m
               JOIN pgflow.flows f ON f.flow_slug = m.queue_name LOOP
    q := pgmq.format_table_name(queue, 'q');
    a := pgmq.format_table_name(queue, 'a');
    EXECUTE format('GRANT {worker_tables} ON TABLE pgmq.%I, pgmq.%I TO %I', q, a, '{worker}');
    EXECUTE format('GRANT {client_tables} ON TABLE pgmq.%I, pgmq.%I TO %I', q, a, '{client}');
    IF to_regclass(format('pgmq.%I', q || '_msg_id_seq')) IS NOT NULL THEN
      EXECUTE format('GRANT {client_sequences} ON SEQUENCE pgmq.%I TO %I',
                     q || '_msg_id_seq', '{client}');
    END IF;
  END LOOP;
END $$"""


def grant_statements(
    worker_role: str = DEFAULT_WORKER_ROLE,
    client_role: str = DEFAULT_CLIENT_ROLE,
    *,
    create: bool = True,
) -> list[str]:
    """The SQL that makes the two roles (NOLOGIN, when missing and ``create``) and
    grants them what they need. Idempotent; runs on a database where pgflow is
    installed, as the role that deploys flows (see the module's docstring)."""
    worker = check_role_name(worker_role, "worker role")
    client = check_role_name(client_role, "client role")
    if worker == client:
        raise RoleError(f"the worker and client roles must differ (both are {worker!r})")
    statements = [_create_role(name) for name in (worker, client)] if create else []
    for role, grants in ((worker, WORKER_GRANTS), (client, CLIENT_GRANTS)):
        statements += [
            f"-- {g.why}\nGRANT {g.privileges} ON {g.target} TO {_quoted(role)}" for g in grants
        ]
    statements.append(
        _GRANT_QUEUES.format(
            worker=worker,
            client=client,
            worker_tables=WORKER_QUEUE_TABLES,
            client_tables=CLIENT_QUEUE_TABLES,
            client_sequences=CLIENT_QUEUE_SEQUENCES,
        )
    )
    defaults = "ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq GRANT"
    statements += [
        "-- queue tables this role creates later (flows it deploys)\n"
        f"{defaults} {WORKER_QUEUE_TABLES} ON TABLES TO {_quoted(worker)}",
        f"{defaults} {CLIENT_QUEUE_TABLES} ON TABLES TO {_quoted(client)}",
        f"{defaults} {CLIENT_QUEUE_SEQUENCES} ON SEQUENCES TO {_quoted(client)}",
    ]
    return statements


@dataclass
class RolesReport:
    """What :func:`grant_roles` did."""

    worker_role: str
    client_role: str
    #: the role that ran the statements: its default privileges grant later queues
    deployer: str
    created: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """What was done, line by line (``pgflow-sa roles`` prints it)."""
        lines = [f"created role {name} (NOLOGIN)" for name in self.created]
        lines += [
            f"granted {self.worker_role}: read flows, claim, complete and fail tasks, "
            "heartbeat (worker)",
            f"granted {self.client_role}: start runs, read runs, steps and tasks (client)",
            "granted the queue tables of the flows deployed so far: "
            + (", ".join(self.queues) or "none"),
            f"default privileges: queue tables {self.deployer} creates later "
            "(flows it deploys) are granted too",
            f"next: GRANT {self.worker_role} TO <worker login>; "
            f"GRANT {self.client_role} TO <app login>;",
        ]
        return lines


_STATE_SQL = """
SELECT to_regclass('pgflow.flows') IS NOT NULL AS has_pgflow,
       current_user AS me,
       (SELECT array_agg(rolname::text) FROM pg_roles WHERE rolname = ANY(:names)) AS present,
       (SELECT array_agg(rolname::text) FROM pg_roles
         WHERE rolname = ANY(:names) AND rolsuper) AS superusers
"""

_QUEUES_SQL = (
    "SELECT m.queue_name FROM pgmq.meta m "
    "JOIN pgflow.flows f ON f.flow_slug = m.queue_name ORDER BY 1"
)


def _grant(
    conn: Connection, worker: str, client: str, create: bool, statements: list[str]
) -> RolesReport:
    state = conn.execute(text(_STATE_SQL), {"names": [worker, client]}).one()
    if not state.has_pgflow:
        raise RoleError(
            "pgflow is not installed in this database: run `pgflow-sa install` first, "
            "then grant the roles"
        )
    present = set(state.present or ())
    missing = [name for name in (worker, client) if name not in present]
    if missing and not create:
        raise RoleError(f"role(s) {', '.join(missing)} do not exist; create them first")
    for name in (worker, client):
        if name == state.me:
            raise RoleError(
                f"{name} is the role running this: grant to other roles, and run this "
                "as the role that deploys flows"
            )
    if state.superusers:
        raise RoleError(
            f"role(s) {', '.join(state.superusers)} are superusers, which no grant limits: "
            "pick other names"
        )
    for statement in statements:
        conn.execute(text(statement))
    return RolesReport(
        worker_role=worker,
        client_role=client,
        deployer=state.me,
        created=missing,
        queues=list(conn.execute(text(_QUEUES_SQL)).scalars()),
        statements=statements,
    )


def grant_roles(
    target: Connection | Engine | str | URL,
    worker_role: str = DEFAULT_WORKER_ROLE,
    client_role: str = DEFAULT_CLIENT_ROLE,
    *,
    create: bool = True,
) -> RolesReport:
    """Create (when missing and ``create``) and grant the worker and client roles, as
    ``pgflow-sa roles`` does. Idempotent.

    ``target`` is a Connection (the work joins its transaction, which the caller
    commits) or an Engine or URL (one transaction of its own). Run it as the role that
    deploys flows: queue tables that role creates later are granted by its default
    privileges. Grant the roles to login roles yourself
    (``GRANT pgflow_worker TO my_worker_login``)."""
    statements = grant_statements(worker_role, client_role, create=create)
    if isinstance(target, Connection):
        return _grant(target, worker_role, client_role, create, statements)
    from .._db import database_errors, sync_engine

    engine = sync_engine(target)
    with database_errors(engine.url, RoleError), engine.begin() as conn:
        return _grant(conn, worker_role, client_role, create, statements)
