"""Flows for the second adversarial review of run control
(tests/test_run_control_review2.py), served by `pgflow-sa worker review2_app:flows`
subprocesses. Handlers record what happened to them in the `events` table of
control_app (autocommit connection)."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from pgflow_sa import Context, Flow, FlowRegistry


def record(ctx: Context, what: str) -> None:
    with psycopg.connect(os.environ["TEST_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (run_id, step_slug, task_index, what, pid) "
            "VALUES (%s, %s, %s, %s, %s)",
            [ctx.run_id, ctx.step_slug, ctx.task_index, what, os.getpid()],
        )


def switch(name: str) -> bool:
    with psycopg.connect(os.environ["TEST_DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("SELECT value FROM switches WHERE name = %s", [name]).fetchone()
    return bool(row and row[0])


# a step with a side effect (charged once), then one that fails while 'last_fails' is on
charge_then_fail = Flow("charge_then_fail", max_attempts=1)


@charge_then_fail.step
def charge(input: Any, ctx: Context) -> str:
    record(ctx, "start")
    return "charged"


@charge_then_fail.step(depends_on=charge)
def notify(input: Any, ctx: Context) -> str:
    record(ctx, "start")
    if switch("last_fails"):
        raise RuntimeError("notify fails")
    return "notified"


flows = FlowRegistry(charge_then_fail)
