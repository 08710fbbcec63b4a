"""Flows for the run-control tests (cancel, retry, concurrency limits), served by
`pgflow-sa worker control_app:flows` subprocesses. Handlers record what happened to
them in the `events` table on a connection of their own (autocommit), so a record
stays whatever becomes of the task."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import psycopg

from pgflow_sa import Context, Flow, FlowRegistry

EVENTS_DDL = (
    "CREATE TABLE events (run_id uuid, step_slug text, task_index int, what text, "
    "pid int, at timestamptz DEFAULT clock_timestamp());"
    "CREATE TABLE switches (name text PRIMARY KEY, value boolean NOT NULL)"
)
HOLD = float(os.environ.get("TEST_HOLD_SECONDS", "0.3"))


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


# cancel: a long async step, then a step that must never start
long_async = Flow("long_async", timeout=120)


@long_async.step
async def wait_long(input: Any, ctx: Context) -> str:
    record(ctx, "start")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        record(ctx, "cancelled")
        raise
    record(ctx, "end")
    return "done"


@long_async.step(depends_on=wait_long)
def after_long(input: Any, ctx: Context) -> str:
    record(ctx, "start")
    return "after"


# cancel: a long sync step that looks at ctx.cancelled
long_sync = Flow("long_sync", timeout=120)


@long_sync.step
def poll_cancelled(input: Any, ctx: Context) -> str:
    record(ctx, "start")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ctx.cancelled:
            record(ctx, "saw cancelled")
            return "stopped early"
        time.sleep(0.05)
    record(ctx, "end")
    return "done"


# retry: `fetch` always works, `store` fails while the switch "store_fails" is on
two_steps = Flow("two_steps", max_attempts=1)


@two_steps.map
def fetch(item: int, ctx: Context) -> int:
    record(ctx, "start")
    return item * 10


@two_steps.step(depends_on=fetch)
def store(input: Any, ctx: Context) -> int:
    record(ctx, "start")
    while switch("store_waits") and not ctx.cancelled:
        time.sleep(0.05)
    if switch("store_fails"):
        raise RuntimeError("the store is down")
    return int(sum(input["fetch"]))


# limits: at most 2 tasks of `call_api` at once across all workers
limited = Flow("limited")


@limited.map(max_concurrency=2)
def call_api(item: int, ctx: Context) -> int:
    record(ctx, "start")
    time.sleep(HOLD)
    record(ctx, "end")
    return item


# limits: at most 2 runs in progress; each run is two steps
run_limited = Flow("run_limited", max_running_runs=2)


@run_limited.step
def first(input: Any, ctx: Context) -> int:
    record(ctx, "start")
    time.sleep(HOLD)
    record(ctx, "end")
    return 1


@run_limited.step(depends_on=first)
def second(input: Any, ctx: Context) -> int:
    record(ctx, "start")
    time.sleep(HOLD)
    record(ctx, "end")
    return 2


flows = FlowRegistry(long_async, long_sync, two_steps, limited, run_limited)
