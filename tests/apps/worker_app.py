"""Flows served by `pgflow-sa worker` subprocesses in the tests. Every handler records
its execution in the `executions` table through ctx.session, so a row exists
exactly when the task's completion committed."""

from __future__ import annotations

import os
import time
from typing import Any

import sqlalchemy as sa

from pgflow_sa import Context, Flow, FlowRegistry

executions = sa.table(
    "executions",
    sa.column("run_id", sa.Uuid),
    sa.column("step_slug", sa.Text),
    sa.column("task_index", sa.Integer),
    sa.column("pid", sa.Integer),
)
SLEEP = float(os.environ.get("TEST_STEP_SLEEP", "0"))


def _record(ctx: Context) -> None:
    ctx.session.execute(
        sa.insert(executions).values(
            run_id=ctx.run_id, step_slug=ctx.step_slug, task_index=ctx.task_index, pid=os.getpid()
        )
    )


durable = Flow("durable", timeout=3, base_delay=1, max_attempts=5)


@durable.step
def prepare(input: Any, ctx: Context) -> list[int]:
    _record(ctx)
    time.sleep(SLEEP)
    return list(range(input["items"]))


@durable.map(depends_on=prepare)
def handle(item: int, ctx: Context) -> int:
    _record(ctx)
    time.sleep(SLEEP)
    return item * 2


@durable.step(depends_on=[handle])
def total(input: Any, ctx: Context) -> int:
    _record(ctx)
    return sum(input["handle"])


flows = FlowRegistry(durable)

EXECUTIONS_DDL = (
    "CREATE TABLE executions (run_id uuid, step_slug text, task_index int, pid int, "
    "at timestamptz DEFAULT clock_timestamp())"
)
