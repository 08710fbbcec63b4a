"""`pgflow-sa flows list APP` and `pgflow-sa compile APP [FLOW]` as real subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import assert_one_line_error, run_cli

APP = """
from pgflow_sa import Context, Flow, FlowRegistry

orders = Flow("orders", timeout=30)

@orders.step
def load(input, ctx: Context):
    return [1, 2]

@orders.map(depends_on=load, max_attempts=5)
def charge(item, ctx):
    return item

@orders.step(depends_on=[load, charge])
def report(input, ctx):
    return input

ping = Flow("ping")
ping.step(slug="pong")(lambda input, ctx: input)

registry = FlowRegistry(orders, ping)
just_one = ping
name = "shop"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "shop_flows.py").write_text(APP)
    (tmp_path / "broken_flows.py").write_text("from pgflow_sa import Flow\nFlow('bad-slug')\n")
    (tmp_path / "crashing.py").write_text("raise RuntimeError('boom at import')\n")
    return tmp_path


def test_flows_list(project: Path) -> None:
    proc = run_cli("flows", "list", "shop_flows:registry", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "orders  (max_attempts=3 base_delay=5 timeout=30)",
        "   0 load    single  (root)",
        "   1 charge  map     <- load  max_attempts=5",
        "   2 report  single  <- load, charge",
        "ping  (max_attempts=3 base_delay=5 timeout=60)",
        "   0 pong  single  (root)",
    ]


def test_compile_all_and_one(project: Path) -> None:
    both = run_cli("compile", "shop_flows:registry", cwd=project)
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == [
        "SELECT pgflow.create_flow('orders', timeout => 30);",
        "SELECT pgflow.add_step('orders', 'load');",
        "SELECT pgflow.add_step('orders', 'charge', ARRAY['load'], max_attempts => 5, step_type => 'map');",
        "SELECT pgflow.add_step('orders', 'report', ARRAY['load', 'charge']);",
        "",
        "SELECT pgflow.create_flow('ping');",
        "SELECT pgflow.add_step('ping', 'pong');",
    ]
    one = run_cli("compile", "shop_flows:just_one", "ping", cwd=project)
    assert one.stdout.splitlines() == [
        "SELECT pgflow.create_flow('ping');",
        "SELECT pgflow.add_step('ping', 'pong');",
    ]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["compile", "shop_flows:registry", "nope"],
            ["no flow 'nope' in this APP (its flows: orders, ping)"],
        ),
        (["compile", "shop_flows"], ["APP must look like package.module:attribute"]),
        (["flows", "list", "missing_module:registry"], ["cannot import 'missing_module'"]),
        (
            ["flows", "list", "shop_flows:nothing"],
            ["module 'shop_flows' has no attribute 'nothing'"],
        ),
        (
            ["flows", "list", "shop_flows:name"],
            ["expected a FlowRegistry, a Flow or a list of Flows, got str"],
        ),
        (
            ["flows", "list", "broken_flows:x"],
            ["Flow 'bad-slug': the flow slug cannot contain special characters"],
        ),
        (
            ["compile", "crashing:x"],
            ["importing 'crashing' for APP 'crashing:x' failed: RuntimeError: boom at import"],
        ),
    ],
)
def test_bad_apps_give_one_line(project: Path, args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli(*args, cwd=project), *fragments)
