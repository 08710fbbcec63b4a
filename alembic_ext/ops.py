"""Alembic operations for pgflow: install the schema, create, drop and update flows.

Each has ``reverse()`` (downgrades) and ``to_diff_tuple()`` (``alembic check``).
Migrations call them as ``op.invoke(pgflow_ops.CreateFlowOp(...))``, which keeps
them type-checkable. Every operation is SQL text decided when the migration is
written (nothing is probed when it runs), sent as it is to the database online and
written out as it is offline (``alembic upgrade --sql``): both give the same schema.
Checks that guard data (runs of a dropped flow, objects depending on pgflow) are in
that SQL, so they hold offline too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

from alembic.operations import MigrateOperation, Operations
from alembic.util import CommandError

from pgflow_sa.exceptions import InstallError
from pgflow_sa.schedules.definition import definition_problem
from pgflow_sa.schema import installer
from pgflow_sa.schema.deploy import drop_flow_script, set_option_sql
from pgflow_sa.schema.schedules import alter_schedule_sql, create_schedule_sql, drop_schedule_sql
from pgflow_sa.schema.uninstall import uninstall_script

# a child of "alembic", so that the logging set up by alembic.ini shows it
logger = logging.getLogger("alembic.pgflow")

_OPTION_COLUMNS = {
    "max_attempts": "opt_max_attempts",
    "base_delay": "opt_base_delay",
    "timeout": "opt_timeout",
    "start_delay": "opt_start_delay",
}

PgmqSource = Literal["extension", "sql"]
#: pgmq=True, as migrations written by earlier versions say: installed the way the
#: server allows, found out when the migration runs (online only)
AUTO: Literal["auto"] = "auto"


PgmqArg = PgmqSource | Literal["auto"] | bool | None


def _pgmq_source(pgmq: PgmqArg) -> PgmqSource | Literal["auto"] | None:
    if pgmq is True or pgmq == AUTO:
        return AUTO
    if pgmq is False or pgmq is None:
        return None
    if pgmq not in ("extension", "sql"):
        raise ValueError(f"pgmq must be 'extension', 'sql', True or None, not {pgmq!r}")
    return pgmq


def _resolve_pgmq(
    operations: Operations, pgmq: PgmqSource | Literal["auto"] | None
) -> PgmqSource | None:
    """pgmq=True: as the database allows (nothing if pgmq is there, the extension if
    the server offers it, else the SQL-only pgmq)."""
    if pgmq != AUTO:
        return pgmq
    if operations.migration_context.as_sql:
        raise CommandError(
            "this migration says InstallPgflowOp(..., pgmq=True), which picks how to "
            "install pgmq from the database, and offline (--sql) there is none: write "
            "pgmq='extension' (CREATE EXTENSION pgmq) or pgmq='sql' (the SQL-only pgmq) "
            "in the migration"
        )
    found = installer.check(operations.get_bind()).pgmq
    if found.startswith(("extension", "sql-only")):
        return None
    return "extension" if "available as extension" in found else "sql"


class InstallPgflowOp(MigrateOperation):
    """Install pgmq (``pgmq``: ``"extension"``, ``"sql"`` for the SQL-only pgmq of the
    ``pgmq`` Python package, or None where pgmq is there), pgflow-sa's realtime.send
    (when ``realtime_send``, where no realtime.send exists) and the pgflow schema
    ``version``, recorded as ``pgflow-sa install`` records it; reversed by dropping
    what it installed. ``pgmq=True`` / ``False``, as migrations written by earlier
    versions say, mean ``"extension"`` / None."""

    def __init__(
        self,
        version: str,
        *,
        pgmq: PgmqArg = None,
        realtime_send: bool = True,
    ) -> None:
        self.version = version
        self.pgmq = _pgmq_source(pgmq)
        self.realtime_send = realtime_send

    def reverse(self) -> UninstallPgflowOp:
        return UninstallPgflowOp(self.version, pgmq=self.pgmq, realtime_send=self.realtime_send)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("install_pgflow", self.version)

    def scripts(self, pgmq: PgmqSource | None = None) -> list[str]:
        source = pgmq if self.pgmq == AUTO else self.pgmq
        return installer.install_script(
            self.version,
            pgmq=source,
            realtime_send=self.realtime_send,
        )


class UninstallPgflowOp(MigrateOperation):
    """Drop the pgflow schema (all flows and runs), and pgmq / realtime.send when
    ``pgmq`` / ``realtime_send`` say the matching install created them. Refuses while
    objects outside pgflow depend on it (an app's foreign key to pgflow.runs, a view
    over it), naming them, unless ``cascade`` (which drops those objects too)."""

    def __init__(
        self,
        version: str,
        *,
        pgmq: PgmqArg = None,
        realtime_send: bool = True,
        cascade: bool = False,
    ) -> None:
        self.version = version
        self.pgmq = _pgmq_source(pgmq)
        self.realtime_send = realtime_send
        self.cascade = cascade

    def reverse(self) -> InstallPgflowOp:
        return InstallPgflowOp(self.version, pgmq=self.pgmq, realtime_send=self.realtime_send)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("uninstall_pgflow", self.version)

    def scripts(self) -> list[str]:
        return [
            uninstall_script(
                pgmq=self.pgmq is not None, realtime_send=self.realtime_send, cascade=self.cascade
            )
        ]


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

    def scripts(self) -> list[str]:
        # the listed migrations start with PUBLISHER_UPDATE when our realtime.send is
        # outdated, and end with TABLES_UPDATE when pgflow-sa tables are missing
        # (the install script creates those where they are missing in any case)
        ours = (installer.PUBLISHER_UPDATE, installer.TABLES_UPDATE)
        return installer.install_script(
            self.version,
            pgmq=None,
            realtime_send=installer.PUBLISHER_UPDATE in self.migrations,
            only=[name for name in self.migrations if name not in ours],
        )


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

    def scripts(self) -> list[str]:
        return ["\n".join(self.statements)]


class DropFlowOp(MigrateOperation):
    """Delete a flow with its queue; ``statements`` recreate it on reverse. Refuses
    while the flow has runs, unless ``delete_runs`` (which deletes them)."""

    def __init__(self, flow_slug: str, statements: list[str], *, delete_runs: bool = False) -> None:
        self.flow_slug = flow_slug
        self.statements = list(statements)
        self.delete_runs = delete_runs

    def reverse(self) -> CreateFlowOp:
        return CreateFlowOp(self.flow_slug, self.statements)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("drop_flow", self.flow_slug)

    def scripts(self) -> list[str]:
        return [drop_flow_script(self.flow_slug, delete_runs=self.delete_runs)]


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

    def scripts(self) -> list[str]:
        column = _OPTION_COLUMNS[self.option]
        return [set_option_sql(self.flow_slug, self.step_slug, column, self.value)]

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (
            "set_flow_option",
            self.flow_slug,
            self.step_slug,
            self.option,
            self.previous,
            self.value,
        )


def _refuse_bad_schedule(name: str, columns: dict[str, Any]) -> None:
    """A definition workers could not fire is refused when the migration runs (online
    or ``--sql``), before anything is written; a drop is never refused."""
    problem = definition_problem(columns)
    if problem is not None:
        raise CommandError(
            f"schedule {name!r}: {problem}; correct the operation in the migration file"
        )


class _ScheduleDefinitionOp(MigrateOperation):
    """A schedule's whole definition (the columns of ``pgflow_sa.schedules`` code sets)."""

    def __init__(
        self,
        name: str,
        flow_slug: str,
        cron: str,
        *,
        timezone: str = "UTC",
        input: Any = None,
        input_function: str | None = None,
        catch_up: str = "latest",
        catch_up_limit: int = 10,
    ) -> None:
        self.name = name
        self.flow_slug = flow_slug
        self.cron = cron
        self.timezone = timezone
        self.input = input
        self.input_function = input_function
        self.catch_up = catch_up
        self.catch_up_limit = catch_up_limit

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flow_slug": self.flow_slug,
            "cron": self.cron,
            "timezone": self.timezone,
            "input": self.input,
            "input_function": self.input_function,
            "catch_up": self.catch_up,
            "catch_up_limit": self.catch_up_limit,
        }

    @classmethod
    def of(cls, definition: dict[str, Any]) -> Any:
        rest = {k: v for k, v in definition.items() if k not in ("name", "flow_slug", "cron")}
        return cls(definition["name"], definition["flow_slug"], definition["cron"], **rest)


