"""The schema layer: typed tables, function wrappers and the installer.

All SQL that pgflow-sa sends lives in this package.
"""

from . import functions, tables
from .installer import (
    InstallReport,
    SchemaState,
    SchemaStatus,
    check,
    check_schema,
    install,
    install_schema,
)
from .migrations import LATEST_VERSION, PINNED_VERSIONS, Migration, migrations
from .names import NOTIFY_CHANNEL, PGFLOW_SA_SCHEMA, PGFLOW_SCHEMA, PGMQ_SCHEMA
from .roles import RoleError, RolesReport, grant_roles, grant_statements
from .shapes import list_flow_slugs, read_flow_shape, read_flow_shape_async

__all__ = [
    "LATEST_VERSION",
    "NOTIFY_CHANNEL",
    "PGFLOW_SA_SCHEMA",
    "PGFLOW_SCHEMA",
    "PGMQ_SCHEMA",
    "PINNED_VERSIONS",
    "InstallReport",
    "Migration",
    "RoleError",
    "RolesReport",
    "SchemaState",
    "SchemaStatus",
    "check",
    "check_schema",
    "functions",
    "grant_roles",
    "grant_statements",
    "install",
    "install_schema",
    "list_flow_slugs",
    "migrations",
    "read_flow_shape",
    "read_flow_shape_async",
    "tables",
]
