"""A three-step chain for the tests of claims made by completing statements, served by
`pgflow-sa worker chain_app:flows` subprocesses. Each step adds one to what the step
before it returned, so the run's output says every input was right; the first waits
while the switch "first_waits" is on (tables of tests/apps/control_app.py)."""

from __future__ import annotations

import time
from typing import Any

from pgflow_sa import Context, Flow, FlowRegistry
from tests.apps.control_app import record, switch

chained = Flow("chained", timeout=60)


@chained.step
def first(input: Any, ctx: Context) -> int:
    record(ctx, "start")
    while switch("first_waits"):
        time.sleep(0.05)
    return int(input["n"])


@chained.step(depends_on=first)
def second(input: Any, ctx: Context) -> int:
    record(ctx, "start")
    return int(input["first"]) + 1


@chained.step(depends_on=second)
async def third(input: Any, ctx: Context) -> int:
    return int(input["second"]) + 1


flows = FlowRegistry(chained)
