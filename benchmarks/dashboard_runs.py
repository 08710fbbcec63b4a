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
import os
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from sqlalchemy.dialects import postgresql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_app import chain, noop

from pgflow_sa import deploy_flows, install_schema
from pgflow_sa.client import _page_query
from pgflow_sa.config import async_engine_from_url, to_sqlalchemy_url
from pgflow_sa.dashboard import dashboard_app
from pgflow_sa.schema.indexes import RUNS_BY_START

POPULATE = """
INSERT INTO pgflow.runs (flow_slug, status, input, remaining_steps, started_at,
                         completed_at, failed_at)
SELECT CASE WHEN i %% 2 = 0 THEN 'bench_chain' ELSE 'bench_noop' END,
       s.status, jsonb_build_object('n', i), CASE s.status WHEN 'started' THEN 1 ELSE 0 END,
       now() - make_interval(mins => i),
       CASE s.status WHEN 'completed' THEN now() - make_interval(mins => i) + interval '2 s' END,
       CASE s.status WHEN 'failed' THEN now() - make_interval(mins => i) + interval '3 s' END
FROM generate_series(1, %(runs)s) AS i
CROSS JOIN LATERAL (SELECT CASE WHEN i %% 100 = 7 THEN 'started'
                                 WHEN i %% 10 = 3 THEN 'failed' ELSE 'completed' END AS status) s
"""
FAILED_STEPS = """
INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps,
                                failed_at, error_message)
SELECT r.flow_slug, r.run_id, CASE r.flow_slug WHEN 'bench_chain' THEN 'one' ELSE 'nothing' END,
       'failed', 0, r.failed_at, 'boom'
FROM pgflow.runs r WHERE r.status = 'failed'
"""


def _fresh(server: str, runs: int) -> tuple[str, str]:
    name = f"pgflow_sa_dashbench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = to_sqlalchemy_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        install_schema(url)
        deploy_flows(url, [chain, noop])
        libpq = to_sqlalchemy_url(url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(POPULATE, {"runs": runs})
            conn.execute(FAILED_STEPS)
            conn.execute("ANALYZE pgflow.runs; ANALYZE pgflow.step_states")
    except BaseException:
        _drop(server, name)
        raise
    return name, libpq


def _drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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


def _sql_ms(conn: psycopg.Connection[Any], sql: str, requests: int) -> float:
    times = []
    for _ in range(requests + 1):
        began = time.perf_counter()
        conn.execute(sql).fetchall()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times[1:])


def _literal(query: Any) -> str:
    return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


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
        sql = _literal(
            _page_query(
                params.get("flow"), params.get("status"), None, None, params.get("after"), 50
            )
        )
        query_ms = _sql_ms(conn, sql, args.requests)
        print(
            f"  runs page, {label}: {page_ms:.1f} ms = {page_ms / baseline:.2f}x the workers "
            f"page; its query {query_ms:.2f} ms = {query_ms / one_run:.1f}x the lookup"
        )
        if args.explain:
            for (line,) in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql):
                print("      " + line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "PGFLOW_SA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--explain", action="store_true", help="print the runs page's plans")
    args = parser.parse_args()
    server = to_sqlalchemy_url(args.database_url).set(drivername="postgresql")
    server_url = server.render_as_string(hide_password=False)
    name, url = _fresh(server_url, args.runs)
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
            one_run = _sql_ms(
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
        _drop(server_url, name)


if __name__ == "__main__":
    main()
