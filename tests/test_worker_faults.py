"""Fault injection for the worker: every test breaks one promise of the worker on
purpose (a frozen worker, a lowered timeout, a locked row, a hung handler, a dropped
flow, a killed connection) and checks that each task's effects commit exactly once,
by the worker that still owns the task."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.types.json import Jsonb

from pgflow_sa import Context, Flow, deploy_flows, install_schema
from pgflow_sa._db import sync_engine
from pgflow_sa.schema.deploy import drop_flow
from pgflow_sa.worker import WorkerSettings

from .apps import faults_app
from .helpers import CLI
from .worker_harness import deploy, running_worker

APPS = Path(__file__).parent / "apps"
APP = "faults_app:flows"
LOG = ("--log-level", "DEBUG")
#: what the worker names its own connections (pg_stat_activity.application_name)
WORKER_APPLICATION_NAME = "pgflow-sa worker"
#: the test's own sessions must not be cut short by timeouts set on the database
UNLIMITED = "-c statement_timeout=0 -c lock_timeout=0"

T = TypeVar("T")


# --- database helpers -------------------------------------------------------------------


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement in its own autocommit session; its rows (if any)."""
    with psycopg.connect(url, autocommit=True, options=UNLIMITED) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


async def asql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """:func:`sql` without blocking the event loop (for in-process workers)."""
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, options=UNLIMITED
    ) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


START_RUN = "SELECT run_id FROM pgflow.start_flow(%s, %s)"
TASK = (
    "SELECT status, attempts_count, error_message, output, last_worker_id "
    "FROM pgflow.step_tasks WHERE run_id = %s"
)
RUN_STATUS = "SELECT status FROM pgflow.runs WHERE run_id = %s"
RUN_STATUSES = "SELECT run_id, status FROM pgflow.runs WHERE run_id = ANY(%s)"
LIVE_WORKERS = "SELECT count(*) FROM pgflow.workers WHERE queue_name = %s AND deprecated_at IS NULL"


def start_run(url: str, flow_slug: str, input: Any = None) -> uuid.UUID:
    return sql(url, START_RUN, [flow_slug, Jsonb(input if input is not None else {})])[0][0]


async def astart_run(url: str, flow_slug: str, input: Any = None) -> uuid.UUID:
    rows = await asql(url, START_RUN, [flow_slug, Jsonb(input if input is not None else {})])
    return rows[0][0]


def task_of(url: str, run_id: uuid.UUID) -> tuple[Any, ...]:
    """(status, attempts_count, error_message, output, last_worker_id) of a one-task run."""
    rows = sql(url, TASK, [run_id])
    assert len(rows) == 1, rows
    return rows[0]


# --- waiting ---------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned); AssertionError
    naming ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_until_or_none(condition: Callable[[], T], timeout: float) -> T | None:
    """:func:`wait_until`, but None instead of an AssertionError on timeout."""
    try:
        return wait_until(condition, timeout, "")
    except AssertionError:
        return None


async def until(
    condition: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.05
) -> T:
    """:func:`wait_until` for async conditions, sleeping without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def wait_run_finished(url: str, run_id: uuid.UUID, timeout: float) -> str:
    """The run's final status; its current one ('started') if it did not finish in time."""
    deadline = time.monotonic() + timeout
    while True:
        status = sql(url, RUN_STATUS, [run_id])[0][0]
        if status != "started" or time.monotonic() > deadline:
            return str(status)
        time.sleep(0.1)


