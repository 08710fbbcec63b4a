from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pgflow_sa import Context, Flow, FlowRegistry


class Order(BaseModel):
    order_id: int
    items: list[str]


checkout = Flow("checkout", base_delay=1)


@checkout.step
def reserve(order: Order, ctx: Context) -> list[str]:
    return [item.upper() for item in order.items]


@checkout.map(depends_on=reserve)
async def pack(item: str, ctx: Context) -> dict[str, Any]:
    return {"item": item, "box": ctx.task_index + 1}


@checkout.step(depends_on=[pack])
def ship(input: dict[str, Any], ctx: Context) -> str:
    return f"order {ctx.flow_input['order_id']}: {len(input['pack'])} boxes"


registry = FlowRegistry(checkout)
