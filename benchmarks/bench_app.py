"""Flows used by the benchmarks (served by `pgflow-sa worker bench_app:flows`)."""

from __future__ import annotations

from typing import Any

from pgflow_sa import Context, Flow, FlowRegistry

noop = Flow("bench_noop")


@noop.step
async def nothing(input: Any, ctx: Context) -> int:
    return 1


chain = Flow("bench_chain")


@chain.step
async def one(input: Any, ctx: Context) -> int:
    return 1


@chain.step(depends_on=[one])
async def two(input: Any, ctx: Context) -> int:
    return 2


@chain.step(depends_on=[two])
async def three(input: Any, ctx: Context) -> int:
    return 3


wide = Flow("bench_wide")


@wide.map
async def each(item: Any, ctx: Context) -> int:
    return 1


flows = FlowRegistry(noop, chain, wide)
