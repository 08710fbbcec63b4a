"""Flows served by a `pgflow-sa worker` running as a least-privilege role (see
tests/test_roles.py). Between them they take every path of pgflow's SQL that a
worker and a client call: single, map and root map steps, empty maps, a retry
after a failure, a run whose step fails for good, and one that gives a map no
array."""

from __future__ import annotations

from typing import Any

from pgflow_sa import Context, Flow, FlowRegistry

greet = Flow("roles_greet", max_attempts=3, base_delay=1, timeout=5)


@greet.step
def names(input: Any) -> Any:
    return input["names"]  # not a list: pgflow fails the run (a map needs an array)


@greet.map(depends_on=names)
def hello(name: str) -> str:
    return f"Hello, {name}!"


@greet.step(depends_on=[hello])
def letter(input: Any, ctx: Context) -> str:
    if ctx.attempt == 1:  # fail once, so that pgflow.fail_task schedules a retry
        raise RuntimeError("not yet")
    return " ".join(input["hello"])


doomed = Flow("roles_doomed", max_attempts=1, timeout=5)


@doomed.step
def explode(input: Any) -> None:
    raise RuntimeError("boom")


late = Flow("roles_late", timeout=5)


@late.map
def double(item: int) -> int:
    return item * 2


@late.step(depends_on=[double])
def total(input: Any) -> int:
    return sum(input["double"])


flows = FlowRegistry(greet, doomed)
later = FlowRegistry(late)