async def runs_finished(url: str, run_ids: list[uuid.UUID], timeout: float) -> dict[Any, str]:
    """{run_id: status} once no run is 'started' any more, or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = dict(await asql(url, RUN_STATUSES, [run_ids]))
        if "started" not in statuses.values() or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.1)


# --- worker subprocesses -----------------------------------------------------------------


#: fast polling, heartbeats and recovery; a worker is gone after 3 s without a heartbeat
FAST = {
    "POLL_INTERVAL": "0.5",
    "FALLBACK_POLL_INTERVAL": "0.05",
    "HEARTBEAT_INTERVAL": "0.3",
    "RECOVERY_INTERVAL": "0.3",
    "STALL_MARGIN": "3",
    "MAX_BACKOFF": "0.5",
}


#: FAST, for in-process workers
FAST_SETTINGS = WorkerSettings(
    poll_interval=0.5,
    fallback_poll_interval=0.05,
    heartbeat_interval=0.3,
    recovery_interval=0.3,
    stall_margin=3,
    max_backoff=0.5,
    shutdown_timeout=5,
)


def worker_env(**settings: str) -> dict[str, str]:
    """PGFLOW_SA_WORKER_<NAME> variables for a worker process: FAST, then NAME=value."""
    return {f"PGFLOW_SA_WORKER_{name}": value for name, value in {**FAST, **settings}.items()}


class WorkerProcess:
    """`pgflow-sa worker faults_app:flows --flow SLUG` as a real process, logging to a file."""

    def __init__(
        self, url: str, log: Path, flow_slug: str, env: dict[str, str], *args: str
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
        full_env.update(env)
        # keep an inherited PYTHONPATH first (it may point at another pgflow_sa)
        inherited = os.environ.get("PYTHONPATH")
        full_env["PYTHONPATH"] = os.pathsep.join([p for p in (inherited, str(APPS)) if p])
        self.log = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [CLI, "worker", APP, "--flow", flow_slug, "--database-url", url, *LOG, *args],
            env=full_env,
            cwd=APPS,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self._file.closed:
            self._file.flush()
        return self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; the exit code, or None if it did not exit in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)  # a frozen worker cannot handle SIGTERM
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self._file.close()


@pytest.fixture
def spawn(db_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes (killed at the end of the test if still running)."""
    started: list[WorkerProcess] = []

    def start(name: str, flow_slug: str, env: dict[str, str], *args: str) -> WorkerProcess:
        worker = WorkerProcess(db_url, tmp_path / f"{name}.log", flow_slug, env, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def wait_registered(url: str, flow_slug: str, count: int, worker: WorkerProcess) -> None:
    """Until ``count`` live pgflow.workers rows serve ``flow_slug`` (the newest being
    ``worker``'s, which must not have exited meanwhile)."""

    def registered() -> bool:
        assert worker.alive(), worker.output()
        return sql(url, LIVE_WORKERS, [flow_slug])[0][0] >= count

    wait_until(registered, 30, f"worker {worker.log.stem} to register")


def prepare(url: str, slug: str) -> None:
    """Deploy one flow of faults_app and create the table its handlers write to."""
    deploy(url, faults_app.flows.get(slug))
    sql(url, faults_app.FAULT_WRITES_DDL)


def writes(url: str, run_id: uuid.UUID) -> list[tuple[int, int]]:
    """(attempt, pid) of every committed handler write of a run."""
    return sql(url, "SELECT attempt, pid FROM fault_writes WHERE run_id = %s ORDER BY at", [run_id])


def lost_lines(output: str) -> list[str]:
    """Log lines saying the worker lost a task (not its notification connection)."""
    return [
        line
        for line in output.splitlines()
        if "lost" in line.lower() and "notification" not in line.lower()
    ]


# --- 1. a timeout lowered under a running task ----------------------------------------------


def test_a_lowered_timeout_never_commits_a_task_twice(
    db_url: str, spawn: Callable[..., WorkerProcess]
) -> None:
    """A migration lowers a step's timeout (30 -> 3 s) while a worker runs its task
    for 8 s. The task keeps the timeout it was claimed with, and a second worker never
    takes it from its live, heartbeating owner: it commits once, on attempt 1."""
    prepare(db_url, "f_lowered")
    env = worker_env(SHUTDOWN_TIMEOUT="10")
    a = spawn("a", "f_lowered", env)
    wait_registered(db_url, "f_lowered", 1, a)
    run_id = start_run(db_url, "f_lowered")
    wait_until(lambda: task_of(db_url, run_id)[0] == "started", 15, "worker A to start the task")
    b = spawn("b", "f_lowered", env)
    wait_registered(db_url, "f_lowered", 2, b)
    sql(
        db_url,
        "UPDATE pgflow.steps SET opt_timeout = 3 "
        "WHERE flow_slug = 'f_lowered' AND step_slug = 'long_write'",
    )
    status = wait_run_finished(db_url, run_id, 40)
    codes = (a.stop(), b.stop())  # lets any second attempt finish and commit
    status_, attempts, error, output, _ = task_of(db_url, run_id)
    logs = a.output() + b.output()
    assert (status, status_) == ("completed", "completed"), logs
    assert writes(db_url, run_id) == [(1, a.pid)], logs
    assert (attempts, error, output) == (1, None, {"pid": a.pid}), logs
    assert codes == (0, 0), logs


# --- 2. a frozen worker's late settle ---------------------------------------------------------


def test_a_late_settle_is_fenced(db_url: str, spawn: Callable[..., WorkerProcess]) -> None:
    """Worker A is frozen (SIGSTOP) mid-task; its heartbeat goes stale, so worker B
    retries the task (attempt 2). A thaws while B's attempt runs and finishes its
    handler: its completion and its ctx.session write must not apply (A lost the
    task), and B's do."""
    prepare(db_url, "f_fenced")
    env = worker_env(STALL_MARGIN="2", SHUTDOWN_TIMEOUT="10")
    a = spawn("a", "f_fenced", env)
    wait_registered(db_url, "f_fenced", 1, a)
    run_id = start_run(db_url, "f_fenced")
    wait_until(lambda: task_of(db_url, run_id)[0] == "started", 15, "worker A to start the task")
    a.proc.send_signal(signal.SIGSTOP)
    b = spawn("b", "f_fenced", env)
    wait_registered(db_url, "f_fenced", 2, b)
    wait_until(
        lambda: task_of(db_url, run_id)[:2] == ("started", 2),
        30,
        "worker B to start attempt 2",
    )
    a.proc.send_signal(signal.SIGCONT)  # B's attempt still runs for ~4 s
    status = wait_run_finished(db_url, run_id, 30)
    # A's handler ended on thawing; give its settle the time to be tried and logged
    lost = wait_until_or_none(lambda: lost_lines(a.output()), 5)
    codes = (a.stop(), b.stop())
    _, attempts, _, output, _ = task_of(db_url, run_id)
    logs = f"--- A (pid {a.pid}):\n{a.output()}\n--- B (pid {b.pid}):\n{b.output()}"
    assert status == "completed", logs
    assert (output, attempts) == ({"pid": b.pid}, 2), logs
    assert writes(db_url, run_id) == [(2, b.pid)], logs
    assert lost, logs
    assert codes == (0, 0), logs


# --- 3. a transient database error while settling -----------------------------------------------

transient = Flow("f_transient", timeout=10, max_attempts=1)


@transient.step
async def slow_answer(input: Any, ctx: Context) -> dict[str, int]:
    await asyncio.sleep(1.5)
    return {"attempt": ctx.attempt}


@pytest.mark.parametrize(
    ("setting", "value"), [("lock_timeout", "300ms"), ("statement_timeout", "500ms")]
)
async def test_a_transient_error_while_settling_keeps_the_result(
    db_url: str, setting: str, value: str
) -> None:
    """The run row is locked (by a long transaction elsewhere) when the handler
    returns, so completing the task hits the database's lock_timeout (55P03) or
    statement_timeout (57014). Those are transient: the completion is retried and the
    result kept, not dropped as a refusal."""
    deploy(db_url, transient)
    await asql(db_url, f"ALTER DATABASE \"{database_name(db_url)}\" SET {setting} = '{value}'")
    settings = replace(FAST_SETTINGS, max_concurrency=2, stall_margin=2)
    async with running_worker(transient, db_url, settings=settings):
        run_id = await astart_run(db_url, "f_transient")

        async def started() -> bool:
            return (await asql(db_url, TASK, [run_id]))[0][0] == "started"

        await until(started, 15, "the task to start")
        async with await psycopg.AsyncConnection.connect(db_url, options=UNLIMITED) as locker:
            await locker.execute("SELECT 1 FROM pgflow.runs WHERE run_id = %s FOR UPDATE", [run_id])
            await asyncio.sleep(3)  # the handler returns after 1.5 s
            await locker.commit()
        statuses = await runs_finished(db_url, [run_id], 8)
    status, attempts, error, output, _ = (await asql(db_url, TASK, [run_id]))[0]
    assert (statuses[run_id], status) == ("completed", "completed"), error
    assert (output, attempts, error) == ({"attempt": 1}, 1, None)


# --- 4. max_concurrency over all flows -------------------------------------------------------

concurrency = {"now": 0, "max": 0}


def _counting_flow(slug: str) -> Flow:
    flow = Flow(slug, max_attempts=1, timeout=10)

    @flow.step(slug="count")
    async def count(input: Any) -> int:
        concurrency["now"] += 1
        concurrency["max"] = max(concurrency["max"], concurrency["now"])
        try:
            await asyncio.sleep(0.3)
        finally:
            concurrency["now"] -= 1
        return 1

    return flow


counted = [_counting_flow(f"f_counted_{n}") for n in range(3)]


async def test_max_concurrency_is_one_budget_over_all_flows(db_url: str) -> None:
    """Three flows with work waiting, max_concurrency=2: never more than 2 handlers
    at once in the process, whichever flows they belong to."""
    deploy(db_url, *counted)
    concurrency.update(now=0, max=0)
    run_ids = [await astart_run(db_url, flow.slug) for flow in counted for _ in range(6)]
    settings = replace(FAST_SETTINGS, max_concurrency=2, batch_size=10)
    async with running_worker(counted, db_url, settings=settings):
        statuses = await runs_finished(db_url, run_ids, 30)
    assert concurrency["max"] <= 2, concurrency
    assert list(statuses.values()) == ["completed"] * 18


# --- 5. timed-out sync handlers keep their slots ------------------------------------------------

hang_release = threading.Event()
stubborn = Flow("f_stubborn", timeout=3, max_attempts=1)


@stubborn.step
def maybe_hang(input: Any) -> str:
    if input.get("hang"):
        hang_release.wait(8)  # ignores the step timeout, as a blocking call does
        return "woke"
    return "quick"


async def test_timed_out_sync_handlers_keep_their_slots(db_url: str) -> None:
    """Two sync handlers overrun their 3 s timeout and block their threads for 8 s,
    with max_concurrency=2. Their tasks fail with a TimeoutError, but the slots stay
    taken until the threads end: tasks claimed meanwhile would wait for a thread
    while their own timeout runs. Quick tasks started then still complete, on
    attempt 1."""
    deploy(db_url, stubborn)
    hang_release.clear()
    settings = replace(FAST_SETTINGS, max_concurrency=2, stall_margin=2)
    try:
        async with running_worker(stubborn, db_url, settings=settings):
            hung = [await astart_run(db_url, "f_stubborn", {"hang": True}) for _ in range(2)]

            async def both_started() -> bool:
                rows = await asql(
                    db_url,
                    "SELECT count(*) FROM pgflow.step_tasks WHERE run_id = ANY(%s) "
                    "AND status = 'started'",
                    [hung],
                )
                return rows[0][0] == 2

            await until(both_started, 15, "both hanging tasks to start")
            quick = [await astart_run(db_url, "f_stubborn", {}) for _ in range(4)]
            statuses = await runs_finished(db_url, hung + quick, 25)
    finally:
        hang_release.set()
    tasks = {
        row[0]: row[1:]
        for row in await asql(
            db_url,
            "SELECT run_id, status, attempts_count, error_message, output "
            "FROM pgflow.step_tasks WHERE run_id = ANY(%s)",
            [hung + quick],
        )
    }
    assert [tasks[r] for r in quick] == [("completed", 1, None, "quick")] * 4, tasks
    assert [statuses[r] for r in quick] == ["completed"] * 4
    assert [statuses[r] for r in hung] == ["failed"] * 2
    assert all(tasks[r][2].startswith("TimeoutError") for r in hung), tasks


# --- 6. SIGTERM with a handler that never returns ----------------------------------------------


def test_sigterm_exits_promptly_and_hands_back_a_hung_task(
    db_url: str, spawn: Callable[..., WorkerProcess]
) -> None:
    """A sync handler blocks for 10 minutes. On SIGTERM the worker waits its shutdown
    timeout (1 s), hands the task back (queued, the attempt not counted, its message
    visible) and exits 0 soon after, abandoning the thread."""
    prepare(db_url, "f_hangs")
    env = worker_env()
    worker = spawn("w", "f_hangs", env, "--shutdown-timeout", "1")
    wait_registered(db_url, "f_hangs", 1, worker)
    run_id = start_run(db_url, "f_hangs")
    wait_until(lambda: task_of(db_url, run_id)[0] == "started", 15, "the task to start")
    began = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = worker.proc.wait(1 + 5)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - began
    status, attempts, _, _, _ = task_of(db_url, run_id)
    visible = sql(db_url, "SELECT count(*) FROM pgmq.q_f_hangs WHERE vt <= clock_timestamp()")
    assert code == 0, f"exit code {code} after {took:.1f} s\n{worker.output()}"
    assert (status, attempts, visible) == ("queued", 0, [(1,)]), worker.output()


# --- 7a. the flow dropped and recreated under a live worker -------------------------------------

phoenix = Flow("f_phoenix", timeout=5, max_attempts=2, base_delay=1)


@phoenix.step
async def echo(input: Any) -> Any:
    return input


def _drop_and_redeploy(url: str) -> None:
    engine = sync_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
            drop_flow(conn, phoenix.slug)
            deploy_flows(conn, phoenix)
    finally:
        engine.dispose()


async def test_a_dropped_and_recreated_flow_is_served_again(db_url: str) -> None:
    """drop_flow + deploy_flows (a development reset) deletes the worker's
    pgflow.workers row and the queue under a live worker: it registers again and
    serves runs of the new flow."""
    deploy(db_url, phoenix)
    settings = replace(FAST_SETTINGS, max_concurrency=4, stall_margin=2)
    async with running_worker(phoenix, db_url, settings=settings):
        before = await astart_run(db_url, phoenix.slug, {"n": 1})
        assert await runs_finished(db_url, [before], 15) == {before: "completed"}
        await asyncio.to_thread(_drop_and_redeploy, db_url)
        after = await astart_run(db_url, phoenix.slug, {"n": 2})
        statuses = await runs_finished(db_url, [after], 15)
        workers = await asql(db_url, LIVE_WORKERS, [phoenix.slug])
    assert statuses == {after: "completed"}
    assert workers == [(1,)]


# --- 7b. plan_cache_mode on the worker's connections --------------------------------------------

plan_mode = Flow("f_plan_mode", timeout=10, max_attempts=1)


@plan_mode.step
async def show_plan_cache_mode(input: Any, ctx: Context) -> str:
    return str((await ctx.async_session.execute(sa.text("SHOW plan_cache_mode"))).scalar_one())


async def test_plan_cache_mode_is_applied_to_the_worker_connections(db_url: str) -> None:
    """Given only a database URL, the worker's connections (which async handlers share
    through ctx.async_session) use the configured plan_cache_mode."""
    deploy(db_url, plan_mode)
    settings = replace(FAST_SETTINGS, plan_cache_mode="force_generic_plan")
    async with running_worker(plan_mode, db_url, settings=settings):
        run_id = await astart_run(db_url, plan_mode.slug)
        statuses = await runs_finished(db_url, [run_id], 15)
    rows = await asql(db_url, "SELECT output FROM pgflow.step_tasks WHERE run_id = %s", [run_id])
    assert statuses == {run_id: "completed"}
    assert rows == [("force_generic_plan",)]


# --- 7c. connection_lifetime --------------------------------------------------------------------

idle = Flow("f_idle", timeout=10)


@idle.step
async def nothing(input: Any) -> None:
    return None


#: the worker's backends but its LISTEN one: pid, and application_name once it has
#: been connected for a moment (a name set right after connecting is not yet shown)
# a backend shows its application_name once its start-up is through (empty before)
WORKER_BACKENDS = (
    "SELECT pid, NULLIF(application_name, '') "
    "FROM pg_stat_activity WHERE datname = %s "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
    "AND query NOT LIKE 'LISTEN%%'"
)


async def test_connection_lifetime_recycles_the_worker_connections(db_url: str) -> None:
    """With connection_lifetime=1 the worker's connections (named 'pgflow-sa worker')
    are replaced: the backends seen at first go away and new ones serve it."""
    deploy(db_url, idle)
    database = database_name(db_url)
    settings = replace(FAST_SETTINGS, connection_lifetime=1)
    names: set[str] = set()

    async def backends() -> set[int]:
        rows = await asql(db_url, WORKER_BACKENDS, [database])
        names.update(name for _, name in rows if name is not None)
        return {pid for pid, _ in rows}

    async with running_worker(idle, db_url, settings=settings):
        first = await until(backends, 5, "the worker's connections")

        async def replaced() -> bool:
            now = await backends()
            return bool(first - now) and bool(now - first)

        await until(replaced, 10, f"the worker's connections {sorted(first)} to be replaced")
    assert names == {WORKER_APPLICATION_NAME}


# --- 7d. a lost LISTEN connection ---------------------------------------------------------------

listening = Flow("f_listening", timeout=10)


@listening.step
async def answer(input: Any) -> int:
    return 42


LISTEN_BACKENDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%' "
    "AND pid <> pg_backend_pid()"
)