class CreateScheduleOp(_ScheduleDefinitionOp):
    """Add a schedule to ``pgflow_sa.schedules`` (workers give it its next fire time)."""

    def reverse(self) -> DropScheduleOp:
        return DropScheduleOp.of(self.definition())  # type: ignore[no-any-return]

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("add_pgflow_schedule", self.name)

    def scripts(self) -> list[str]:
        _refuse_bad_schedule(self.name, self.definition())
        return [create_schedule_sql(self.definition())]


class DropScheduleOp(_ScheduleDefinitionOp):
    """Delete a schedule; the runs it started, and their records, stay."""

    def reverse(self) -> CreateScheduleOp:
        return CreateScheduleOp.of(self.definition())  # type: ignore[no-any-return]

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("remove_pgflow_schedule", self.name)

    def scripts(self) -> list[str]:
        return [drop_schedule_sql(self.name)]


class AlterScheduleOp(MigrateOperation):
    """Change columns of a schedule's definition (``changes``: column -> new value;
    ``previous``: the values it replaces). A new cron or time zone fires from the
    next tick after the migration."""

    def __init__(self, name: str, changes: dict[str, Any], *, previous: dict[str, Any]) -> None:
        self.name = name
        self.changes = dict(changes)
        self.previous = dict(previous)

    def reverse(self) -> AlterScheduleOp:
        return AlterScheduleOp(self.name, self.previous, previous=self.changes)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("modify_pgflow_schedule", self.name, self.previous, self.changes)

    def scripts(self) -> list[str]:
        _refuse_bad_schedule(self.name, self.changes)
        return [alter_schedule_sql(self.name, self.changes)]


