"""Create flows in the database from their compiled SQL."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection

from ..compiler import compile_flow
from ..dsl import Flow
from ..exceptions import PgflowSaError
from ..shape import diff_shapes
from .shapes import read_flow_shape


class FlowConflictError(PgflowSaError):
    """A flow in the database differs from the code."""


@dataclass
class DeployReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def deploy_flows(conn: Connection, flows: Iterable[Flow]) -> DeployReport:
    """Create the missing flows in the connection's transaction; refuse (before creating
    anything) when a flow in the database differs from the code."""
    report = DeployReport()
    to_create: list[Flow] = []
    conflicts: list[str] = []
    for flow in flows:
        stored = read_flow_shape(conn, flow.slug)
        if stored is None:
            to_create.append(flow)
            continue
        diff = diff_shapes(flow.shape(), stored)
        if diff:
            conflicts += [f"{flow.slug}: {line}" for line in diff.describe()]
        else:
            report.unchanged.append(flow.slug)
    if conflicts:
        raise FlowConflictError(
            "flows in the database differ from the code, nothing was deployed: "
            + "; ".join(conflicts)
            + ". Deploy the changed flow under a new slug (e.g. my_flow_v2), or change "
            "options with an Alembic migration"
        )
    for flow in to_create:
        for statement in compile_flow(flow):
            conn.exec_driver_sql(statement)
        report.created.append(flow.slug)
    return report
