"""pgflow-sa benchmarks: worker throughput against a bare protocol loop and
Procrastinate, chain latency at a steady rate, worker RSS and connections.

    python benchmarks/run.py [--database-url URL] [--tasks N] [--json out.json]
    python benchmarks/run.py --root-map-only [--root-map-size N]   # just the root map

Without --database-url it uses PGFLOW_SA_BENCH_DATABASE_URL, else the server at
127.0.0.1:5432. Each measurement uses a fresh database on that server; the
figures that matter are ratios measured in the same run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "pgflow-sa")
sys.path.insert(0, str(HERE))

from bench_app import chain, noop, root_map, root_map_ctx, wide  # noqa: E402

from pgflow_sa import deploy_flows, install_schema  # noqa: E402
from pgflow_sa.config import to_sqlalchemy_url  # noqa: E402

BATCH = 10
CONCURRENCY = 10


def libpq(url: str) -> str:
    return to_sqlalchemy_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


CREATED: set[str] = set()


def fresh_database(server: str, name: str) -> str:
    CREATED.add(name)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = to_sqlalchemy_url(server).set(database=name, drivername="postgresql")
    return url.render_as_string(hide_password=False)


def drop_databases(server: str) -> None:
    """Drop the databases this run created (the figures are printed by then)."""
    with psycopg.connect(server, autocommit=True) as conn:
        for name in sorted(CREATED):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def prepare_pgflow(url: str) -> None:
    install_schema(url)
    deploy_flows(url, [noop, chain, wide, root_map, root_map_ctx])


def start_runs(url: str, flow: str, count: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT count(*) FROM generate_series(1, %s) i, "
            "LATERAL pgflow.start_flow(%s, jsonb_build_object('i', i))",
            [count, flow],
        )


def finished(url: str, flow: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pgflow.runs WHERE flow_slug = %s AND status <> 'started'", [flow]
        ).fetchone()[0]


def connections(url: str, pids_excluded: set[int]) -> int:
    with psycopg.connect(url) as conn:
        db = conn.info.dbname
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [db]
        ).fetchall()
    return len([r for r in rows if r[0] not in pids_excluded])


# --- (a) the pgflow-sa worker -------------------------------------------------------


def start_worker(
    url: str, flow: str, extra_env: dict[str, str] | None = None, *, defaults: bool = False
) -> subprocess.Popen[bytes]:
    """A ``pgflow-sa worker`` for one flow: concurrency CONCURRENCY and batch BATCH, or
    with ``defaults`` every setting left at the worker's own default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
    # the caller's PYTHONPATH stays behind bench_app's folder (to measure another checkout)
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env.update({"PYTHONPATH": path}, **(extra_env or {}))
    # stderr goes to a file, not a pipe nobody reads: a worker logging a lot (a loop
    # failing over and over) would otherwise block on a full pipe and look idle
    log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open while the worker runs
    tuning = [] if defaults else ["--concurrency", str(CONCURRENCY), "--batch-size", str(BATCH)]
    proc = subprocess.Popen(
        [
            CLI,
            "worker",
            "bench_app:flows",
            "--flow",
            flow,
            *tuning,
            "--database-url",
            url,
            "--log-level",
            "WARNING",
        ],
        env=env,
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    WORKER_LOGS[proc.pid] = log
    return proc


WORKER_LOGS: dict[int, Any] = {}


def worker_error(worker: subprocess.Popen[bytes], message: str) -> RuntimeError:
    """``message`` with the end of the worker's stderr."""
    tail = ""
    log = WORKER_LOGS.get(worker.pid)
    if log is not None:
        log.seek(0)
        tail = log.read()[-3000:].decode(errors="replace")
    return RuntimeError(f"{message}; the worker's stderr ends with:\n{tail}")


def wait_ready(
    url: str, flow: str, worker: subprocess.Popen[bytes] | None = None, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker is not None and worker.poll() is not None:
            raise worker_error(worker, f"the worker exited with {worker.returncode}")
        with psycopg.connect(url) as conn:
            if conn.execute(
                "SELECT count(*) FROM pgflow.workers WHERE queue_name = %s", [flow]
            ).fetchone()[0]:
                return
        time.sleep(0.05)
    if worker is not None:
        raise worker_error(worker, "the worker did not register")
    raise RuntimeError("the worker did not register")


def bench_worker(server: str, tasks: int) -> dict[str, Any]:
    url = fresh_database(server, "pgflow_sa_bench_worker")
    prepare_pgflow(url)
    worker = start_worker(url, "bench_noop")
    try:
        wait_ready(url, "bench_noop", worker)
        start_runs(url, "bench_noop", tasks)
        started = time.perf_counter()
        rss = 0
        conns = 0
        deadline = time.monotonic() + 600
        while finished(url, "bench_noop") < tasks:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise worker_error(worker, "the worker did not finish the runs")
            rss = max(rss, psutil.Process(worker.pid).memory_info().rss)
            conns = max(conns, connections(url, set()))
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu = psutil.Process(worker.pid).cpu_times()
    finally:
        worker.terminate()
        worker.wait(30)
    return {
        "tasks_per_s": tasks / elapsed,
        "rss_mib": rss / 2**20,
        "connections": conns,
        "cpu_s": cpu.user + cpu.system,
        "elapsed_s": elapsed,
    }


def bench_map(server: str, size: int, plan_cache_mode: str) -> dict[str, Any]:
    """One run whose root map step has ``size`` no-op tasks, drained by the worker
    with the given plan_cache_mode: every completion updates the same step state, and
    pgflow's functions plan their statements per call under force_custom_plan."""
    url = fresh_database(server, "pgflow_sa_bench_map")
    prepare_pgflow(url)
    worker = start_worker(url, "bench_wide", {"PGFLOW_SA_WORKER_PLAN_CACHE_MODE": plan_cache_mode})
    try:
        wait_ready(url, "bench_wide", worker)
        started = time.perf_counter()
        with psycopg.connect(url) as conn:
            conn.execute(
                "SELECT pgflow.start_flow('bench_wide', to_jsonb(array(SELECT generate_series(1, %s))))",
                [size],
            )
        deadline = time.monotonic() + 600
        while finished(url, "bench_wide") < 1:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise worker_error(worker, "the worker did not finish the map")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(30)
    return {"size": size, "plan_cache_mode": plan_cache_mode, "tasks_per_s": size / elapsed}


# --- (b) a bare protocol loop --------------------------------------------------------

CLAIM = "SELECT * FROM pgflow.start_tasks($1, (SELECT coalesce(array_agg(msg_id), '{}') FROM pgmq.read($1, 30, $2)), $3)"
COMPLETE = (
    "SELECT count(*) FROM unnest($1::uuid[], $2::text[], $3::int[]) AS t(run_id, step_slug, task_index), "
    "LATERAL pgflow.complete_task(t.run_id, t.step_slug, t.task_index, '1'::jsonb)"
)


async def bare_loop(url: str, flow: str, tasks: int, loops: int = 2) -> tuple[float, float]:
    """Drain ``tasks`` tasks of ``flow`` (already queued); (seconds, CPU seconds of this
    process)."""
    pool = await asyncpg.create_pool(url, min_size=loops, max_size=loops)
    worker_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'bare')",
        worker_id,
        flow,
    )
    done = 0

    cpu_before = psutil.Process().cpu_times()

    async def loop() -> None:
        nonlocal done
        idle_since = time.monotonic()
        async with pool.acquire() as conn:
            while done < tasks:
                claimed = await conn.fetch(CLAIM, flow, BATCH, worker_id)
                if not claimed:
                    if time.monotonic() - idle_since > 10:
                        raise RuntimeError(f"bare loop idle with {done}/{tasks} done")
                    await asyncio.sleep(0.001)
                    continue
                idle_since = time.monotonic()
                await conn.fetchval(
                    COMPLETE,
                    [r["run_id"] for r in claimed],
                    [r["step_slug"] for r in claimed],
                    [r["task_index"] for r in claimed],
                )
                done += len(claimed)

    started = time.perf_counter()
    await asyncio.gather(*[loop() for _ in range(loops)])
    elapsed = time.perf_counter() - started
    cpu_after = psutil.Process().cpu_times()
    await pool.close()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return elapsed, cpu


