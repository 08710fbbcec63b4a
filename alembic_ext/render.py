"""Render pgflow operations into migration files as typed ``op.invoke(...)`` calls."""

from __future__ import annotations

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext

from .ops import (
    CreateFlowOp,
    DropFlowOp,
    InstallPgflowOp,
    KeepPgflowSchemaOp,
    SetFlowOptionOp,
    UninstallPgflowOp,
    UpgradePgflowOp,
)

_IMPORT = "from alembic_ext import ops as pgflow_ops"


def _statements(statements: list[str]) -> str:
    inner = "".join(f"\n        {s!r}," for s in statements)
    return f"[{inner}\n    ]"


def _render_schema_op(
    autogen_context: AutogenContext, op: InstallPgflowOp | UninstallPgflowOp
) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.{type(op).__name__}({op.version!r}, pgmq={op.pgmq!r}, "
        f"realtime_send={op.realtime_send!r}))"
    )


def _render_upgrade(
    autogen_context: AutogenContext, op: UpgradePgflowOp | KeepPgflowSchemaOp
) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.{type(op).__name__}({op.version!r}, previous={op.previous!r}, "
        f"migrations={_statements(op.migrations)}))"
    )


def _render_flow(autogen_context: AutogenContext, op: CreateFlowOp | DropFlowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.{type(op).__name__}({op.flow_slug!r}, {_statements(op.statements)}))"
    )


# each pair of an operation and its reverse shares one renderer
renderers.dispatch_for(InstallPgflowOp)(_render_schema_op)
renderers.dispatch_for(UninstallPgflowOp)(_render_schema_op)
renderers.dispatch_for(UpgradePgflowOp)(_render_upgrade)
renderers.dispatch_for(KeepPgflowSchemaOp)(_render_upgrade)
renderers.dispatch_for(CreateFlowOp)(_render_flow)
renderers.dispatch_for(DropFlowOp)(_render_flow)


@renderers.dispatch_for(SetFlowOptionOp)
def _render_option(autogen_context: AutogenContext, op: SetFlowOptionOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.SetFlowOptionOp({op.flow_slug!r}, {op.step_slug!r}, "
        f"{op.option!r}, {op.value!r}, previous={op.previous!r}))"
    )
