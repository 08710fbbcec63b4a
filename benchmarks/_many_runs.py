"""Databases holding many runs, inserted directly (89% completed, 10% failed, 1% in
progress, over two flows, one a minute apart), for the benchmarks of pages and queries
that read runs (they do not care how the rows got there); and the timing of a query."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import psycopg
from _setup import fresh_database
from bench_app import chain, noop
from sqlalchemy.dialects import postgresql

from pgflow_sa import deploy_flows, install_schema
from pgflow_sa.config import to_sqlalchemy_url

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


def arguments(doc: str, explain: str) -> argparse.Namespace:
    """The options these benchmarks share: --database-url (the server), --runs,
    --requests, --explain."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "PGFLOW_SA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--explain", action="store_true", help=explain)
    args = parser.parse_args()
    server = to_sqlalchemy_url(args.database_url).set(drivername="postgresql")
    args.server = server.render_as_string(hide_password=False)
    return args


def database_with_runs(server: str, runs: int) -> str:
    """A fresh database (dropped by _setup.drop_databases) with pgflow, two flows and
    ``runs`` runs; its libpq URL."""
    url = fresh_database(server, name=None)
    install_schema(url)
    deploy_flows(url, [chain, noop])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(POPULATE, {"runs": runs})
        conn.execute(FAILED_STEPS)
        conn.execute("ANALYZE pgflow.runs; ANALYZE pgflow.step_states")
    return url


def sql_ms(conn: psycopg.Connection[Any], sql: str, requests: int) -> float:
    times = []
    for _ in range(requests + 1):
        began = time.perf_counter()
        conn.execute(sql).fetchall()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times[1:])


def literal(query: Any) -> str:
    return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
