"""Flows of the run-control fault tests (tests/test_run_control_faults.py), served by
`pgflow-sa worker review_app:flows` subprocesses. Handlers record what happened to
them in control_app's `events` table."""

from __future__ import annotations

import os
import time
from typing import Any

from pgflow_sa import Context, Flow, FlowRegistry
from tests.apps.control_app import record, switch

HOLD = float(os.environ.get("TEST_HOLD_SECONDS", "2"))

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


flows = FlowRegistry(gate, wide, fork, charge_then_fail)
