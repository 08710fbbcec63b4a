"""The flow served by the `pgflow-sa worker` subprocesses of tests/test_chaos.py.

A root step, a map over its items and a reduce. Every handler records its execution
in the `executions` table through ctx.session, so a row exists exactly when the
task's completion committed, and sleeps a little so that work is in flight when
the test breaks things."""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import sqlalchemy as sa

import pgflow_sa
from pgflow_sa import Context, Flow, FlowRegistry

# which pgflow_sa the worker runs (the test prints the worker logs on failure)
print(f"chaos_app: pgflow_sa from {pgflow_sa.__file__}", file=sys.stderr, flush=True)

executions = sa.table(
    "executions",
    sa.column("run_id", sa.Uuid),
    sa.column("step_slug", sa.Text),
    sa.column("task_index", sa.Integer),
    sa.column("pid", sa.Integer),
    sa.column("attempt", sa.Integer),
)
EXECUTIONS_DDL = (
    "CREATE TABLE executions (run_id uuid NOT NULL, step_slug text NOT NULL, "
    "task_index int NOT NULL, pid int NOT NULL, attempt int NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
ITEMS = 4


def _work(ctx: Context) -> None:
    ctx.session.execute(
        sa.insert(executions).values(
            run_id=ctx.run_id,
            step_slug=ctx.step_slug,
            task_index=ctx.task_index,
            pid=os.getpid(),
            attempt=ctx.attempt,
        )
    )
    time.sleep(random.uniform(0.1, 0.3))


chaos = Flow("chaos", max_attempts=3, base_delay=1, timeout=10)


@chaos.step
def seed(input: Any, ctx: Context) -> list[int]:
    _work(ctx)
    return [input["n"] * 10 + i for i in range(ITEMS)]


@chaos.map(depends_on=seed)
def square(item: int, ctx: Context) -> int:
    _work(ctx)
    return item * item


@chaos.step(depends_on=[square])
def total(input: Any, ctx: Context) -> int:
    _work(ctx)
    return sum(input["square"])


def expected_output(n: int) -> dict[str, int]:
    return {"total": sum((n * 10 + i) ** 2 for i in range(ITEMS))}


flows = FlowRegistry(chaos)
