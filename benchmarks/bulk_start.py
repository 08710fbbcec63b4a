"""Bulk start: runs/s of start_flows (one statement for all) against start_flow
called once per run, both in one transaction, in the same run of this script.

    python benchmarks/bulk_start.py [--database-url URL] [--runs N] [--rounds K]

Without --database-url it uses PGFLOW_SA_BENCH_DATABASE_URL, else the server at
127.0.0.1:5432; each round uses a fresh database there. The figure that matters is
the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_app import chain

from pgflow_sa import deploy_flows, install_schema, start_flow, start_flows
from pgflow_sa._db import sync_engine
from pgflow_sa.config import to_sqlalchemy_url


def _fresh(server: str) -> tuple[str, str]:
    name = f"pgflow_sa_bulk_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = to_sqlalchemy_url(server).set(database=name).render_as_string(hide_password=False)
    install_schema(url)
    deploy_flows(url, [chain])
    return name, url


def _drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "PGFLOW_SA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = to_sqlalchemy_url(args.database_url).set(drivername="postgresql")
    server_url = server.render_as_string(hide_password=False)
    rates: dict[str, list[float]] = {"start_flow": [], "start_flows": []}
    for _ in range(args.rounds):
        for label, bulk in (("start_flow", False), ("start_flows", True)):
            name, url = _fresh(server_url)
            try:
                rates[label].append(_rate(url, args.runs, bulk))
            finally:
                _drop(server_url, name)
    single, bulk = (statistics.median(rates[k]) for k in ("start_flow", "start_flows"))
    print(f"start_flow, one call per run: {single:,.0f} runs/s (median of {args.rounds})")
    print(f"start_flows, one statement:   {bulk:,.0f} runs/s (median of {args.rounds})")
    print(f"ratio: {bulk / single:.2f}x ({args.runs} runs per round)")


if __name__ == "__main__":
    main()
