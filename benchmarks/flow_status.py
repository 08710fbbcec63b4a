"""``flow_status`` (``pgflow-sa status``) with 100,000 runs: its query's milliseconds
against a primary-key lookup of one run in the same run, first with the index
pgflow-sa's installer adds for it (``pgflow_sa_runs_finished``,
pgflow_sa.schema.indexes), then, in the same run, without it.

    python benchmarks/flow_status.py [--database-url URL] [--runs N] [--requests K] [--explain]

Without --database-url it uses PGFLOW_SA_BENCH_DATABASE_URL, else the server at
127.0.0.1:5432, where it makes a fresh database and drops it at the end. The runs
are those of benchmarks/_many_runs.py (inserted directly: 89% completed, 10%
failed, 1% in progress, over two flows, one a minute apart), then VACUUM ANALYZE
as autovacuum would (right after the insert, before any vacuum, the query took
0.8 s with or without the index: pgmq.metrics, not the run counts). The figures
that matter are the ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _many_runs import arguments, database_with_runs, literal, sql_ms
from _setup import drop_databases

from pgflow_sa.schema import queries
from pgflow_sa.schema.indexes import RUNS_FINISHED


def main() -> None:
    args = arguments(__doc__, "print the query's plans")
    url = database_with_runs(args.server, args.runs)
    try:
        status_sql = literal(queries.flow_status(3600, 30))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")  # as autovacuum leaves it (see the module's doc)
            lookup = (
                "SELECT * FROM pgflow.runs WHERE run_id = (SELECT run_id FROM pgflow.runs LIMIT 1)"
            )
            print(f"flow_status with {args.runs:,} runs ({args.requests} requests each, median)")
            for phase in ("with", "without"):
                if phase == "without":
                    conn.execute(f"DROP INDEX pgflow.{RUNS_FINISHED}")
                    conn.execute("ANALYZE pgflow.runs")
                one_run = sql_ms(conn, lookup, args.requests)
                status_ms = sql_ms(conn, status_sql, args.requests)
                print(
                    f"  {phase} pgflow-sa's index {RUNS_FINISHED}: {status_ms:.2f} ms = "
                    f"{status_ms / one_run:.1f}x a primary-key lookup ({one_run:.2f} ms)"
                )
                if args.explain:
                    for (line,) in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + status_sql):
                        print("      " + line)
    finally:
        drop_databases(args.server)


if __name__ == "__main__":
    main()
