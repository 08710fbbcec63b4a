"""Flows whose handlers write through ctx.session / ctx.async_session, for the worker's
tests and the testing kit's: the same flows must behave the same under both."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa

from pgflow_sa import Context, Flow


def make_notes(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")


def notes(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT body FROM notes ORDER BY id")]


notes_table = sa.table("notes", sa.column("body", sa.Text))
tx_sync = Flow("w_tx_sync", base_delay=1, max_attempts=2)
tx_async = Flow("w_tx_async", base_delay=1, max_attempts=2)


@tx_sync.step
def write_sync(input: Any, ctx: Context) -> str:
    ctx.session.execute(sa.insert(notes_table).values(body=f"sync attempt {ctx.attempt}"))
    if ctx.attempt == 1:
        raise RuntimeError("after writing")
    return "written"


@tx_async.step
async def write_async(input: Any, ctx: Context) -> str:
    await ctx.async_session.execute(
        sa.insert(notes_table).values(body=f"async attempt {ctx.attempt}")
    )
    if ctx.attempt == 1:
        raise RuntimeError("after writing")
    return "written"


atomic = Flow("w_atomic", max_attempts=1)


@atomic.step
async def write_then_break_completion(input: Any, ctx: Context) -> Any:
    await ctx.async_session.execute(sa.insert(notes_table).values(body="must vanish"))
    await ctx.async_session.execute(sa.text("SELECT 1/0"))  # breaks the transaction
    return "unreachable"
