"""`pgflow-sa start`, `runs list` and `runs show` as real subprocesses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pgflow_sa import Context, Flow, to_sqlalchemy_url
from pgflow_sa.schema.rows import StepTaskRecord

from .driver import drive
from .helpers import CLI, assert_one_line_error, run_cli
from .worker_harness import deploy

shop = Flow("shop", max_attempts=1)


@shop.step
def price(input: Any, ctx: Context) -> Any:
    return input


@shop.step(depends_on=[price])
def receipt(input: Any, ctx: Context) -> Any:
    return input


def handler(task: StepTaskRecord) -> Any:
    if task.step_slug == "price":
        if task.input["run"].get("explode"):
            raise ValueError("no price")
        return task.input["run"]["qty"] * 3
    return {"total": task.input["price"]}


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    deploy(db_url, shop)
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    yield engine
    await engine.dispose()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _with_driver(engine: AsyncEngine, *args: str) -> tuple[int, str, str]:
    stop = asyncio.Event()
    driver = asyncio.create_task(drive(engine, "shop", stop, handler))
    try:
        return await _cli(*args)
    finally:
        stop.set()
        await driver


async def test_start_and_wait_shows_progress_and_output(engine: AsyncEngine, db_url: str) -> None:
    code, out, err = await _with_driver(
        engine, "start", "shop", "--input", '{"qty": 2}', "--wait", "--database-url", db_url
    )
    assert code == 0, err
    assert json.loads(out) == {"receipt": {"total": 6}}
    lines = err.splitlines()
    assert lines[0].startswith("run ") and lines[0].endswith(" started (flow shop)")
    assert lines[-1] == "2/2 steps done"

    run_id = lines[0].split()[1]
    listed = run_cli("runs", "list", "--flow", "shop", "--database-url", db_url)
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == [
        "RUN",
        "FLOW",
        "STATUS",
        "STARTED",
        "(UTC)",
        "DURATION",
        "REMAINING",
        "ERROR",
    ]
    assert row.split()[:3] == [run_id, "shop", "completed"]

    shown = run_cli("runs", "show", run_id, "--database-url", db_url)
    assert shown.returncode == 0
    text = shown.stdout
    assert f"run       {run_id}" in text
    assert "status    completed" in text
    assert 'output    {"receipt": {"total": 6}}' in text
    steps = [line.split() for line in text.splitlines()[-2:]]
    assert [s[:5] for s in steps] == [
        ["price", "single", "completed", "1/1", "1"],
        ["receipt", "single", "completed", "1/1", "1"],
    ]


async def test_failed_run_exits_3(engine: AsyncEngine, db_url: str) -> None:
    code, out, err = await _with_driver(
        engine, "start", "shop", "--input", '{"explode": true}', "--wait", "--database-url", db_url
    )
    assert code == 3, err
    assert out == ""
    assert err.splitlines()[-1].endswith("failed: ValueError: no price")
    run_id = err.splitlines()[0].split()[1]
    shown = run_cli("runs", "show", run_id, "--database-url", db_url)
    assert "error     ValueError: no price" in shown.stdout
    assert "price    single  failed   0/1    1" in shown.stdout


async def test_wait_timeout_exits_4(db_url: str, engine: AsyncEngine) -> None:
    code, _, err = await _cli(
        "start", "shop", "--wait", "--timeout", "0.5", "--database-url", db_url
    )
    assert code == 4
    assert "timed out after 0.5 s (status started)" in err.splitlines()[-1]


def test_start_without_wait_prints_the_id(db_url: str, engine: AsyncEngine) -> None:
    proc = run_cli(
        "start",
        "shop",
        "--input",
        "{}",
        "--run-id",
        "6d74d3fe-701a-4fcc-904a-d0e527b93979",
        "--database-url",
        db_url,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "6d74d3fe-701a-4fcc-904a-d0e527b93979\n"
    again = run_cli(
        "start",
        "shop",
        "--run-id",
        "6d74d3fe-701a-4fcc-904a-d0e527b93979",
        "--database-url",
        db_url,
    )
    assert "already existed" in again.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["start", "shop", "--input", "{bad"],
            "--input is not valid JSON: Expecting property name",
        ),
        (["start", "nowhere"], "flow 'nowhere' is not in this database"),
        (["start", "shop", "--run-id", "x"], "run_id must be a UUID, not 'x'"),
        (["runs", "show", "6d74d3fe-701a-4fcc-904a-d0e527b93979"], "there is no run 6d74d3fe"),
    ],
)
def test_bad_arguments_give_one_line(
    db_url: str, engine: AsyncEngine, args: list[str], fragment: str
) -> None:
    assert_one_line_error(run_cli(*args, "--database-url", db_url), fragment)


# --- status ---------------------------------------------------------------------------

idle = Flow("idle_flow")
idle.step(slug="only")(lambda i, c: i)


def test_status_counts_queues_runs_and_live_workers(db_url: str) -> None:
    from pgflow_sa.testing import run_flow

    deploy(db_url, shop, idle)
    run_flow(db_url, shop, {"qty": 2})  # completed
    run_flow(db_url, shop, {"qty": 1}, fail={"price": 1})  # failed (max_attempts 1)
    with psycopg.connect(db_url) as conn:
        for _ in range(3):  # started, their first messages waiting in the queue
            conn.execute("SELECT pgflow.start_flow('shop', '{\"qty\": 5}'::jsonb)")
        conn.execute(  # a live worker and one whose heartbeat stopped 10 minutes ago
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name, last_heartbeat_at) "
            "VALUES (gen_random_uuid(), 'shop', 'x', now()), "
            "(gen_random_uuid(), 'shop', 'x', now() - interval '10 minutes')"
        )
        # a run that failed two hours ago falls outside the default one-hour window
        conn.execute(
            "UPDATE pgflow.runs SET started_at = now() - interval '2 hours 1 minute', "
            "failed_at = now() - interval '2 hours' WHERE status = 'failed'"
        )
    proc = run_cli("status", "--json", "--database-url", db_url)
    assert proc.returncode == 0, proc.stderr
    by_flow = {f["flow_slug"]: f for f in json.loads(proc.stdout)}
    assert set(by_flow) == {"shop", "idle_flow"}
    shop_row = by_flow["shop"]
    assert (
        shop_row["queued"],
        shop_row["running"],
        shop_row["completed"],
        shop_row["failed"],
        shop_row["live_workers"],
    ) == (3, 3, 1, 0, 1)
    assert shop_row["last_heartbeat_at"] is not None
    assert by_flow["idle_flow"] == {
        "flow_slug": "idle_flow",
        "queued": 0,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "retried": 0,
        "waiting_on_limit": 0,
        "live_workers": 0,
        "last_heartbeat_at": None,
    }
    wide = run_cli("status", "--window", "10800", "--database-url", db_url)
    assert wide.returncode == 0, wide.stderr
    header, *lines = wide.stdout.splitlines()
    assert header.split() == [
        "FLOW", "QUEUED", "RUNNING", "COMPLETED", "(3h)", "FAILED", "(3h)", "CANCELLED", "(3h)",
        "RETRIED", "(3h)", "ON", "LIMIT", "LIVE", "WORKERS", "LAST", "HEARTBEAT", "(UTC)",
    ]  # fmt: skip
    assert lines[0].split()[:9] == ["idle_flow", "0", "0", "0", "0", "0", "0", "0", "0"]
    assert lines[1].split()[:9] == ["shop", "3", "3", "1", "1", "0", "0", "0", "1"]


def test_status_without_pgflow_says_to_install(empty_db_url: str) -> None:
    proc = run_cli("status", "--database-url", empty_db_url)
    assert_one_line_error(proc, "pgflow is not installed in the database at ")
    assert "run pgflow-sa install" in proc.stderr