async def test_a_lost_listen_connection_is_closed(db_url: str) -> None:
    """The notification connection is killed; the worker listens again on a new one
    and the dead one is closed, not left for the garbage collector (which warns about
    a pooled connection that was never checked in)."""
    deploy(db_url, listening)
    database = database_name(db_url)
    settings = replace(FAST_SETTINGS, use_notifications=True)

    async def listeners() -> set[int]:
        return {pid for (pid,) in await asql(db_url, LISTEN_BACKENDS, [database])}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running_worker(listening, db_url, settings=settings):
            (old,) = await until(listeners, 10, "the worker to listen")
            await asql(db_url, "SELECT pg_terminate_backend(%s)", [old])

            async def relistening() -> set[int]:
                return (await listeners()) - {old}

            await until(relistening, 15, "the worker to listen on a new connection")
            run_id = await astart_run(db_url, listening.slug)
            statuses = await runs_finished(db_url, [run_id], 15)
            gc.collect()
            await asyncio.sleep(0.1)
            gc.collect()
    assert statuses == {run_id: "completed"}
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


# --- review: handlers holding sessions; SIGTERM while the database does not answer ------------


def test_handlers_holding_sessions_never_starve_the_worker(
    db_url: str, spawn: Callable[..., WorkerProcess]
) -> None:
    """Ten async handlers each hold a ctx.async_session connection for 6 s. The
    worker's heartbeats, claims and settles must not queue behind them: a peer with a
    3 s stall margin never takes a task, every task completes at attempt 1, and
    runs started after them are served."""
    prepare(db_url, "f_holds")
    env = worker_env()
    busy = spawn("busy", "f_holds", env, "--concurrency", "10")
    wait_registered(db_url, "f_holds", 1, busy)
    runs = [start_run(db_url, "f_holds") for _ in range(10)]
    wait_until(
        lambda: (
            sql(
                db_url,
                "SELECT count(*) FROM pgflow.step_tasks WHERE status = 'started' "
                "AND run_id = ANY(%s)",
                [runs],
            )[0][0]
            == 10
        ),
        15,
        "all ten tasks to start",
    )
    peer = spawn("peer", "f_holds", env)
    wait_registered(db_url, "f_holds", 2, peer)
    later = [start_run(db_url, "f_holds") for _ in range(4)]
    everything = runs + later

    def finished() -> bool:
        rows = sql(db_url, RUN_STATUSES, [everything])
        return all(status != "started" for _, status in rows)

    wait_until(finished, 40, "every run to finish")
    tasks = sql(
        db_url,
        "SELECT status, attempts_count, error_message FROM pgflow.step_tasks "
        "WHERE run_id = ANY(%s)",
        [everything],
    )
    assert tasks == [("completed", 1, None)] * 14, busy.output()[-3000:]
    assert sorted(a for a, _ in sql(db_url, "SELECT attempt, pid FROM fault_writes")) == [1] * 14
    assert not lost_lines(busy.output()), busy.output()[-3000:]


