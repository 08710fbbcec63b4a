"""The smallest complete pgflow-sa program: define a flow, install pgflow, start a run,
work it, print the result.

    python examples/quickstart.py

Uses PGFLOW_SA_DATABASE_URL when set, else an embedded PostgreSQL (in ./.pgflow_sa/).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from pgflow_sa import (
    Context,
    Flow,
    deploy_flows,
    get_database_url,
    install_schema,
    start_flow_and_wait_async,
    to_sqlalchemy_url,
)
from pgflow_sa.worker import Worker

greeting = Flow("quickstart")


@greeting.step
def words(input: dict[str, Any], ctx: Context) -> list[str]:
    return input["name"].split()


@greeting.map(depends_on=words)  # one task per word
async def capitalize(word: str, ctx: Context) -> str:
    return word.capitalize()


@greeting.step(depends_on=[capitalize])
def greet(input: dict[str, Any], ctx: Context) -> str:
    return f"Hello, {' '.join(input['capitalize'])}!"


async def main() -> None:
    url = get_database_url()  # PGFLOW_SA_DATABASE_URL, else the embedded server
    install_schema(url)  # pgmq and the pgflow schema, where missing
    deploy_flows(url, greeting)  # the flow's rows, where missing

    engine = create_async_engine(to_sqlalchemy_url(url, "asyncpg"))
    worker = Worker(greeting, engine=engine)
    serving = asyncio.create_task(worker.run())
    try:
        run = await start_flow_and_wait_async(
            engine, greeting, {"name": "ada lovelace"}, timeout=30
        )
        print(f"run {run.run_id}: {run.status.value}")
        print(run.output["greet"] if run.output else run.error)
    finally:
        worker.stop()
        await serving
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
