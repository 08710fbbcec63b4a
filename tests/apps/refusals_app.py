"""A flow whose only step always raises, served by a `pgflow-sa worker` whose role may
not store errors (tests/test_worker_refusals.py)."""

from __future__ import annotations

from typing import Any

from pgflow_sa import Flow, FlowRegistry

boom = Flow("refusals_boom", max_attempts=1, timeout=5)


@boom.step
def explode(input: Any) -> None:
    raise RuntimeError("boom")


spread = Flow("refusals_spread", timeout=5)


@spread.map
def echo(item: int) -> int:
    return item


flows = FlowRegistry(boom, spread)