def test_sigterm_while_the_database_does_not_answer(tmp_path: Path) -> None:
    """The whole server is frozen (SIGSTOP) while a sync handler hangs: SIGTERM still
    ends the worker within its shutdown timeout plus 5 s (and a moment to exit)."""
    from .throwaway_server import throwaway_server

    with throwaway_server() as server:
        url = server.url("postgres")
        install_schema(url)
        prepare(url, "f_hangs")
        env = worker_env()
        worker = WorkerProcess(url, tmp_path / "w.log", "f_hangs", env, "--shutdown-timeout", "2")
        frozen: list[int] = []
        try:
            wait_registered(url, "f_hangs", 1, worker)
            run_id = start_run(url, "f_hangs")
            wait_until(lambda: task_of(url, run_id)[0] == "started", 15, "the task to start")
            frozen = server.pids()
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):  # a backend that just ended
                    os.kill(pid, signal.SIGSTOP)
            began = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = worker.proc.wait(2 + 5 + 1)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - began
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            worker.kill()
        assert code == 0, f"exit code {code} after {took:.1f} s\n{worker.output()}"


# --- review, second round: errors the database cannot store, handlers losing their
# connection every time, a stop while starting up ------------------------------------------

unstorable = Flow("f_unstorable", max_attempts=2, base_delay=1, timeout=5)


