"""pgflow-sa: pgflow (PostgreSQL + pgmq workflows) as a SQLAlchemy 2 / Alembic toolkit."""

from __future__ import annotations

from .client import (
    flow_status,
    flow_status_async,
    get_run,
    get_run_async,
    list_runs,
    list_runs_async,
    start_flow,
    start_flow_async,
    start_flows,
    start_flows_async,
)
from .compiler import compile_flow
from .config import (
    async_engine_from_url,
    get_database_url,
    resolve_database_url,
    to_libpq_url,
    to_sqlalchemy_url,
)
from .context import Context
from .dsl import Flow, StepDefinition
from .embedded import EmbeddedServer
from .exceptions import (
    ConfigurationError,
    DatabaseUnavailableError,
    EmbeddedServerError,
    FlowDefinitionError,
    FlowNotFoundError,
    InstallError,
    InvalidInputError,
    PgflowSaError,
    RunNotFoundError,
    RunTimeoutError,
    ScheduleConflictError,
    ScheduleNotFoundError,
    SchemaFilesMissingError,
)
from .models import (
    FlowStatus,
    Run,
    RunEvent,
    RunPage,
    RunStatus,
    StepState,
    StepStatus,
    StepTask,
    TaskStatus,
)
from .registry import FlowRegistry, load_registry
from .schedules import Schedule
from .schedules.firing import FiredTick, fire_due_schedules
from .schedules.manage import (
    ScheduleInfo,
    list_schedules,
    pause_schedule,
    resume_schedule,
    sync_schedules,
    trigger_schedule,
)
from .schema import (
    LATEST_VERSION,
    SchemaState,
    SchemaStatus,
    check_schema,
    functions,
    install_schema,
    tables,
)
from .schema.deploy import DeployReport, FlowConflictError, deploy_flows
from .shape import FlowShape, ShapeDiff, StepShape, diff_shapes
from .waiting import (
    RunWatcher,
    start_flow_and_wait,
    start_flow_and_wait_async,
    wait_for_run,
    wait_for_run_async,
    watch_run,
)

__version__ = "0.1.0"

__all__ = [
    "LATEST_VERSION",
    "ConfigurationError",
    "Context",
    "DatabaseUnavailableError",
    "DeployReport",
    "EmbeddedServer",
    "EmbeddedServerError",
    "FiredTick",
    "Flow",
    "FlowConflictError",
    "FlowDefinitionError",
    "FlowNotFoundError",
    "FlowRegistry",
    "FlowShape",
    "FlowStatus",
    "InstallError",
    "InvalidInputError",
    "PgflowSaError",
    "Run",
    "RunEvent",
    "RunNotFoundError",
    "RunPage",
    "RunStatus",
    "RunTimeoutError",
    "RunWatcher",
    "Schedule",
    "ScheduleConflictError",
    "ScheduleInfo",
    "ScheduleNotFoundError",
    "SchemaFilesMissingError",
    "SchemaState",
    "SchemaStatus",
    "ShapeDiff",
    "StepDefinition",
    "StepShape",
    "StepState",
    "StepStatus",
    "StepTask",
    "TaskStatus",
    "__version__",
    "async_engine_from_url",
    "check_schema",
    "compile_flow",
    "deploy_flows",
    "diff_shapes",
    "fire_due_schedules",
    "flow_status",
    "flow_status_async",
    "functions",
    "get_database_url",
    "get_run",
    "get_run_async",
    "install_schema",
    "list_runs",
    "list_runs_async",
    "list_schedules",
    "load_registry",
    "pause_schedule",
    "resolve_database_url",
    "resume_schedule",
    "start_flow",
    "start_flow_and_wait",
    "start_flow_and_wait_async",
    "start_flow_async",
    "start_flows",
    "start_flows_async",
    "sync_schedules",
    "tables",
    "to_libpq_url",
    "to_sqlalchemy_url",
    "trigger_schedule",
    "wait_for_run",
    "wait_for_run_async",
    "watch_run",
]
