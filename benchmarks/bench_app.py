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


# a root map over the flow input (an array); its handler does not take ctx, so a worker
# has no reason to fetch or ship the run input with each task
root_map = Flow("bench_root_map")


@root_map.map
async def element(item: Any) -> int:
    return 1


# the same, but the handler reads ctx.flow_input once (the whole input array)
root_map_ctx = Flow("bench_root_map_ctx")


@root_map_ctx.map
async def element_ctx(item: Any, ctx: Context) -> int:
    return 1 if len(ctx.flow_input) else 0


# bench_noop with a step limit that never binds (the worker runs 10 at once): what the
# limit machinery costs by itself
limited = Flow("bench_limited")


@limited.step(max_concurrency=1000)
async def nothing_limited(input: Any, ctx: Context) -> int:
    return 1


# and one that binds: at most 5 started at once across workers
capped = Flow("bench_capped")


@capped.step(max_concurrency=5)
async def nothing_capped(input: Any, ctx: Context) -> int:
    return 1


flows = FlowRegistry(noop, chain, wide, root_map, root_map_ctx, limited, capped)