@unstorable.step
async def raises_nul(input: Any) -> None:
    raise ValueError("bad \x00 byte")


unstorable_output = Flow("f_unstorable_output", max_attempts=1, timeout=5)


@unstorable_output.step
def returns_nul(input: Any, ctx: Context) -> str:
    ctx.session.execute(sa.text("SELECT 1"))
    return "a\x00b"


async def test_an_error_postgres_cannot_store_still_fails_the_task(db_url: str) -> None:
    """An exception message with a NUL byte (PostgreSQL text cannot hold one) and an
    output with one completed through ctx.session: both tasks fail within their
    attempts with a readable message (no SQL, no parameters), instead of looping."""
    deploy(db_url, unstorable, unstorable_output)
    first = await astart_run(db_url, unstorable.slug)
    second = await astart_run(db_url, unstorable_output.slug)
    async with running_worker([unstorable, unstorable_output], db_url, settings=FAST_SETTINGS):
        statuses = await runs_finished(db_url, [first, second], 20)
    assert statuses == {first: "failed", second: "failed"}
    ((attempts, message),) = await asql(
        db_url,
        "SELECT attempts_count, error_message FROM pgflow.step_tasks WHERE run_id = %s",
        [first],
    )
    assert attempts == 2
    assert message.startswith("ValueError: bad "), message
    assert "byte" in message and "\x00" not in message
    ((message,),) = await asql(
        db_url, "SELECT error_message FROM pgflow.step_tasks WHERE run_id = %s", [second]
    )
    assert message.startswith("pgflow refused the output: "), message
    assert "[SQL" not in message and "parameters" not in message, message