def bench_bare(server: str, tasks: int) -> dict[str, Any]:
    url = fresh_database(server, "pgflow_sa_bench_bare")
    prepare_pgflow(url)
    start_runs(url, "bench_noop", tasks)
    elapsed, cpu = asyncio.run(bare_loop(url, "bench_noop", tasks))
    print(f"    bare loop CPU {cpu / elapsed:.0%} of a core", file=sys.stderr)
    return {"tasks_per_s": tasks / elapsed}


# --- one run with a 10,000-item root map: the bare loop against the worker --------------
#
# Both drain the same run, input list(range(size)), each on a fresh database. The time
# is the server's: from just after start_flow committed (every task queued) to the
# run's completed_at, so the same clock and end point serve both.

START_ROOT_MAP = (
    "SELECT run_id FROM pgflow.start_flow(%s, to_jsonb(array(SELECT generate_series(0, %s - 1))))"
)


def start_root_map(conn: psycopg.Connection[Any], flow: str, size: int) -> tuple[Any, float, Any]:
    """Start one run of ``flow`` with input list(range(size)); (run_id, seconds
    start_flow took, the server's clock once it had committed)."""
    began = time.perf_counter()
    run_id = conn.execute(START_ROOT_MAP, [flow, size]).fetchone()[0]
    took = time.perf_counter() - began
    queued_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    return run_id, took, queued_at


