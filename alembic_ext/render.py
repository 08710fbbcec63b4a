"""Render pgflow operations into migration files as typed ``op.invoke(...)`` calls."""

from __future__ import annotations

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext

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

_IMPORT = "from alembic_ext import ops as pgflow_ops"


def _statements(statements: list[str]) -> str:
    inner = "".join(f"\n        {s!r}," for s in statements)
    return f"[{inner}\n    ]"


def _render_install(autogen_context: AutogenContext, op: InstallPgflowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.InstallPgflowOp({op.version!r}, pgmq={op.pgmq!r}, "
        f"realtime_send={op.realtime_send!r}))"
    )


def _render_uninstall(autogen_context: AutogenContext, op: UninstallPgflowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    # cascade is always written out: the opt-in is there to be seen and changed
    return (
        f"op.invoke(pgflow_ops.UninstallPgflowOp({op.version!r}, pgmq={op.pgmq!r}, "
        f"realtime_send={op.realtime_send!r}, cascade={op.cascade!r}))"
    )


def _render_upgrade(
    autogen_context: AutogenContext, op: UpgradePgflowOp | KeepPgflowSchemaOp
) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.{type(op).__name__}({op.version!r}, previous={op.previous!r}, "
        f"migrations={_statements(op.migrations)}))"
    )


def _render_create(autogen_context: AutogenContext, op: CreateFlowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return f"op.invoke(pgflow_ops.CreateFlowOp({op.flow_slug!r}, {_statements(op.statements)}))"


def _render_drop(autogen_context: AutogenContext, op: DropFlowOp) -> str:
    autogen_context.imports.add(_IMPORT)
    # delete_runs is always written out: the opt-in is there to be seen and changed
    return (
        f"op.invoke(pgflow_ops.DropFlowOp({op.flow_slug!r}, {_statements(op.statements)}, "
        f"delete_runs={op.delete_runs!r}))"
    )


renderers.dispatch_for(InstallPgflowOp)(_render_install)
renderers.dispatch_for(UninstallPgflowOp)(_render_uninstall)
# an upgrade and its reverse share one renderer
renderers.dispatch_for(UpgradePgflowOp)(_render_upgrade)
renderers.dispatch_for(KeepPgflowSchemaOp)(_render_upgrade)
renderers.dispatch_for(CreateFlowOp)(_render_create)
renderers.dispatch_for(DropFlowOp)(_render_drop)


@renderers.dispatch_for(SetFlowOptionOp)
def _render_option(autogen_context: AutogenContext, op: SetFlowOptionOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.SetFlowOptionOp({op.flow_slug!r}, {op.step_slug!r}, "
        f"{op.option!r}, {op.value!r}, previous={op.previous!r}))"
    )


def _render_schedule(autogen_context: AutogenContext, op: CreateScheduleOp | DropScheduleOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.{type(op).__name__}({op.name!r}, {op.flow_slug!r}, {op.cron!r}, "
        f"timezone={op.timezone!r}, input={op.input!r}, input_function={op.input_function!r}, "
        f"catch_up={op.catch_up!r}, catch_up_limit={op.catch_up_limit!r}))"
    )


renderers.dispatch_for(CreateScheduleOp)(_render_schedule)
renderers.dispatch_for(DropScheduleOp)(_render_schedule)


@renderers.dispatch_for(AlterScheduleOp)
def _render_alter_schedule(autogen_context: AutogenContext, op: AlterScheduleOp) -> str:
    autogen_context.imports.add(_IMPORT)
    return (
        f"op.invoke(pgflow_ops.AlterScheduleOp({op.name!r}, {op.changes!r}, "
        f"previous={op.previous!r}))"
    )
