"""Flows defined in Python that tests/interop/compile_flows.mjs defines the same way with
@pgflow/dsl 0.8.1; their compiled SQL must be identical."""

from __future__ import annotations

from typing import Any

from pgflow_sa import Context, Flow, FlowRegistry


def h(input: Any, ctx: Context) -> Any:
    return input


def _step(flow: Flow, slug: str, **options: Any) -> None:
    flow.step(slug=slug, **options)(h)


def _map(flow: Flow, slug: str, **options: Any) -> None:
    flow.map(slug=slug, **options)(h)


chain = Flow("chain")
_step(chain, "a")
_step(chain, "b", depends_on=["a"])
_step(chain, "c", depends_on=["b"])

diamond = Flow("diamond", timeout=10)
_step(diamond, "start")
_step(diamond, "left", depends_on=["start"])
_step(diamond, "right", depends_on=["start"], max_attempts=5)
_step(diamond, "join", depends_on=["left", "right"])

root_map = Flow("root_map")
_map(root_map, "double")

dependent_map = Flow("dependent_map")
_step(dependent_map, "list_items")
_map(dependent_map, "each_item", depends_on="list_items")

map_reduce = Flow("map_reduce", base_delay=2)
_map(map_reduce, "square", timeout=5)
_step(map_reduce, "total", depends_on=["square"])

every_option = Flow("every_option", max_attempts=5, base_delay=2, timeout=30)
_step(every_option, "first", max_attempts=7, base_delay=3, timeout=11, start_delay=0)
_step(every_option, "second", depends_on=["first"], start_delay=120)
_map(
    every_option,
    "third",
    depends_on=["second"],
    max_attempts=1,
    base_delay=1,
    timeout=3,
    start_delay=9,
)

defaults_omitted = Flow("defaults_omitted")
_step(defaults_omitted, "only")

explicit_defaults = Flow("explicit_defaults", max_attempts=3, base_delay=5, timeout=60)
_step(explicit_defaults, "only", max_attempts=3)

many_roots = Flow("many_roots")
_step(many_roots, "alpha")
_step(many_roots, "beta")
_step(many_roots, "gamma", depends_on=["beta", "alpha"])

map_of_map = Flow("map_of_map")
_step(map_of_map, "source")
_map(map_of_map, "first_pass", depends_on=["source"])
_map(map_of_map, "second_pass", depends_on=["first_pass"], timeout=15)
_step(map_of_map, "collect", depends_on=["second_pass", "source"])

long_flow = Flow("long_flow", timeout=20)
_step(long_flow, "s00")
_step(long_flow, "s01", depends_on=["s00"])
for i in range(2, 24):
    _step(
        long_flow,
        f"s{i:02d}",
        depends_on=[f"s{i - 1:02d}", f"s{i - 2:02d}"],
        **({"max_attempts": i} if i % 5 == 0 else {}),
    )

mixed_case = Flow("Mixed_Case_Flow2")
_step(mixed_case, "Fetch_Data")
_map(mixed_case, "ProcessEach", depends_on=["Fetch_Data"], base_delay=10)
_step(mixed_case, "summarise_all", depends_on=["ProcessEach", "Fetch_Data"], start_delay=1)

registry = FlowRegistry(
    chain,
    diamond,
    root_map,
    dependent_map,
    map_reduce,
    every_option,
    defaults_omitted,
    explicit_defaults,
    many_roots,
    map_of_map,
    long_flow,
    mixed_case,
)