# tasks completed in one transaction share their completed_at (pgflow sets it to now())
COMPLETIONS = """
SELECT count(*), max(tasks)
FROM (SELECT count(*) AS tasks FROM pgflow.step_tasks WHERE run_id = %s GROUP BY completed_at) AS t
"""


def run_drained(conn: psycopg.Connection[Any], run_id: Any, queued_at: Any) -> dict[str, float]:
    """Seconds from ``queued_at`` to the run's completion (drain_s) and to its first
    task's start (first_task_s: how long the drainer took to notice); the transactions
    that completed the tasks (completions) and the most tasks one of them completed
    (largest_completion). Raises unless the run completed."""
    status, drain, first = conn.execute(
        "SELECT status, extract(epoch FROM completed_at - %(at)s), "
        "(SELECT extract(epoch FROM min(started_at) - %(at)s) FROM pgflow.step_tasks t "
        " WHERE t.run_id = r.run_id) "
        "FROM pgflow.runs r WHERE run_id = %(run)s",
        {"at": queued_at, "run": run_id},
    ).fetchone()
    if status != "completed":
        raise RuntimeError(f"the root-map run ended {status}, not completed")
    completions, largest = conn.execute(COMPLETIONS, [run_id]).fetchone()
    return {
        "drain_s": float(drain),
        # started_at is its transaction's start, which may precede queued_at by a moment
        "first_task_s": max(0.0, float(first)),
        "completions": completions,
        "largest_completion": largest,
    }


def bench_root_map_bare(server: str, size: int) -> dict[str, Any]:
    url = fresh_database(server, "pgflow_sa_bench_root_map_bare")
    prepare_pgflow(url)
    with psycopg.connect(url, autocommit=True) as conn:
        run_id, start_s, queued_at = start_root_map(conn, "bench_root_map", size)
        _, cpu = asyncio.run(bare_loop(url, "bench_root_map", size))
        drained = run_drained(conn, run_id, queued_at)
    return {**drained, "start_flow_s": start_s, "cpu_s": cpu}


def bench_root_map_worker(server: str, size: int, flow: str) -> dict[str, Any]:
    """The run drained by a ``pgflow-sa worker`` with its default settings; gives up
    when no task has completed for a minute."""
    url = fresh_database(server, f"pgflow_sa_bench_{flow.removeprefix('bench_')}")
    prepare_pgflow(url)
    worker = start_worker(url, flow, defaults=True)
    rss = 0
    try:
        wait_ready(url, flow, worker)
        with psycopg.connect(url, autocommit=True) as conn:
            run_id, start_s, queued_at = start_root_map(conn, flow, size)
            remaining, progress_at = size, time.monotonic()
            while True:
                status, left = conn.execute(
                    "SELECT r.status, s.remaining_tasks FROM pgflow.runs r "
                    "JOIN pgflow.step_states s USING (run_id) WHERE r.run_id = %s",
                    [run_id],
                ).fetchone()
                if status != "started":
                    break
                if left != remaining:
                    remaining, progress_at = left, time.monotonic()
                elif time.monotonic() - progress_at > 60:
                    raise worker_error(worker, f"no {flow} task completed for 60 s ({left} left)")
                if worker.poll() is not None:
                    raise worker_error(worker, f"the worker exited with {worker.returncode}")
                rss = max(rss, psutil.Process(worker.pid).memory_info().rss)
                time.sleep(0.05)
            drained = run_drained(conn, run_id, queued_at)
        cpu = psutil.Process(worker.pid).cpu_times()
    finally:
        worker.terminate()
        worker.wait(30)
    return {
        **drained,
        "start_flow_s": start_s,
        "cpu_s": cpu.user + cpu.system,
        "rss_mib": rss / 2**20,
    }


