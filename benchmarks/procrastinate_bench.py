"""The no-op workload through Procrastinate: `python procrastinate_bench.py URL JOBS CONCURRENCY`.
Prints {"jobs_per_s": ...} as its last line."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import procrastinate

url, jobs, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))


@app.task(name="noop")
async def noop() -> int:
    return 1


async def main() -> None:
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await noop.batch_defer_async(*[{} for _ in range(jobs)])
        started = time.perf_counter()
        await app.run_worker_async(
            concurrency=concurrency, wait=False, install_signal_handlers=False
        )
        elapsed = time.perf_counter() - started
    print(json.dumps({"jobs_per_s": jobs / elapsed}))


asyncio.run(main())
