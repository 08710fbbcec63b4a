"""The testing kit: run_flow drives runs in-process; its failure helpers leave the
database as a real worker would."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from pgflow_sa import Context, Flow, RunStatus, StepStatus, to_sqlalchemy_url
from pgflow_sa.testing import InjectedFailure, run_flow, run_flow_async

from .tx_flows import atomic, make_notes, notes, tx_async, tx_sync
from .worker_harness import FAST, deploy, run_and_wait, running_worker

pipeline = Flow("kit_pipeline")


@pipeline.step
def load(input: dict[str, Any], ctx: Context) -> list[int]:
    return list(range(input["n"]))


@pipeline.map(depends_on=load)
async def square(item: int, ctx: Context) -> int:
    return item * item


@pipeline.step(depends_on=[square])
def total(input: dict[str, Any]) -> int:
    return sum(input["square"])


@pipeline.step(depends_on=[load])
def count(input: dict[str, Any]) -> int:
    return len(input["load"])


@pipeline.step(depends_on=[total, count])
def report(input: dict[str, Any], ctx: Context) -> str:
    return f"{input['count']} items, total {input['total']} (run input {ctx.flow_input})"


def test_five_steps_and_a_map_over_100_items(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy(db_url, pipeline)
    started = time.perf_counter()
    run = run_flow(db_url, pipeline, {"n": 100})
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n[run_flow] 5 steps, map over 100 items: {elapsed:.3f} s")
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"report": "100 items, total 328350 (run input {'n': 100})"}
    assert len(run.steps[1].tasks) == 100


def test_stop_after_a_step(db_url: str) -> None:
    deploy(db_url, pipeline)
    run = run_flow(db_url, pipeline, {"n": 3}, stop_after="load")
    assert run.status is RunStatus.STARTED
    states = {s.step_slug: s.status for s in run.steps}
    assert states["load"] is StepStatus.COMPLETED
    assert states["report"] is StepStatus.CREATED


flaky = Flow("kit_flaky", base_delay=1, max_attempts=3)


@flaky.step
def wobbly(input: Any, ctx: Context) -> str:
    if input.get("really_fail") and ctx.attempt <= 2:
        raise InjectedFailure(f"attempt {ctx.attempt} of 'wobbly'")
    return f"attempt {ctx.attempt}"


def _task_rows(url: str, run_id: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT step_slug, task_index, status, attempts_count, error_message, output "
            "FROM pgflow.step_tasks WHERE run_id = %s ORDER BY step_slug, task_index",
            [run_id],
        ).fetchall()


async def test_failure_helper_matches_a_real_worker(db_url: str) -> None:
    deploy(db_url, flaky)
    injected = await run_flow_async(db_url, flaky, {}, fail={"wobbly": 2})
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    try:
        async with running_worker(flaky, db_url, settings=FAST):
            real = await run_and_wait(engine, flaky, {"really_fail": True}, timeout=30)
    finally:
        await engine.dispose()
    assert injected.status is real.status is RunStatus.COMPLETED
    assert _task_rows(db_url, injected.run_id) == _task_rows(db_url, real.run_id)
    assert _task_rows(db_url, injected.run_id)[0][2:] == (
        "completed",
        3,
        "InjectedFailure: attempt 2 of 'wobbly'",
        "attempt 3",
    )


def test_exhausted_retries_fail_the_run(db_url: str) -> None:
    deploy(db_url, flaky)
    run = run_flow(db_url, flaky, {}, fail={"wobbly": 3})
    assert run.status is RunStatus.FAILED
    assert run.error == "InjectedFailure: attempt 3 of 'wobbly'"


def test_handlers_unit_tested_without_a_database() -> None:
    ctx = Context(flow_slug="kit_pipeline", step_slug="report", flow_input={"n": 2})
    assert pipeline.handler("report")({"count": 2, "total": 1}, ctx) == (
        "2 items, total 1 (run input {'n': 2})"
    )
    assert pipeline.handler("load")({"n": 3}, ctx) == [0, 1, 2]


# --- ctx.session / ctx.async_session under run_flow ------------------------------------


def test_handler_sessions_behave_as_under_a_worker(db_url: str) -> None:
    """The worker's transaction flows (tests/tx_flows.py) give the same results under
    run_flow: writes commit with the completion, roll back when the handler raises,
    and a broken transaction keeps nothing."""
    make_notes(db_url)
    deploy(db_url, tx_sync, tx_async, atomic)
    for flow in (tx_sync, tx_async):
        run = run_flow(db_url, flow, {})
        assert run.status is RunStatus.COMPLETED, run.error
        assert run.steps[0].attempts == 2
        assert run.steps[0].tasks[0].error_message == "RuntimeError: after writing"
    broken = run_flow(db_url, atomic, {})
    assert broken.status is RunStatus.FAILED
    assert broken.error is not None and "division by zero" in broken.error
    assert sorted(notes(db_url)) == ["async attempt 2", "sync attempt 2"]
    with psycopg.connect(db_url) as conn:
        idle = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction'"
        ).fetchone()
    assert idle == (0,)


too_slow = Flow("kit_too_slow", timeout=3, max_attempts=1)


@too_slow.step
def sleeps_past_its_timeout(input: Any) -> str:
    time.sleep(4.5)
    return "late"


def test_run_flow_enforces_step_timeouts_like_a_worker(db_url: str) -> None:
    """run_flow runs tasks through the worker's own code: a sync handler runs in a
    thread of its own and is failed at the step timeout."""
    deploy(db_url, too_slow)
    began = time.monotonic()
    run = run_flow(db_url, too_slow, {})
    assert run.status is RunStatus.FAILED
    assert run.error == "TimeoutError: step 'sleeps_past_its_timeout' did not finish within 3 s"
    assert time.monotonic() - began < 4.5  # failed at the timeout, not when it returned
