from shop.flows import Order, checkout

from pgflow_sa import RunStatus, start_flow_and_wait_async
from pgflow_sa.testing import Context, run_flow, run_flow_async


def test_checkout_in_process(pgflow_database_url):
    run = run_flow(pgflow_database_url, checkout, {"order_id": 7, "items": ["a", "b"]})
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"ship": "order 7: 2 boxes"}


async def test_packing_retries(pgflow_database_url):
    run = await run_flow_async(
        pgflow_database_url, checkout, {"order_id": 8, "items": ["x"]}, fail={"pack": 1}
    )
    assert run.status is RunStatus.COMPLETED
    assert run.steps[1].attempts == 2


async def test_with_a_real_worker(pgflow_worker, pgflow_engine):
    run = await start_flow_and_wait_async(
        pgflow_engine, checkout, {"order_id": 9, "items": ["p", "q", "r"]}, timeout=30
    )
    assert run.output == {"ship": "order 9: 3 boxes"}


def test_reserve_handler_alone():
    ctx = Context(flow_slug="checkout", step_slug="reserve")
    assert checkout.handler("reserve")(Order(order_id=1, items=["a"]), ctx) == ["A"]