def bench_root_map(server: str, size: int, with_ctx: bool) -> dict[str, Any]:
    bare = bench_root_map_bare(server, size)
    worker = bench_root_map_worker(server, size, "bench_root_map")
    result: dict[str, Any] = {
        "size": size,
        "bare": bare,
        "worker": worker,
        "ratio": worker["drain_s"] / bare["drain_s"],
    }
    if with_ctx:
        ctx = bench_root_map_worker(server, size, "bench_root_map_ctx")
        result["worker_ctx"] = ctx
        result["ratio_ctx"] = ctx["drain_s"] / bare["drain_s"]
    return result


# --- (c) Procrastinate ------------------------------------------------------------------


def bench_procrastinate(server: str, tasks: int) -> dict[str, Any]:
    url = fresh_database(server, "pgflow_sa_bench_procrastinate")
    proc = subprocess.run(
        [sys.executable, str(HERE / "procrastinate_bench.py"), url, str(tasks), str(CONCURRENCY)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"procrastinate benchmark failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- chain latency ---------------------------------------------------------------------


STALE_TABLES = ("runs", "step_states", "step_tasks")


def bench_latency(
    server: str,
    rate: float,
    seconds: float,
    *,
    stale: bool = False,
    plan_cache_mode: str | None = None,
) -> dict[str, Any]:
    """Chain latency at a steady rate. ``stale``: the pgflow tables are ANALYZEd while
    empty before the worker starts and again (as autovacuum would) once a quarter of
    the runs have started; sessions that cached generic plans for the empty tables
    keep them, sessions planning each call pick up the new statistics."""
    url = fresh_database(server, "pgflow_sa_bench_latency")
    prepare_pgflow(url)
    if stale:
        with psycopg.connect(url, autocommit=True) as conn:
            for table in STALE_TABLES:
                conn.execute(f"ANALYZE pgflow.{table}")
    extra = {"PGFLOW_SA_WORKER_PLAN_CACHE_MODE": plan_cache_mode} if plan_cache_mode else None
    worker = start_worker(url, "bench_chain", extra)
    try:
        wait_ready(url, "bench_chain", worker)
        count = int(rate * seconds)
        with psycopg.connect(url, autocommit=True) as conn:
            begin = time.perf_counter()
            for i in range(count):
                if stale and i == count // 4:
                    for table in STALE_TABLES:
                        conn.execute(f"ANALYZE pgflow.{table}")
                target = begin + i / rate
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn.execute("SELECT pgflow.start_flow('bench_chain', '{}'::jsonb)")
        deadline = time.monotonic() + 60
        while finished(url, "bench_chain") < count and time.monotonic() < deadline:
            time.sleep(0.1)
        rss = psutil.Process(worker.pid).memory_info().rss
        with psycopg.connect(url) as conn:
            latencies = [
                float(r[0]) * 1000
                for r in conn.execute(
                    "SELECT extract(epoch FROM completed_at - started_at) FROM pgflow.runs "
                    "WHERE status = 'completed'"
                )
            ]
        conns = connections(url, set())
    finally:
        worker.terminate()
        worker.wait(30)
    tail = latencies[-max(1, len(latencies) // 4) :]  # the last runs started
    latencies.sort()
    return {
        "runs": count,
        "completed": len(latencies),
        "p50_ms": statistics.median(latencies),
        "last_quarter_p50_ms": statistics.median(tail),
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1],
        "rss_mib": rss / 2**20,
        "connections": conns,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "PGFLOW_SA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["procrastinate", "latency", "stale-plans", "map", "root-map", "root-map-ctx"],
    )
    parser.add_argument(
        "--map-sizes", default="1000,4000", help="comma-separated sizes of the one-run map"
    )
    parser.add_argument(
        "--root-map-size",
        type=int,
        default=10_000,
        help="items of the one-run root map drained by the bare loop and by the worker with "
        "its default settings (0: skip)",
    )
    parser.add_argument(
        "--root-map-only",
        action="store_true",
        help="run only the root-map measurement (bare loop, worker, worker with ctx)",
    )
    parser.add_argument("--stale-rate", type=float, default=200)
    parser.add_argument("--stale-seconds", type=float, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server = libpq(args.database_url)

    results: dict[str, Any] = {"tasks": args.tasks, "batch": BATCH, "concurrency": CONCURRENCY}
    only = args.root_map_only
    try:
        if not only:
            results["bare"] = bench_bare(server, args.tasks)
            results["worker"] = bench_worker(server, args.tasks)
        if "procrastinate" not in args.skip and not only:
            results["procrastinate"] = bench_procrastinate(server, args.tasks)
        if "latency" not in args.skip and not only:
            results["chain_latency"] = bench_latency(server, args.rate, args.seconds)
        if "stale-plans" not in args.skip and not only:
            for mode in ("auto", "force_custom_plan"):
                results[f"stale_plans_{mode}"] = bench_latency(
                    server, args.stale_rate, args.stale_seconds, stale=True, plan_cache_mode=mode
                )
        if "map" not in args.skip and not only:
            results["map"] = [
                bench_map(server, int(size), mode)
                for size in args.map_sizes.split(",")
                for mode in ("auto", "force_custom_plan")
            ]
        if args.root_map_size > 0 and "root-map" not in args.skip:
            results["root_map"] = bench_root_map(
                server, args.root_map_size, "root-map-ctx" not in args.skip
            )
    finally:
        drop_databases(server)

    if "worker" in results:
        worker, bare = results["worker"]["tasks_per_s"], results["bare"]["tasks_per_s"]
        print(f"(b) bare protocol loop      {bare:8.0f} tasks/s")
        cpu_share = results["worker"]["cpu_s"] / results["worker"]["elapsed_s"]
        print(f"    worker process CPU: {cpu_share:.0%} of a core", file=sys.stderr)
        print(
            f"(a) pgflow-sa worker        {worker:8.0f} tasks/s  = {worker / bare:.0%} of (b)"
            f"  [RSS {results['worker']['rss_mib']:.0f} MiB, {results['worker']['connections']} connections]"
        )
    if "procrastinate" in results:
        pro = results["procrastinate"]["jobs_per_s"]
        print(f"(c) procrastinate           {pro:8.0f} jobs/s   (a)/(c) = {worker / pro:.2f}x")
    if "chain_latency" in results:
        lat = results["chain_latency"]
        print(
            f"3-step chain at {args.rate:.0f} runs/s: p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms "
            f"({lat['completed']}/{lat['runs']} completed) [RSS {lat['rss_mib']:.0f} MiB, "
            f"{lat['connections']} connections]"
        )
    for mode in ("auto", "force_custom_plan"):
        key = f"stale_plans_{mode}"
        if key in results:
            lat = results[key]
            print(
                f"stale statistics, chain at {args.stale_rate:.0f} runs/s, plan_cache_mode={mode}: "
                f"p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms, last quarter p50 "
                f"{lat['last_quarter_p50_ms']:.1f} ms ({lat['completed']}/{lat['runs']} completed)"
            )
    for entry in results.get("map", []):
        print(
            f"one run, map of {entry['size']} tasks, plan_cache_mode={entry['plan_cache_mode']}: "
            f"{entry['tasks_per_s']:.0f} tasks/s"
        )
    if "root_map" in results:
        root = results["root_map"]
        size = root["size"]
        print(
            f"one run, root map of {size} items (start_flow {root['bare']['start_flow_s']:.1f} s), "
            "from start_flow's commit to the run's completion:"
        )
        rows = [("(b) bare protocol loop", root["bare"], "")]
        rows.append(("(a) pgflow-sa worker", root["worker"], f"  = {root['ratio']:.2f}x (b)"))
        if "worker_ctx" in root:
            ratio = f"  = {root['ratio_ctx']:.2f}x (b)"
            rows.append(("(a) worker, reading ctx", root["worker_ctx"], ratio))
        for label, entry, ratio in rows:
            rss = f", RSS {entry['rss_mib']:.0f} MiB" if "rss_mib" in entry else ""
            print(
                f"  {label:<25} {entry['drain_s']:7.1f} s  ({size / entry['drain_s']:4.0f} tasks/s, "
                f"first task after {entry['first_task_s']:.2f} s){ratio}"
                f"  [{entry['completions']} completing transactions, largest"
                f" {entry['largest_completion']} tasks; CPU {entry['cpu_s']:.1f} s{rss}]"
            )
        print("  target: (a) <= 1.5x (b)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
