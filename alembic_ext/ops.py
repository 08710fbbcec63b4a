"""Alembic operations for pgflow: install the schema, create, drop and update flows.

Each has ``reverse()`` (downgrades) and ``to_diff_tuple()`` (``alembic check``).
Migrations call them as ``op.invoke(pgflow_ops.CreateFlowOp(...))``, which keeps
them type-checkable.
"""

from __future__ import annotations

import logging
from typing import Any

from alembic.operations import MigrateOperation, Operations

from pgflow_sa.schema import installer
from pgflow_sa.schema.deploy import drop_flow, run_compiled
from pgflow_sa.schema.uninstall import uninstall

# a child of "alembic", so that the logging set up by alembic.ini shows it
logger = logging.getLogger("alembic.pgflow")

_OPTION_COLUMNS = {
    "max_attempts": "opt_max_attempts",
    "base_delay": "opt_base_delay",
    "timeout": "opt_timeout",
    "start_delay": "opt_start_delay",
}


class InstallPgflowOp(MigrateOperation):
    """Install pgmq (when ``pgmq``), realtime.send (when ``realtime_send``) and the
    pgflow schema ``version``; reversed by dropping what it installed."""

    def __init__(self, version: str, *, pgmq: bool = True, realtime_send: bool = True) -> None:
        self.version = version
        self.pgmq = pgmq
        self.realtime_send = realtime_send

    def reverse(self) -> UninstallPgflowOp:
        return UninstallPgflowOp(self.version, pgmq=self.pgmq, realtime_send=self.realtime_send)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("install_pgflow", self.version)


class UninstallPgflowOp(MigrateOperation):
    """Drop the pgflow schema (all flows and runs), and pgmq / realtime.send when
    ``pgmq`` / ``realtime_send`` say the matching install created them."""

    def __init__(self, version: str, *, pgmq: bool = True, realtime_send: bool = True) -> None:
        self.version = version
        self.pgmq = pgmq
        self.realtime_send = realtime_send

    def reverse(self) -> InstallPgflowOp:
        return InstallPgflowOp(self.version, pgmq=self.pgmq, realtime_send=self.realtime_send)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("uninstall_pgflow", self.version)


class UpgradePgflowOp(MigrateOperation):
    """Apply the pinned pgflow migrations a pgflow-sa install lacks (``migrations``,
    in order), bringing the schema from ``previous`` to ``version``. pgflow ships no
    down migrations, so its reverse keeps the schema as it is (and says so)."""

    def __init__(
        self, version: str, *, previous: str | None, migrations: list[str] | tuple[str, ...]
    ) -> None:
        if not migrations:
            raise ValueError("UpgradePgflowOp needs the migrations it applies")
        self.version = version
        self.previous = previous
        self.migrations = list(migrations)

    def reverse(self) -> KeepPgflowSchemaOp:
        return KeepPgflowSchemaOp(self.version, previous=self.previous, migrations=self.migrations)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("upgrade_pgflow", self.previous, self.version, tuple(self.migrations))


class KeepPgflowSchemaOp(MigrateOperation):
    """The downgrade of :class:`UpgradePgflowOp`: pgflow has no down migrations, so
    the schema stays at ``version``; running it logs a warning and changes nothing."""

    def __init__(
        self, version: str, *, previous: str | None, migrations: list[str] | tuple[str, ...]
    ) -> None:
        self.version = version
        self.previous = previous
        self.migrations = list(migrations)

    def reverse(self) -> UpgradePgflowOp:
        return UpgradePgflowOp(self.version, previous=self.previous, migrations=self.migrations)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("keep_pgflow_schema", self.version)


class CreateFlowOp(MigrateOperation):
    """Create a flow from its compiled statements (``pgflow_sa.compile_flow``)."""

    def __init__(self, flow_slug: str, statements: list[str]) -> None:
        self.flow_slug = flow_slug
        self.statements = list(statements)

    def reverse(self) -> DropFlowOp:
        return DropFlowOp(self.flow_slug, self.statements)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("create_flow", self.flow_slug)


class DropFlowOp(MigrateOperation):
    """Delete a flow with its runs and queue; ``statements`` recreate it on reverse."""

    def __init__(self, flow_slug: str, statements: list[str]) -> None:
        self.flow_slug = flow_slug
        self.statements = list(statements)

    def reverse(self) -> CreateFlowOp:
        return CreateFlowOp(self.flow_slug, self.statements)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("drop_flow", self.flow_slug)


class SetFlowOptionOp(MigrateOperation):
    """Change one option of a flow (``step_slug`` None) or of a step, in place."""

    def __init__(
        self,
        flow_slug: str,
        step_slug: str | None,
        option: str,
        value: int | None,
        previous: int | None,
    ) -> None:
        if option not in _OPTION_COLUMNS or (step_slug is None and option == "start_delay"):
            raise ValueError(f"{option!r} is not a pgflow {'step' if step_slug else 'flow'} option")
        self.flow_slug = flow_slug
        self.step_slug = step_slug
        self.option = option
        self.value = value
        self.previous = previous

    def reverse(self) -> SetFlowOptionOp:
        return SetFlowOptionOp(
            self.flow_slug, self.step_slug, self.option, self.previous, self.value
        )

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (
            "set_flow_option",
            self.flow_slug,
            self.step_slug,
            self.option,
            self.previous,
            self.value,
        )


@Operations.implementation_for(InstallPgflowOp)
def _install(operations: Operations, operation: InstallPgflowOp) -> None:
    installer.install(operations.get_bind(), operation.version)


@Operations.implementation_for(UninstallPgflowOp)
def _uninstall(operations: Operations, operation: UninstallPgflowOp) -> None:
    uninstall(operations.get_bind(), pgmq=operation.pgmq, realtime_send=operation.realtime_send)


@Operations.implementation_for(UpgradePgflowOp)
def _upgrade(operations: Operations, operation: UpgradePgflowOp) -> None:
    installer.install(operations.get_bind(), operation.version, upto=operation.migrations[-1])


@Operations.implementation_for(KeepPgflowSchemaOp)
def _keep(operations: Operations, operation: KeepPgflowSchemaOp) -> None:
    logger.warning(
        "pgflow has no down migrations: the pgflow schema stays at %s (%d migration(s) "
        "of this revision remain applied)",
        operation.version,
        len(operation.migrations),
    )


@Operations.implementation_for(CreateFlowOp)
def _create(operations: Operations, operation: CreateFlowOp) -> None:
    run_compiled(operations.get_bind(), operation.statements)


@Operations.implementation_for(DropFlowOp)
def _drop(operations: Operations, operation: DropFlowOp) -> None:
    drop_flow(operations.get_bind(), operation.flow_slug)


@Operations.implementation_for(SetFlowOptionOp)
def _set_option(operations: Operations, operation: SetFlowOptionOp) -> None:
    from pgflow_sa.schema.deploy import set_option

    set_option(
        operations.get_bind(),
        operation.flow_slug,
        operation.step_slug,
        _OPTION_COLUMNS[operation.option],
        operation.value,
    )
