"""Flows for the adversarial review of run control (tests/test_run_control_review.py),
served by `pgflow-sa worker review_app:flows` subprocesses. Handlers record what
happened to them in the `events` table of control_app (autocommit connection)."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

from pgflow_sa import Context, Flow, FlowRegistry

HOLD = float(os.environ.get("TEST_HOLD_SECONDS", "2"))


def record(ctx: Context, what: str) -> None:
    with psycopg.connect(os.environ["TEST_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (run_id, step_slug, task_index, what, pid) "
            "VALUES (%s, %s, %s, %s, %s)",
            [ctx.run_id, ctx.step_slug, ctx.task_index, what, os.getpid()],
        )


# one task of `slot` at a time across all workers; its messages become visible 2 s
# after the run starts (time for a test to take a row lock first)
gate = Flow("gate", timeout=30)


@gate.map(max_concurrency=1, start_delay=2)
def slot(item: int, ctx: Context) -> int:
    record(ctx, "start")
    time.sleep(HOLD)
    record(ctx, "end")
    return 1


# a wide map with short tasks, then a step that must never start after a cancel
wide = Flow("wide", timeout=30)


@wide.map
def element(item: int, ctx: Context) -> int:
    time.sleep(0.01)
    return item


@wide.step(depends_on=element)
def after_wide(input: Any, ctx: Context) -> int:
    record(ctx, "start")
    return len(input["element"])


# two root steps, no retries: one failing fails the run while the other is settled
fork = Flow("fork", max_attempts=1)


@fork.step(max_concurrency=1)
def left(input: Any, ctx: Context) -> int:
    return 1


@fork.step
def right(input: Any, ctx: Context) -> int:
    raise RuntimeError("right fails")


flows = FlowRegistry(gate, wide, fork)
