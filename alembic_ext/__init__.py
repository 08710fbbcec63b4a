"""Alembic integration for pgflow-sa: autogenerate installs pgflow and picks up flows.

In env.py::

    import alembic_ext
    from myapp.flows import registry

    alembic_ext.register_flows(registry)

Importing this package registers the comparator, operations and renderers
(once per process). It depends on pgflow_sa; pgflow_sa never imports it.
"""

from __future__ import annotations

from . import render as _render  # noqa: F401  (registers the renderers)
from .comparator import (
    PGFLOW_SCHEMAS,
    FlowStructureChangedError,
    ScheduleNameTakenError,
    compare_pgflow,
    include_name,
    register_flows,
)
from .ops import (
    AlterScheduleOp,
    CreateFlowOp,
    CreateScheduleOp,
    DropFlowOp,
    DropScheduleOp,
    InstallPgflowOp,
    KeepPgflowSchemaOp,
    SetFlowOptionOp,
    UninstallPgflowOp,
    UpgradePgflowOp,
)

__all__ = [
    "PGFLOW_SCHEMAS",
    "AlterScheduleOp",
    "CreateFlowOp",
    "CreateScheduleOp",
    "DropFlowOp",
    "DropScheduleOp",
    "FlowStructureChangedError",
    "InstallPgflowOp",
    "KeepPgflowSchemaOp",
    "ScheduleNameTakenError",
    "SetFlowOptionOp",
    "UninstallPgflowOp",
    "UpgradePgflowOp",
    "compare_pgflow",
    "include_name",
    "register_flows",
]
