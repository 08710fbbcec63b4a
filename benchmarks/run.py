"""pgflow-sa benchmarks: the worker against the bare protocol loop (pgflow's own SQL
driven by asyncpg with no framework), measured side by side in one run, each
measurement in a fresh database on the same server.

    python benchmarks/run.py [--database-url URL] [--tasks N] [--json out.json]
    python benchmarks/run.py --only throughput,latency   # some measurements only

Without --database-url it uses PGFLOW_SA_BENCH_DATABASE_URL, else the server at
127.0.0.1:5432. Absolute figures vary from machine to machine; the ratios measured
in the same run are what count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bare
import _workers
import bulk_start
from _setup import (
    DEFAULT_SERVER,
    connections,
    drop_databases,
    libpq,
    pgflow_database,
    runs_with_status,
    start_runs,
)

HERE = Path(__file__).resolve().parent
#: the worker settings README "Performance" documents for throughput
TUNED = ["--concurrency", "100", "--batch-size", "50"]
MEASUREMENTS = (
    "throughput",
    "procrastinate",
    "latency",
    "root-map",
    "backlog",
    "idle",
    "bulk-start",
    "scale-out",
    "limits",
)


# --- throughput: one-step no-op runs ---------------------------------------------------


def bare_throughput(server: str, tasks: int) -> list[dict[str, Any]]:
    rows = []
    for batch in (10, 50):
        for one_statement in (False, True):
            url = pgflow_database(server)
            start_runs(url, "bench_noop", tasks)
            result = asyncio.run(
                _bare.drain(url, "bench_noop", tasks, batch=batch, one_statement=one_statement)
            )
            rows.append({"batch": batch, "one_statement": one_statement, **result})
    return rows


def drain_with_workers(
    url: str, tasks: int, args: list[str], processes: int = 1, flow: str = "bench_noop"
) -> dict[str, Any]:
    """``processes`` workers, all registered and idle, then ``tasks`` runs started in
    one transaction: tasks/s from its commit to the last run's completion, the
    workers' peak RSS and connections, their CPU and the machine's (the database's is
    most of the rest)."""
    workers = [_workers.start(url, flow, args) for _ in range(processes)]
    try:
        _workers.wait_ready(url, flow, workers)
        start_runs(url, flow, tasks, chunk=tasks)
        psutil.cpu_percent()  # starts the machine's CPU window
        cpu_before = _workers.cpu_seconds(workers)
        started = time.perf_counter()
        peak_rss = peak_conns = 0
        deadline = time.monotonic() + 600
        with psycopg.connect(url, autocommit=True) as conn:
            while runs_with_status(conn, "completed") < tasks:
                if time.monotonic() > deadline:
                    raise _workers.error(workers[0], "the workers did not finish the runs")
                _workers.check(workers)
                peak_rss = max(peak_rss, _workers.rss(workers))
                peak_conns = max(peak_conns, connections(url, "pgflow-sa worker"))
                time.sleep(0.05)
        elapsed = time.perf_counter() - started
        machine = psutil.cpu_percent() / 100 * psutil.cpu_count()
        cpu = _workers.cpu_seconds(workers) - cpu_before
    finally:
        _workers.stop(workers)
    return {
        "tasks_per_s": tasks / elapsed,
        "elapsed_s": elapsed,
        "rss_mib": peak_rss / 2**20 / processes,
        "connections": peak_conns,
        "worker_cores": cpu / elapsed,
        "machine_cores": machine,
    }


def worker_throughput(server: str, tasks: int, args: list[str]) -> dict[str, Any]:
    return drain_with_workers(pgflow_database(server), tasks, args)


def procrastinate(server: str, tasks: int) -> dict[str, Any]:
    from _setup import fresh_database

    url = fresh_database(server)
    proc = subprocess.run(
        [sys.executable, str(HERE / "procrastinate_bench.py"), url, str(tasks), "10"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"procrastinate benchmark failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- latency: a 3-step chain at a steady rate --------------------------------------------


def bare_latency(server: str, rate: float, seconds: float) -> dict[str, Any]:
    url = pgflow_database(server)
    return asyncio.run(_bare.chain_latency(url, "bench_chain", rate, seconds, poll=0.01))


def worker_latency(server: str, rate: float, seconds: float) -> dict[str, Any]:
    url = pgflow_database(server)
    workers = [_workers.start(url, "bench_chain")]
    try:
        _workers.wait_ready(url, "bench_chain", workers)
        count = int(rate * seconds)
        with psycopg.connect(url, autocommit=True) as conn:
            begin = time.perf_counter()
            for i in range(count):
                delay = begin + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn.execute("SELECT pgflow.start_flow('bench_chain', '{}'::jsonb)")
            deadline = time.monotonic() + 60
            while runs_with_status(conn, "started") and time.monotonic() < deadline:
                _workers.check(workers)
                time.sleep(0.1)
            latencies = [
                float(r[0])
                for r in conn.execute(
                    "SELECT extract(epoch FROM completed_at - started_at) * 1000 "
                    "FROM pgflow.runs WHERE status = 'completed'"
                )
            ]
    finally:
        _workers.stop(workers)
    return _bare.summarize(latencies, count)


# --- one run, a root map over 10,000 items ---------------------------------------------
#
# Both drain the same run, input list(range(size)). The time is the server's: from
# just after start_flow committed (every task queued) to the run's completed_at.

START_ROOT_MAP = (
    "SELECT run_id FROM pgflow.start_flow(%s, to_jsonb(array(SELECT generate_series(0, %s - 1))))"
)


def _start_root_map(conn: psycopg.Connection[Any], flow: str, size: int) -> tuple[Any, Any]:
    run_id = conn.execute(START_ROOT_MAP, [flow, size]).fetchone()[0]
    return run_id, conn.execute("SELECT clock_timestamp()").fetchone()[0]


def _drained_s(conn: psycopg.Connection[Any], run_id: Any, queued_at: Any) -> float:
    status, drain = conn.execute(
        "SELECT status, extract(epoch FROM completed_at - %s) FROM pgflow.runs WHERE run_id = %s",
        [queued_at, run_id],
    ).fetchone()
    if status != "completed":
        raise RuntimeError(f"the root-map run ended {status}, not completed")
    return float(drain)


def root_map(server: str, size: int) -> dict[str, Any]:
    url = pgflow_database(server)
    with psycopg.connect(url, autocommit=True) as conn:
        run_id, queued_at = _start_root_map(conn, "bench_root_map", size)
        asyncio.run(_bare.drain(url, "bench_root_map", size, batch=50, one_statement=True))
        bare = _drained_s(conn, run_id, queued_at)
    result = {"size": size, "bare_s": bare}
    for flow in ("bench_root_map", "bench_root_map_ctx"):
        url = pgflow_database(server)
        workers = [_workers.start(url, flow)]
        try:
            _workers.wait_ready(url, flow, workers)
            with psycopg.connect(url, autocommit=True) as conn:
                run_id, queued_at = _start_root_map(conn, flow, size)
                deadline = time.monotonic() + 600
                while runs_with_status(conn, "started") and time.monotonic() < deadline:
                    _workers.check(workers)
                    time.sleep(0.05)
                result[flow] = _drained_s(conn, run_id, queued_at)
        finally:
            _workers.stop(workers)
    return result


# --- backlog: the worker's drain rate with 5,000 and with 200,000 runs waiting ----------


def backlog(server: str, waiting: int, measured: int) -> dict[str, Any]:
    """tasks/s of one worker (defaults) over ``measured`` completions (from the 10th
    percent of them on), with ``waiting`` runs queued before it started. The pgflow
    tables are left as a server with autovacuum off leaves them (never ANALYZEd)."""
    window = (measured // 10, measured // 10 + measured)
    if window[1] > waiting:
        raise ValueError(f"cannot measure {measured} completions of {waiting} runs")
    url = pgflow_database(server)
    began = time.perf_counter()
    start_runs(url, "bench_noop", waiting)
    queued_s = time.perf_counter() - began
    workers = [_workers.start(url, "bench_noop")]
    marks: dict[int, float] = {}
    try:
        _workers.wait_ready(url, "bench_noop", workers)
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while len(marks) < 2 and time.monotonic() < deadline:
                _workers.check(workers)
                done = runs_with_status(conn, "completed")
                for mark in window:
                    if done >= mark and mark not in marks:
                        marks[mark] = time.perf_counter()
                time.sleep(0.02)
    finally:
        _workers.stop(workers)
    if len(marks) < 2:
        raise RuntimeError(f"the worker did not complete {window[1]} of {waiting} runs")
    return {
        "waiting": waiting,
        "tasks_per_s": (window[1] - window[0]) / (marks[window[1]] - marks[window[0]]),
        "queued_s": queued_s,
    }


# --- an idle worker ---------------------------------------------------------------------


def _transactions(conn: psycopg.Connection[Any]) -> int:
    return conn.execute(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        "WHERE datname = current_database()"
    ).fetchone()[0]


def idle(server: str, seconds: float, settle: float) -> dict[str, Any]:
    """An idle worker (defaults, notifications on): the connections it holds and the
    transactions it runs per second, from the server's statistics, after it has
    settled (its spare connections closed)."""
    url = pgflow_database(server)
    workers = [_workers.start(url, "bench_noop")]
    try:
        _workers.wait_ready(url, "bench_noop", workers)
        with psycopg.connect(url, autocommit=True) as conn:
            start_runs(url, "bench_noop", 200)  # busy for a moment, then idle
            while runs_with_status(conn, "completed") < 200:
                time.sleep(0.05)
            time.sleep(settle)  # two heartbeats without work, then one closes spare connections
            before = _transactions(conn)
            time.sleep(seconds)
            after = _transactions(conn)
        held = connections(url, "pgflow-sa worker")
    finally:
        _workers.stop(workers)
    # the two statistics reads are this script's own transactions
    return {"connections": held, "queries_per_s": (after - before - 1) / seconds}


# --- scale-out: 1, 2 and 4 worker processes ---------------------------------------------


def scale_out(server: str, tasks: int) -> list[dict[str, Any]]:
    rows = []
    for processes in (1, 2, 4):
        url = pgflow_database(server)
        rows.append({"processes": processes, **drain_with_workers(url, tasks, [], processes)})
    return rows


# --- limits: what concurrency limits cost -------------------------------------------------


def limits(server: str, tasks: int) -> list[dict[str, Any]]:
    """One worker (defaults) draining one-step no-op runs of the same flow without a
    limit, with a step limit that never binds, and with one that does (5)."""
    rows = []
    for flow in ("bench_noop", "bench_limited", "bench_capped"):
        url = pgflow_database(server)
        rows.append({"flow": flow, **drain_with_workers(url, tasks, [], flow=flow)})
    return rows


# --- the report -------------------------------------------------------------------------


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    best = None
    if "bare" in results:
        print(f"one-step no-op runs, {args.tasks} tasks:")
        for row in results["bare"]:
            how = "one statement" if row["one_statement"] else "one per round trip"
            print(
                f"  (b) bare loop, batch {row['batch']:>2}, completions {how:<18}"
                f" {row['tasks_per_s']:7.0f} tasks/s"
            )
        best = max(r["tasks_per_s"] for r in results["bare"])
    for key, label in (("worker_defaults", "defaults"), ("worker_tuned", " ".join(TUNED))):
        if key in results:
            row = results[key]
            share = f" = {row['tasks_per_s'] / best:.0%} of the best (b)" if best else ""
            print(
                f"  (a) worker, {label:<33} {row['tasks_per_s']:7.0f} tasks/s{share}"
                f"  [RSS {row['rss_mib']:.0f} MiB, {row['connections']} connections, "
                f"worker {row['worker_cores']:.2f} cores, machine {row['machine_cores']:.2f}]"
            )
    if "procrastinate" in results:
        pro = results["procrastinate"]["jobs_per_s"]
        ratio = ""
        if "worker_defaults" in results:
            ratio = f"; (a) defaults = {results['worker_defaults']['tasks_per_s'] / pro:.1f}x"
        print(f"  (c) Procrastinate, concurrency 10   {pro:7.0f} jobs/s{ratio}")
    if "bare_latency" in results or "worker_latency" in results:
        print(f"3-step chain at {args.rate:.0f} runs/s for {args.seconds:.0f} s, run latency:")
        for key, label in (
            ("bare_latency", "(b) bare loop polling every 10 ms"),
            ("worker_latency", "(a) worker, defaults"),
        ):
            if key in results:
                lat = results[key]
                print(
                    f"  {label:<36} p50 {lat['p50_ms']:6.1f} ms, p95 {lat['p95_ms']:6.1f} ms"
                    f"  ({lat['completed']}/{lat['runs']} completed)"
                )
    if "root_map" in results:
        root = results["root_map"]
        bare = root["bare_s"]
        print(f"one run, root map of {root['size']} items, from start_flow's commit to completion:")
        print(f"  (b) bare loop, batch 50                {bare:6.1f} s")
        for flow, label in (
            ("bench_root_map", "(a) worker, defaults"),
            ("bench_root_map_ctx", "(a) worker, handler reads ctx"),
        ):
            print(f"  {label:<38} {root[flow]:6.1f} s = {root[flow] / bare:.2f}x (b)")
    if "backlog" in results:
        rows = results["backlog"]
        print("one worker (defaults) draining one-step runs, tasks/s with runs waiting:")
        for row in rows:
            print(
                f"  {row['waiting']:>7,} waiting                       {row['tasks_per_s']:7.0f}"
                f" tasks/s  (queued in {row['queued_s']:.0f} s)"
            )
        if len(rows) == 2:
            print(f"  ratio: {rows[1]['tasks_per_s'] / rows[0]['tasks_per_s']:.2f}")
    if "idle" in results:
        row = results["idle"]
        print(
            f"idle worker (defaults): {row['connections']} connections, "
            f"{row['queries_per_s']:.2f} transactions/s"
        )
    if "bulk_start" in results:
        row = results["bulk_start"]
        print(
            f"starting {row['runs']} runs in one transaction: start_flows {row['start_flows']:,.0f}"
            f" runs/s, start_flow per run {row['start_flow']:,.0f} runs/s"
            f" = {row['start_flows'] / row['start_flow']:.1f}x"
        )
    if "limits" in results:
        _report_limits(results["limits"], args.tasks)
    if "scale_out" in results:
        print(f"worker processes (defaults) on one database, {args.scale_tasks} tasks:")
        for row in results["scale_out"]:
            print(
                f"  {row['processes']} process(es)                      "
                f"{row['tasks_per_s']:7.0f} tasks/s  [workers {row['worker_cores']:.2f} cores,"
                f" machine {row['machine_cores']:.2f} of {psutil.cpu_count()},"
                f" {row['connections']} connections]"
            )


def _report_limits(rows: list[dict[str, Any]], tasks: int) -> None:
    print(f"one worker (defaults), {tasks} one-step no-op runs, concurrency limits:")
    base = rows[0]["tasks_per_s"]
    labels = {
        "bench_noop": "no limit",
        "bench_limited": "step limit 1000 (never binds)",
        "bench_capped": "step limit 5 (binds)",
    }
    for row in rows:
        print(
            f"  {labels[row['flow']]:<38} {row['tasks_per_s']:7.0f} tasks/s"
            f" = {row['tasks_per_s'] / base:.2f}x no limit"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=DEFAULT_SERVER)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--root-map-size", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=200_000, help="runs waiting (large)")
    parser.add_argument("--backlog-small", type=int, default=5000, help="runs waiting (small)")
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--idle-settle", type=float, default=17, help="seconds idle first")
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument("--scale-tasks", type=int, default=20_000)
    parser.add_argument(
        "--only", default=",".join(MEASUREMENTS), help=f"comma-separated: {', '.join(MEASUREMENTS)}"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    only = set(args.only.split(","))
    unknown = only - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    server = libpq(args.database_url)

    results: dict[str, Any] = {"tasks": args.tasks}
    try:
        if "throughput" in only:
            results["bare"] = bare_throughput(server, args.tasks)
            results["worker_defaults"] = worker_throughput(server, args.tasks, [])
            results["worker_tuned"] = worker_throughput(server, args.tasks, TUNED)
        if "procrastinate" in only:
            results["procrastinate"] = procrastinate(server, args.tasks)
        if "latency" in only:
            results["bare_latency"] = bare_latency(server, args.rate, args.seconds)
            results["worker_latency"] = worker_latency(server, args.rate, args.seconds)
        if "root-map" in only:
            results["root_map"] = root_map(server, args.root_map_size)
        if "backlog" in only:
            measured = args.backlog_small * 8 // 10
            results["backlog"] = [
                backlog(server, args.backlog_small, measured),
                backlog(server, args.backlog, measured),
            ]
        if "idle" in only:
            results["idle"] = idle(server, args.idle_seconds, args.idle_settle)
        if "bulk-start" in only:
            results["bulk_start"] = bulk_start.measure(
                server, runs=min(2000, args.tasks), rounds=args.bulk_rounds
            )
        if "scale-out" in only:
            results["scale_out"] = scale_out(server, args.scale_tasks)
        if "limits" in only:
            results["limits"] = limits(server, args.tasks)
    finally:
        drop_databases(server)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
