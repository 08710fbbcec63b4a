"""pgflow-sa: pgflow (PostgreSQL + pgmq workflows) as a SQLAlchemy 2 / Alembic toolkit."""

from __future__ import annotations

from .client import Run, RunStatus, get_run, get_run_async, start_flow, start_flow_async
from .compiler import compile_flow
from .config import resolve_database_url, to_libpq_url, to_sqlalchemy_url
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
    SchemaFilesMissingError,
)
from .registry import FlowRegistry, load_registry
from .schema import (
    LATEST_VERSION,
    SchemaState,
    SchemaStatus,
    check_schema,
    functions,
    install_schema,
    tables,
)
from .shape import FlowShape, ShapeDiff, StepShape, diff_shapes

__version__ = "0.1.0"

__all__ = [
    "LATEST_VERSION",
    "ConfigurationError",
    "Context",
    "DatabaseUnavailableError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "Flow",
    "FlowDefinitionError",
    "FlowNotFoundError",
    "FlowRegistry",
    "FlowShape",
    "InstallError",
    "InvalidInputError",
    "PgflowSaError",
    "Run",
    "RunStatus",
    "SchemaFilesMissingError",
    "SchemaState",
    "SchemaStatus",
    "ShapeDiff",
    "StepDefinition",
    "StepShape",
    "__version__",
    "check_schema",
    "compile_flow",
    "diff_shapes",
    "functions",
    "get_run",
    "get_run_async",
    "install_schema",
    "load_registry",
    "resolve_database_url",
    "start_flow",
    "start_flow_async",
    "tables",
    "to_libpq_url",
    "to_sqlalchemy_url",
]
