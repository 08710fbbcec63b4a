"""pgflow-sa: pgflow (PostgreSQL + pgmq workflows) as a SQLAlchemy 2 / Alembic toolkit."""

from __future__ import annotations

from .config import resolve_database_url, to_libpq_url, to_sqlalchemy_url
from .embedded import EmbeddedServer
from .exceptions import (
    ConfigurationError,
    DatabaseUnavailableError,
    EmbeddedServerError,
    InstallError,
    PgflowSaError,
    SchemaFilesMissingError,
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

__version__ = "0.1.0"

__all__ = [
    "LATEST_VERSION",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "InstallError",
    "PgflowSaError",
    "SchemaFilesMissingError",
    "SchemaState",
    "SchemaStatus",
    "__version__",
    "check_schema",
    "functions",
    "install_schema",
    "resolve_database_url",
    "tables",
    "to_libpq_url",
    "to_sqlalchemy_url",
]