suicidal = Flow("f_suicidal", max_attempts=2, base_delay=1, timeout=5)


@suicidal.step
def kills_its_connection(input: Any, ctx: Context) -> None:
    ctx.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))


async def test_a_handler_that_always_loses_its_connection_runs_out_of_attempts(
    db_url: str,
) -> None:
    """A lost connection in a handler hands the task back without counting an attempt,
    but not forever: a handler that loses it every time is failed like any other."""
    deploy(db_url, suicidal)
    run_id = await astart_run(db_url, suicidal.slug)
    async with running_worker(suicidal, db_url, settings=FAST_SETTINGS):
        statuses = await runs_finished(db_url, [run_id], 40)
    assert statuses == {run_id: "failed"}
    ((attempts, message),) = await asql(
        db_url,
        "SELECT attempts_count, error_message FROM pgflow.step_tasks WHERE run_id = %s",
        [run_id],
    )
    assert attempts == 2
    assert "terminating connection" in message, message


def test_sigterm_while_starting_up_against_an_unreachable_database(tmp_path: Path) -> None:
    """Nothing listens on the worker's port: it keeps retrying its start-up, and a
    SIGTERM meanwhile ends it at once with exit code 0."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    worker = WorkerProcess(url, tmp_path / "w.log", "f_hangs", worker_env())
    try:
        wait_until(lambda: "retrying" in worker.output(), 15, "a start-up retry")
        began = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = worker.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - began
    finally:
        worker.kill()
    assert code == 0, f"exit code {code} after {took:.1f} s\n{worker.output()}"
