"""The autogenerate comparator: registered flows against pgflow.flows/steps/deps."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alembic.autogenerate import comparators
from alembic.autogenerate.api import AutogenContext
from alembic.operations.ops import UpgradeOps
from alembic.util import CommandError

from pgflow_sa import (
    Flow,
    FlowRegistry,
    PgflowSaError,
    ScheduleConflictError,
    compile_flow,
    diff_shapes,
)
from pgflow_sa.compiler import compile_shape
from pgflow_sa.schema import LATEST_VERSION, SchemaState, check, list_flow_slugs, read_flow_shape
from pgflow_sa.schema.installer import PGMQ_MIN_VERSION, _version_tuple
from pgflow_sa.schema.schedules import (
    diff_schedules,
    owner_conflicts,
    read_definitions,
    schedules_installed,
)

from .ops import (
    AlterScheduleOp,
    CreateFlowOp,
    CreateScheduleOp,
    DropFlowOp,
    DropScheduleOp,
    InstallPgflowOp,
    PgmqSource,
    SetFlowOptionOp,
    UpgradePgflowOp,
)

# Alembic's own "Detected added table ..." lines come from this logger
log = logging.getLogger("alembic.autogenerate.compare")


class FlowStructureChangedError(PgflowSaError, CommandError):
    """A flow's steps changed in code; pgflow flows cannot change shape in place.

    An Alembic ``CommandError``: the ``alembic`` command prints it as one ``FAILED:``
    line, without a traceback."""


class ScheduleNameTakenError(ScheduleConflictError, CommandError):
    """A schedule in code has the name of another flow's stored schedule: the
    migration would be refused when it runs, so none is written.

    An Alembic ``CommandError``: the ``alembic`` command prints it as one ``FAILED:``
    line, without a traceback."""


@dataclass
class _Registration:
    registry: FlowRegistry | None = None
    drop_unregistered: bool = False
    recreate: set[str] = field(default_factory=set)
    install_schema: bool = True


_registration = _Registration()


def register_flows(
    flows: FlowRegistry | Flow | list[Flow],
    *,
    install_schema: bool = True,
    drop_unregistered: bool = False,
    recreate: set[str] | list[str] | tuple[str, ...] = (),
) -> None:
    """Tell autogenerate which flows the app has. Call once in env.py.

    ``install_schema``: emit the pgflow schema install where it is missing.
    ``drop_unregistered``: emit drops for flows in the database that are not
    registered (off by default: a drop deletes their runs).
    ``recreate``: slugs of flows whose structure may be changed by dropping and
    recreating them (deletes their runs); otherwise a structural change is an error.
    """
    _registration.registry = FlowRegistry.of(flows)
    _registration.install_schema = install_schema
    _registration.drop_unregistered = drop_unregistered
    _registration.recreate = set(recreate)


def _structure_error(slug: str, lines: list[str]) -> FlowStructureChangedError:
    return FlowStructureChangedError(
        f"flow {slug!r} changed structure ({'; '.join(lines)}), and pgflow flows are "
        "immutable: their steps, dependencies and step types cannot change in place. "
        f"Either give the new version a new slug (e.g. {slug}_v2) and keep the old one "
        "until its runs are done, or opt in to dropping and recreating it, which deletes "
        f"its runs: alembic_ext.register_flows(..., recreate={{{slug!r}}})"
    )


_TYPE = "pgflow_flow"  # the object type include_name / include_object hooks receive

#: The schemas pgflow-sa installs or uses (Supabase has its own ``realtime``).
PGFLOW_SCHEMAS = frozenset({"pgflow", "pgflow_sa", "pgmq", "realtime"})


def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """An ``include_name`` hook for env.py that leaves :data:`PGFLOW_SCHEMAS` out of
    Alembic's own comparison. Needed with ``include_schemas=True``: Alembic would
    otherwise find pgflow's and pgmq's tables missing from the app's metadata and
    write drops for them. pgflow flows are compared all the same."""
    return not (type_ == "schema" and name in PGFLOW_SCHEMAS)


def _include_name(autogen_context: AutogenContext, slug: str) -> bool:
    # Alembic types these hooks for its own object kinds; pgflow flows are another
    return autogen_context.run_name_filters(slug, _TYPE, {"schema_name": "pgflow"})  # type: ignore[arg-type]


def _include_object(autogen_context: AutogenContext, flow: Flow, reflected: bool) -> bool:
    return autogen_context.run_object_filters(flow, flow.slug, _TYPE, reflected, None)  # type: ignore[arg-type]


def _pgmq_source(described: str) -> PgmqSource | None:
    """How the install op gets pgmq, from ``SchemaStatus.pgmq``: the extension where
    the server offers pgmq >= 1.5, else the SQL-only pgmq; None where pgmq is there."""
    if not described.startswith("missing"):
        return None
    available = described.removeprefix("missing (available as extension ").rstrip(")")
    if available != described and _version_tuple(available) >= PGMQ_MIN_VERSION:
        return "extension"
    return "sql"


def _detected(message: str, *args: object) -> None:
    log.info("Detected " + message, *args)


# Registered under the default qualifier, checking the dialect itself: on Alembic
# before 1.18 a "postgresql"-qualified "schema" comparator would replace Alembic's
# own table comparison instead of running beside it.
@comparators.dispatch_for("schema")
def compare_pgflow(autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: Any) -> None:
    registry = _registration.registry
    conn = autogen_context.connection
    if registry is None or conn is None or conn.dialect.name != "postgresql":
        return
    ops: list[Any] = []
    status = check(conn)
    installed = status.state is not SchemaState.MISSING
    if not installed:
        if not _registration.install_schema:
            return
        install = InstallPgflowOp(
            LATEST_VERSION,
            pgmq=_pgmq_source(status.pgmq),
            realtime_send=status.realtime_send == "missing",
        )
        extras = [
            {None: "", "extension": "the pgmq extension", "sql": "the SQL-only pgmq"}[install.pgmq],
            "pgflow-sa's realtime.send" if install.realtime_send else "",
        ]
        extra = " and ".join(e for e in extras if e)
        _detected(
            "pgflow install (pgflow %s)%s", install.version, f" with {extra}" if extra else ""
        )
        ops.append(install)
    elif (
        status.state is SchemaState.OUTDATED
        and status.managed_by == "pgflow-sa"  # another tool's schema is that tool's to upgrade
        and _registration.install_schema
    ):
        _detected(
            "pgflow upgrade (pgflow %s -> %s, %d pending)",
            status.installed_version or "older",
            LATEST_VERSION,
            len(status.pending),
        )
        ops.append(
            UpgradePgflowOp(
                LATEST_VERSION, previous=status.installed_version, migrations=status.pending
            )
        )
    for flow in registry:
        if not _include_name(autogen_context, flow.slug):
            continue
        stored = read_flow_shape(conn, flow.slug) if installed else None
        if not _include_object(autogen_context, flow, stored is not None):
            continue
        if stored is None:
            _detected("added pgflow flow %r", flow.slug)
            ops.append(CreateFlowOp(flow.slug, compile_flow(flow)))
            continue
        diff = diff_shapes(flow.shape(), stored)
        if diff.structural:
            if flow.slug not in _registration.recreate:
                raise _structure_error(flow.slug, list(diff.structural))
            # recreate= is the opt-in to deleting the runs, written into the migration
            _detected(
                "removed pgflow flow %r (to recreate it: %s)",
                flow.slug,
                "; ".join(diff.structural),
            )
            ops.append(DropFlowOp(flow.slug, compile_shape(stored), delete_runs=True))
            _detected("added pgflow flow %r", flow.slug)
            ops.append(CreateFlowOp(flow.slug, compile_flow(flow)))
            continue
        for change in diff.options:
            _detected(
                "changed option %s of %spgflow flow %r: %r -> %r",
                change.option,
                f"step {change.step!r} of " if change.step else "",
                flow.slug,
                change.database,
                change.code,
            )
            ops.append(
                SetFlowOptionOp(flow.slug, change.step, change.option, change.code, change.database)
            )
    if installed and _registration.drop_unregistered:
        for slug in list_flow_slugs(conn):
            if slug in registry or not _include_name(autogen_context, slug):
                continue
            stored = read_flow_shape(conn, slug)
            assert stored is not None
            # drop_unregistered= is the opt-in to deleting the runs
            _detected("removed pgflow flow %r (not registered)", slug)
            ops.append(DropFlowOp(slug, compile_shape(stored), delete_runs=True))
    if any(isinstance(op, (InstallPgflowOp, UpgradePgflowOp)) for op in ops) or (
        installed and schedules_installed(conn)
    ):  # else there is no schedules table, nor one coming (install_schema=False)
        ops += _compare_schedules(autogen_context, registry)
    upgrade_ops.ops.extend(ops)


def _compare_schedules(autogen_context: AutogenContext, registry: FlowRegistry) -> list[Any]:
    """The schedules of the registered flows against ``pgflow_sa.schedules`` (a
    database without that table has none yet: the install or upgrade op adds it)."""
    conn = autogen_context.connection
    assert conn is not None
    flows = [f for f in registry if _include_name(autogen_context, f.slug)]
    code = [s.stored() for f in flows for s in f.schedules]
    slugs = [f.slug for f in flows]
    installed = schedules_installed(conn)
    stored = read_definitions(conn, slugs) if installed else []
    diff = diff_schedules(code, stored)
    taken = owner_conflicts(conn, diff.added) if installed else []
    if taken:
        raise ScheduleNameTakenError("no migration was written: " + "; ".join(taken))
    ops: list[Any] = []
    for added in diff.added:
        _detected(
            "added pgflow schedule %r (flow %r, %r in %s)",
            added["name"],
            added["flow_slug"],
            added["cron"],
            added["timezone"],
        )
        ops.append(CreateScheduleOp.of(added))
    for change in diff.changed:
        for column, value in change.changes.items():
            _detected(
                "changed %s of pgflow schedule %r: %r -> %r",
                column,
                change.name,
                change.previous[column],
                value,
            )
        ops.append(AlterScheduleOp(change.name, change.changes, previous=change.previous))
    for removed in diff.removed:
        _detected("removed pgflow schedule %r", removed["name"])
        ops.append(DropScheduleOp.of(removed))
    return ops
