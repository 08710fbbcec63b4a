"""Dashboard runs page with 100,000 runs: milliseconds per page (served by uvicorn,
fetched over HTTP) against a baseline in the same run, the workers page (a tiny
page: the cost of HTTP, templates and one small query), and the runs page's query
alone against a primary-key lookup of one run; first with the index pgflow-sa's
installer adds (pgflow_sa.schema.indexes), then, in the same run, without it.

    python benchmarks/dashboard_runs.py [--database-url URL] [--runs N] [--requests K] [--explain]

Without --database-url it uses PGFLOW_SA_BENCH_DATABASE_URL, else the server at
127.0.0.1:5432, where it makes a fresh database and drops it at the end. The runs
are inserted directly (89% completed, 10% failed, 1% in progress, over two
flows, one a minute apart), not started one by one: the page reads rows, it does not care
how they got there. The figures that matter are the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _many_runs import arguments, database_with_runs, literal, sql_ms
from _setup import drop_databases

from pgflow_sa.client import _page_query
from pgflow_sa.config import async_engine_from_url
from pgflow_sa.dashboard import dashboard_app
from pgflow_sa.schema.indexes import RUNS_BY_START


def _ms(url: str, requests: int) -> float:
    """Median milliseconds of a GET of ``url`` (after one warm-up)."""
    times = []
    for _ in range(requests + 1):
        began = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            assert response.status == 200, url
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times[1:])


def _measure(
    base: str,
    conn: psycopg.Connection[Any],
    pages: dict[str, dict[str, str]],
    one_run: float,
    args: argparse.Namespace,
) -> None:
    baseline = _ms(base + "/workers", args.requests)
    print(f"  baseline: workers page {baseline:.1f} ms; a primary-key lookup {one_run:.2f} ms")
    flows_ms = _ms(base + "/", args.requests)
    print(f"  flows page: {flows_ms:.1f} ms")
    for label, params in pages.items():
        query_string = urllib.parse.urlencode(params)
        page_ms = _ms(f"{base}/runs?{query_string}", args.requests)
        sql = literal(
            _page_query(
                params.get("flow"), params.get("status"), None, None, params.get("after"), 50
            )
        )
        query_ms = sql_ms(conn, sql, args.requests)
        print(
            f"  runs page, {label}: {page_ms:.1f} ms = {page_ms / baseline:.2f}x the workers "
            f"page; its query {query_ms:.2f} ms = {query_ms / one_run:.1f}x the lookup"
        )
        if args.explain:
            for (line,) in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql):
                print("      " + line)


def main() -> None:
    args = arguments(__doc__, "print the runs page's plans")
    url = database_with_runs(args.server, args.runs)
    # pooled, as an application's engine would be (one made from a URL pools nothing)
    engine = async_engine_from_url(url, pool_size=2, max_overflow=8)
    app = dashboard_app(engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    web = uvicorn.Server(config)

    async def serve() -> None:
        try:
            await web.serve()
        finally:
            await engine.dispose()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        while not web.started:
            time.sleep(0.01)
        port = web.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        with psycopg.connect(url, autocommit=True) as conn:
            middle = conn.execute(
                "SELECT started_at, run_id FROM pgflow.runs ORDER BY started_at DESC, run_id DESC"
                " OFFSET %s LIMIT 1",
                (args.runs // 2,),
            ).fetchone()
            assert middle is not None
            cursor = f"{middle[0].isoformat()}|{middle[1]}"
            pages = {
                "newest": {},
                "flow + status": {"flow": "bench_noop", "status": "failed"},
                "middle (keyset)": {"after": cursor},
            }
            one_run = sql_ms(
                conn, f"SELECT * FROM pgflow.runs WHERE run_id = '{middle[1]}'", args.requests
            )
            print(f"runs page with {args.runs:,} runs ({args.requests} requests each, median)")
            for phase in ("with", "without"):
                if phase == "without":
                    conn.execute(f"DROP INDEX pgflow.{RUNS_BY_START}")
                    conn.execute("ANALYZE pgflow.runs")
                print(f"{phase} pgflow-sa's index {RUNS_BY_START}:")
                _measure(base, conn, pages, one_run, args)
    finally:
        web.should_exit = True
        thread.join(10)
        drop_databases(args.server)


if __name__ == "__main__":
    main()