def run_scripts(operations: Operations, scripts: Iterable[str]) -> None:
    """Send each script as it is: to the database online, to the output offline
    (``--sql``). A refusal raised by a script (a PL/pgSQL RAISE EXCEPTION) becomes
    Alembic's ``FAILED:`` line."""
    context = operations.migration_context
    if context.as_sql:
        for script in scripts:
            context.impl.static_output(script.strip())
        return
    conn = operations.get_bind()
    for script in scripts:
        try:
            installer.run_script(conn, script)
        except InstallError as exc:
            raise CommandError(str(exc)) from exc
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != "P0001":  # raise_exception
                raise
            diag = getattr(exc, "diag", None)  # psycopg; asyncpg has .message
            message = getattr(diag, "message_primary", None) or getattr(exc, "message", None)
            raise CommandError(str(message or exc).splitlines()[0]) from exc


def _run(operations: Operations, operation: Any) -> None:
    run_scripts(operations, operation.scripts())


@Operations.implementation_for(InstallPgflowOp)
def _install(operations: Operations, operation: InstallPgflowOp) -> None:
    run_scripts(operations, operation.scripts(_resolve_pgmq(operations, operation.pgmq)))


for _op in (
    UninstallPgflowOp,
    UpgradePgflowOp,
    CreateFlowOp,
    DropFlowOp,
    SetFlowOptionOp,
    CreateScheduleOp,
    DropScheduleOp,
    AlterScheduleOp,
):
    Operations.implementation_for(_op)(_run)


@Operations.implementation_for(KeepPgflowSchemaOp)
def _keep(operations: Operations, operation: KeepPgflowSchemaOp) -> None:
    message = (
        f"pgflow has no down migrations: the pgflow schema stays at {operation.version} "
        f"({len(operation.migrations)} migration(s) of this revision remain applied)"
    )
    logger.warning("%s", message)
    if operations.migration_context.as_sql:
        operations.migration_context.impl.static_output(f"-- {message}")
