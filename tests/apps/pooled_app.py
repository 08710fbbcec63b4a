"""A flow served through PgBouncer in the tests: async and sync handlers, a map step,
and a handler whose ctx.session runs the same statement more often than psycopg's
prepare threshold."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pgflow_sa import Context, Flow, FlowRegistry

pooled = Flow("pooled")


@pooled.step
async def numbers(input: Any) -> list[int]:
    return list(range(int(input["n"])))


@pooled.map(depends_on=[numbers])
async def square(item: int) -> int:
    return item * item


@pooled.step(depends_on=[square])
def total(input: Any, ctx: Context) -> int:
    for _ in range(8):  # psycopg prepares a statement on its 5th execution
        ctx.session.execute(sa.text("SELECT 1"))
    return int(sum(input["square"]))


flows = FlowRegistry(pooled)
