"""Typed SQLAlchemy Core tables for the pgflow 0.8.1 schema (and pgflow-sa's own)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from .names import PGFLOW_SA_SCHEMA, PGFLOW_SCHEMA

metadata = MetaData()

_TS = DateTime(timezone=True)
_NOW = text("now()")


def _fk(
    columns: list[str], target: str, refcolumns: list[str], name: str, ondelete: str | None = None
) -> ForeignKeyConstraint:
    return ForeignKeyConstraint(
        columns, [f"{PGFLOW_SCHEMA}.{target}.{c}" for c in refcolumns], name=name, ondelete=ondelete
    )


flows = Table(
    "flows",
    metadata,
    Column("flow_slug", Text, nullable=False),
    Column("opt_max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("opt_base_delay", Integer, nullable=False, server_default=text("1")),
    Column("opt_timeout", Integer, nullable=False, server_default=text("60")),
    Column("created_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("flow_slug", name="flows_pkey"),
    CheckConstraint("opt_base_delay >= 0", name="opt_base_delay_is_nonnegative"),
    CheckConstraint("opt_max_attempts >= 0", name="opt_max_attempts_is_nonnegative"),
    CheckConstraint("opt_timeout > 0", name="opt_timeout_is_positive"),
    schema=PGFLOW_SCHEMA,
)

steps = Table(
    "steps",
    metadata,
    Column("flow_slug", Text, nullable=False),
    Column("step_slug", Text, nullable=False),
    Column("step_type", Text, nullable=False, server_default=text("'single'::text")),
    Column("step_index", Integer, nullable=False, server_default=text("0")),
    Column("deps_count", Integer, nullable=False, server_default=text("0")),
    Column("opt_max_attempts", Integer),
    Column("opt_base_delay", Integer),
    Column("opt_timeout", Integer),
    Column("created_at", _TS, nullable=False, server_default=_NOW),
    Column("opt_start_delay", Integer),
    PrimaryKeyConstraint("flow_slug", "step_slug", name="steps_pkey"),
    UniqueConstraint("flow_slug", "step_index", name="steps_flow_slug_step_index_key"),
    _fk(["flow_slug"], "flows", ["flow_slug"], "steps_flow_slug_fkey"),
    CheckConstraint(
        "step_type = ANY (ARRAY['single'::text, 'map'::text])", name="steps_step_type_check"
    ),
    CheckConstraint("deps_count >= 0", name="steps_deps_count_check"),
    schema=PGFLOW_SCHEMA,
)

deps = Table(
    "deps",
    metadata,
    Column("flow_slug", Text, nullable=False),
    Column("dep_slug", Text, nullable=False),
    Column("step_slug", Text, nullable=False),
    Column("created_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("flow_slug", "dep_slug", "step_slug", name="deps_pkey"),
    _fk(
        ["flow_slug", "dep_slug"],
        "steps",
        ["flow_slug", "step_slug"],
        "deps_flow_slug_dep_slug_fkey",
    ),
    _fk(["flow_slug"], "flows", ["flow_slug"], "deps_flow_slug_fkey"),
    _fk(
        ["flow_slug", "step_slug"],
        "steps",
        ["flow_slug", "step_slug"],
        "deps_flow_slug_step_slug_fkey",
    ),
    CheckConstraint("dep_slug <> step_slug", name="deps_check"),
    Index("idx_deps_by_flow_dep", "flow_slug", "dep_slug"),
    Index("idx_deps_by_flow_step", "flow_slug", "step_slug"),
    schema=PGFLOW_SCHEMA,
)

RUN_STATUSES = ("started", "completed", "failed")

runs = Table(
    "runs",
    metadata,
    Column("run_id", UUID(as_uuid=True), nullable=False, server_default=text("gen_random_uuid()")),
    Column("flow_slug", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'started'::text")),
    Column("input", JSONB(none_as_null=True), nullable=False),
    Column("output", JSONB(none_as_null=True)),
    Column("remaining_steps", Integer, nullable=False, server_default=text("0")),
    Column("started_at", _TS, nullable=False, server_default=_NOW),
    Column("completed_at", _TS),
    Column("failed_at", _TS),
    PrimaryKeyConstraint("run_id", name="runs_pkey"),
    _fk(["flow_slug"], "flows", ["flow_slug"], "runs_flow_slug_fkey"),
    CheckConstraint(
        "status = ANY (ARRAY['started'::text, 'failed'::text, 'completed'::text])",
        name="status_is_valid",
    ),
    CheckConstraint("remaining_steps >= 0", name="runs_remaining_steps_check"),
    Index("idx_runs_flow_slug", "flow_slug"),
    Index("idx_runs_status", "status"),
    # pgflow-sa's own (pgflow_sa.schema.indexes): runs newest first
    Index("pgflow_sa_runs_started_at", "started_at", "run_id"),
    schema=PGFLOW_SCHEMA,
)
# pgflow-sa's own: runs of a flow by status and by when they finished
Index(
    "pgflow_sa_runs_finished",
    runs.c.flow_slug,
    runs.c.status,
    func.coalesce(runs.c.completed_at, runs.c.failed_at),
)

STEP_STATUSES = ("created", "started", "completed", "failed")

step_states = Table(
    "step_states",
    metadata,
    Column("flow_slug", Text, nullable=False),
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("step_slug", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'created'::text")),
    Column("remaining_tasks", Integer),
    Column("remaining_deps", Integer, nullable=False, server_default=text("0")),
    Column("created_at", _TS, nullable=False, server_default=_NOW),
    Column("started_at", _TS),
    Column("completed_at", _TS),
    Column("failed_at", _TS),
    Column("error_message", Text),
    Column("initial_tasks", Integer),
    PrimaryKeyConstraint("run_id", "step_slug", name="step_states_pkey"),
    _fk(["flow_slug"], "flows", ["flow_slug"], "step_states_flow_slug_fkey"),
    _fk(
        ["flow_slug", "step_slug"],
        "steps",
        ["flow_slug", "step_slug"],
        "step_states_flow_slug_step_slug_fkey",
    ),
    _fk(["run_id"], "runs", ["run_id"], "step_states_run_id_fkey"),
    CheckConstraint(
        "status = ANY (ARRAY['created'::text, 'started'::text, 'completed'::text, 'failed'::text])",
        name="status_is_valid",
    ),
    CheckConstraint(
        "status <> 'completed'::text OR remaining_tasks = 0",
        name="status_and_remaining_tasks_match",
    ),
    Index(
        "idx_step_states_failed",
        "run_id",
        "step_slug",
        postgresql_where=text("status = 'failed'::text"),
    ),
    Index("idx_step_states_flow_slug", "flow_slug"),
    Index(
        "idx_step_states_ready",
        "run_id",
        "status",
        "remaining_deps",
        postgresql_where=text("status = 'created'::text AND remaining_deps = 0"),
    ),
    Index("idx_step_states_run_id", "run_id"),
    schema=PGFLOW_SCHEMA,
)

TASK_STATUSES = ("queued", "started", "completed", "failed")

step_tasks = Table(
    "step_tasks",
    metadata,
    Column("flow_slug", Text, nullable=False),
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("step_slug", Text, nullable=False),
    Column("message_id", BigInteger),
    Column("task_index", Integer, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False, server_default=text("'queued'::text")),
    Column("attempts_count", Integer, nullable=False, server_default=text("0")),
    Column("error_message", Text),
    Column("output", JSONB(none_as_null=True)),
    Column("queued_at", _TS, nullable=False, server_default=_NOW),
    Column("completed_at", _TS),
    Column("failed_at", _TS),
    Column("started_at", _TS),
    Column("last_worker_id", UUID(as_uuid=True)),
    PrimaryKeyConstraint("run_id", "step_slug", "task_index", name="step_tasks_pkey"),
    _fk(["flow_slug"], "flows", ["flow_slug"], "step_tasks_flow_slug_fkey"),
    _fk(
        ["last_worker_id"],
        "workers",
        ["worker_id"],
        "step_tasks_last_worker_id_fkey",
        ondelete="SET NULL",
    ),
    _fk(["run_id"], "runs", ["run_id"], "step_tasks_run_id_fkey"),
    _fk(
        ["run_id", "step_slug"],
        "step_states",
        ["run_id", "step_slug"],
        "step_tasks_run_id_step_slug_fkey",
    ),
    CheckConstraint(
        "status = ANY (ARRAY['queued'::text, 'started'::text, 'completed'::text, 'failed'::text])",
        name="valid_status",
    ),
    CheckConstraint("attempts_count >= 0", name="attempts_count_nonnegative"),
    Index(
        "idx_step_tasks_completed",
        "run_id",
        "step_slug",
        postgresql_where=text("status = 'completed'::text"),
    ),
    Index(
        "idx_step_tasks_failed",
        "run_id",
        "step_slug",
        postgresql_where=text("status = 'failed'::text"),
    ),
    Index("idx_step_tasks_flow_run_step", "flow_slug", "run_id", "step_slug"),
    Index(
        "idx_step_tasks_last_worker",
        "last_worker_id",
        postgresql_where=text("status = 'started'::text"),
    ),
    Index("idx_step_tasks_message_id", "message_id"),
    Index(
        "idx_step_tasks_queued",
        "run_id",
        "step_slug",
        postgresql_where=text("status = 'queued'::text"),
    ),
    Index(
        "idx_step_tasks_queued_msg", "message_id", postgresql_where=text("status = 'queued'::text")
    ),
    Index(
        "idx_step_tasks_started", "started_at", postgresql_where=text("status = 'started'::text")
    ),
    schema=PGFLOW_SCHEMA,
)

workers = Table(
    "workers",
    metadata,
    Column("worker_id", UUID(as_uuid=True), nullable=False),
    Column("queue_name", Text, nullable=False),
    Column("function_name", Text, nullable=False),
    Column("started_at", _TS, nullable=False, server_default=_NOW),
    Column("deprecated_at", _TS),
    Column("last_heartbeat_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("worker_id", name="workers_pkey"),
    Index("idx_workers_heartbeat", "last_heartbeat_at"),
    Index("idx_workers_queue_name", "queue_name"),
    schema=PGFLOW_SCHEMA,
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("name", Text, nullable=False),
    Column("pgflow_version", Text, nullable=False),
    Column("applied_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("name", name="schema_migrations_pkey"),
    schema=PGFLOW_SA_SCHEMA,
)

#: pgflow-sa's schedules (sql/schedules.sql)
schedules = Table(
    "schedules",
    metadata,
    Column("name", Text, nullable=False),
    Column("flow_slug", Text, nullable=False),
    Column("cron", Text, nullable=False),
    Column("timezone", Text, nullable=False, server_default=text("'UTC'::text")),
    Column("input", JSONB),
    Column("input_function", Text),
    Column("catch_up", Text, nullable=False, server_default=text("'latest'::text")),
    Column("catch_up_limit", Integer, nullable=False, server_default=text("10")),
    Column("next_fire_at", _TS),
    Column("last_fired_tick", _TS),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", _TS, nullable=False, server_default=_NOW),
    Column("updated_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("name", name="schedules_pkey"),
    CheckConstraint(
        "catch_up = ANY (ARRAY['latest'::text, 'skip'::text, 'all'::text])",
        name="schedules_catch_up_check",
    ),
    CheckConstraint("catch_up_limit >= 1", name="schedules_catch_up_limit_check"),
    Index("idx_schedules_flow_slug", "flow_slug"),
    schema=PGFLOW_SA_SCHEMA,
    comment="pgflow-sa: v1 schedules (next_fire_at NULL: computed by the next worker that looks)",
)

schedule_runs = Table(
    "schedule_runs",
    metadata,
    Column("schedule_name", Text, nullable=False),
    Column("tick", _TS, nullable=False),
    Column("flow_slug", Text, nullable=False),
    Column("run_id", UUID(as_uuid=True)),
    Column("manual", Boolean, nullable=False, server_default=text("false")),
    Column("error", Text),
    Column("fired_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("schedule_name", "tick", name="schedule_runs_pkey"),
    Index("idx_schedule_runs_run_id", "run_id"),
    schema=PGFLOW_SA_SCHEMA,
    comment="pgflow-sa: v1 runs started by schedules",
)

#: pgflow-sa's run control (sql/run_control.sql)
run_cancellations = Table(
    "run_cancellations",
    metadata,
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("reason", Text),
    Column("cancelled_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("run_id", name="run_cancellations_pkey"),
    schema=PGFLOW_SA_SCHEMA,
    comment="pgflow-sa: v1 cancelled runs",
)

run_retries = Table(
    "run_retries",
    metadata,
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("retry_of", UUID(as_uuid=True), nullable=False),
    Column("reuse_outputs", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("run_id", name="run_retries_pkey"),
    Index("idx_run_retries_retry_of", "retry_of"),
    schema=PGFLOW_SA_SCHEMA,
    comment="pgflow-sa: v1 runs started by retry_run",
)

flow_limits = Table(
    "flow_limits",
    metadata,
    Column("flow_slug", Text, nullable=False),
    Column("max_concurrency", Integer),
    Column("max_running_runs", Integer),
    Column("step_limits", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("updated_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("flow_slug", name="flow_limits_pkey"),
    CheckConstraint("max_concurrency >= 1", name="flow_limits_max_concurrency_check"),
    CheckConstraint("max_running_runs >= 1", name="flow_limits_max_running_runs_check"),
    CheckConstraint(
        "jsonb_typeof(step_limits) = 'object'::text", name="flow_limits_step_limits_check"
    ),
    schema=PGFLOW_SA_SCHEMA,
    comment="pgflow-sa: v1 concurrency limits (written by workers)",
)

admitted_runs = Table(
    "admitted_runs",
    metadata,
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("flow_slug", Text, nullable=False),
    Column("admitted_at", _TS, nullable=False, server_default=_NOW),
    PrimaryKeyConstraint("run_id", name="admitted_runs_pkey"),
    Index("idx_admitted_runs_flow_slug", "flow_slug"),
    schema=PGFLOW_SA_SCHEMA,
    comment="pgflow-sa: v1 runs admitted under a run limit",
)

__all__ = [
    "RUN_STATUSES",
    "STEP_STATUSES",
    "TASK_STATUSES",
    "admitted_runs",
    "deps",
    "flow_limits",
    "flows",
    "metadata",
    "run_cancellations",
    "run_retries",
    "runs",
    "schedule_runs",
    "schedules",
    "schema_migrations",
    "step_states",
    "step_tasks",
    "steps",
    "workers",
]
