"""Flows served by `pgflow-sa worker` subprocesses in tests/test_worker_faults.py.

Handlers that write do so through ctx.session into ``fault_writes``, so a row exists
exactly when that attempt's completion committed together with it."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import sqlalchemy as sa

from pgflow_sa import Context, Flow, FlowRegistry

fault_writes = sa.table(
    "fault_writes",
    sa.column("run_id", sa.Uuid),
    sa.column("flow_slug", sa.Text),
    sa.column("attempt", sa.Integer),
    sa.column("pid", sa.Integer),
)

FAULT_WRITES_DDL = (
    "CREATE TABLE fault_writes (run_id uuid, flow_slug text, attempt int, pid int, "
    "at timestamptz DEFAULT clock_timestamp())"
)


HOLD_SECONDS = 6.0


def _write(ctx: Context) -> None:
    ctx.session.execute(
        sa.insert(fault_writes).values(
            run_id=ctx.run_id, flow_slug=ctx.flow_slug, attempt=ctx.attempt, pid=os.getpid()
        )
    )


# A task that outlives a timeout lowered (by a migration) while it runs.
lowered = Flow("f_lowered", timeout=30, base_delay=1, max_attempts=3)


@lowered.step
def long_write(input: Any, ctx: Context) -> dict[str, int]:
    _write(ctx)
    time.sleep(8)
    return {"pid": os.getpid()}


# A task whose worker is frozen (SIGSTOP) long enough for another worker to retry it.
fenced = Flow("f_fenced", timeout=10, base_delay=1, max_attempts=3)


@fenced.step
def slow_write(input: Any, ctx: Context) -> dict[str, int]:
    time.sleep(4)
    _write(ctx)
    return {"pid": os.getpid()}


# A sync handler that never ends (for shutdown).
hangs = Flow("f_hangs", timeout=60, base_delay=1, max_attempts=3)


@hangs.step
def hang(input: Any, ctx: Context) -> None:
    time.sleep(600)


# Handlers that hold a ctx.async_session connection while they work.
holds = Flow("f_holds", timeout=30, base_delay=1, max_attempts=3)


@holds.step
async def hold_session(input: Any, ctx: Context) -> dict[str, int]:
    await ctx.async_session.execute(
        sa.insert(fault_writes).values(
            run_id=ctx.run_id, flow_slug=ctx.flow_slug, attempt=ctx.attempt, pid=os.getpid()
        )
    )
    await asyncio.sleep(HOLD_SECONDS)
    return {"pid": os.getpid()}


flows = FlowRegistry(lowered, fenced, hangs, holds)
