"""Bulk start: runs/s of start_flows (one statement for all) against start_flow
called once per run, both in one transaction, in the same run of this script.

    python benchmarks/bulk_start.py [--database-url URL] [--runs N] [--rounds K]

Without --database-url it uses PGFLOW_SA_BENCH_DATABASE_URL, else the server at
127.0.0.1:5432; each round uses a fresh database there. The figure that matters is
the ratio. ``benchmarks/run.py`` reports it too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _setup import DEFAULT_SERVER, drop_databases, libpq, pgflow_database
from bench_app import chain

from pgflow_sa import start_flow, start_flows
from pgflow_sa._db import sync_engine


def _rate(url: str, runs: int, bulk: bool) -> float:
    engine = sync_engine(url)
    inputs = [{"n": i} for i in range(runs)]
    try:
        with engine.connect() as conn:
            began = time.perf_counter()
            if bulk:
                start_flows(conn, chain, inputs)
            else:
                for value in inputs:
                    start_flow(conn, chain, value)
            conn.commit()
            return runs / (time.perf_counter() - began)
    finally:
        engine.dispose()


def measure(server: str, runs: int, rounds: int) -> dict[str, float]:
    """Median runs/s of each way over ``rounds`` rounds, each in a fresh database."""
    rates: dict[str, list[float]] = {"start_flow": [], "start_flows": []}
    for _ in range(rounds):
        for label, bulk in (("start_flow", False), ("start_flows", True)):
            rates[label].append(_rate(pgflow_database(server), runs, bulk))
    return {"runs": runs, **{label: statistics.median(r) for label, r in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_SERVER)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = libpq(args.database_url)
    try:
        result = measure(server, args.runs, args.rounds)
    finally:
        drop_databases(server)
    single, bulk = result["start_flow"], result["start_flows"]
    print(f"start_flow, one call per run: {single:,.0f} runs/s (median of {args.rounds})")
    print(f"start_flows, one statement:   {bulk:,.0f} runs/s (median of {args.rounds})")
    print(f"ratio: {bulk / single:.2f}x ({args.runs} runs per round)")


if __name__ == "__main__":
    main()
