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


@renderers.dispatch_for(InstallPgflowOp)
def _render_install(autogen_context: AutogenContext, op: InstallPgflowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.InstallPgflowOp({op.version!r}, pgmq={op.pgmq!r}, "
        f"realtime_send={op.realtime_send!r}))"
    )


@renderers.dispatch_for(UninstallPgflowOp)
def _render_uninstall(autogen_context: AutogenContext, op: UninstallPgflowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.UninstallPgflowOp({op.version!r}, pgmq={op.pgmq!r}, "
        f"realtime_send={op.realtime_send!r}))"
    )


@renderers.dispatch_for(CreateFlowOp)
def _render_create(autogen_context: AutogenContext, op: CreateFlowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.invoke(pgflow_ops.CreateFlowOp({op.flow_slug!r}, {_statements(op.statements)}))"


@renderers.dispatch_for(DropFlowOp)
def _render_drop(autogen_context: AutogenContext, op: DropFlowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.invoke(pgflow_ops.DropFlowOp({op.flow_slug!r}, {_statements(op.statements)}))"


@renderers.dispatch_for(SetFlowOptionOp)
def _render_option(autogen_context: AutogenContext, op: SetFlowOptionOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.SetFlowOptionOp({op.flow_slug!r}, {op.step_slug!r}, "
        f"{op.option!r}, {op.value!r}, previous={op.previous!r}))"
    )


@renderers.dispatch_for(UpgradePgflowOp)
def _render_upgrade(autogen_context: AutogenContext, op: UpgradePgflowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.UpgradePgflowOp({op.version!r}, previous={op.previous!r}, "
        f"migrations={_statements(op.migrations)}))"
    )


@renderers.dispatch_for(KeepPgflowSchemaOp)
def _render_keep(autogen_context: AutogenContext, op: KeepPgflowSchemaOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.KeepPgflowSchemaOp({op.version!r}, previous={op.previous!r}, "
        f"migrations={_statements(op.migrations)}))"
    )
