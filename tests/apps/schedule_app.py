"""A flow started every second by its schedule, served by `pgflow-sa worker`
subprocesses in tests/test_schedules_workers.py."""

from __future__ import annotations

from typing import Any

from pgflow_sa import Flow, FlowRegistry

ticking = Flow("ticking")


@ticking.step
def echo(input: dict[str, Any]) -> dict[str, Any]:
    return input


# catch_up="all": a tick that every worker saw late still fires, so each second between
# the first and the last fired tick must have exactly one run
ticking.schedule("* * * * * *", name="every_second", input={"source": "cron"}, catch_up="all")

flows = FlowRegistry(ticking)
