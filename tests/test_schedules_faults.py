"""Schedules under faults: workers of an older release, bad stored definitions, slow
or async input functions, resume of a schedule that was not paused."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from alembic.util import CommandError
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic_ext import AlterScheduleOp, CreateScheduleOp
from pgflow_sa import (
    Flow,
    FlowDefinitionError,
    PgflowSaError,
    deploy_flows,
    fire_due_schedules,
    list_schedules,
    resume_schedule,
    trigger_schedule,
)
from pgflow_sa.worker.scheduler import RACE_PAUSE, Scheduler

from .helpers import reports_flow, run_cli

UTC = timezone.utc
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def computed(tick: datetime) -> dict[str, Any]:
    return {"at": tick.isoformat()}


def runs_of(url: str, name: str) -> list[tuple[datetime, bool, str | None]]:
    """(tick, started a run, error) of each tick the schedule claimed."""
    with psycopg.connect(url) as conn:
        return [
            (tick, run_id is not None, error)
            for tick, run_id, error in conn.execute(
                "SELECT tick, run_id, error FROM pgflow_sa.schedule_runs "
                "WHERE schedule_name = %s ORDER BY tick",
                [name],
            )
        ]


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


# --- D1: an older worker leaves the schedules its code does not declare -------------


NEW = (
    {"cron": "* * * * * *", "name": "a", "input": {"v": 2}, "catch_up": "all"},
    {"cron": "* * * * * *", "name": "b", "input": computed, "catch_up": "all"},
)
OLD = ({"cron": "* * * * * *", "name": "a", "input": {"v": 1}, "catch_up": "all"},)


async def test_an_older_worker_leaves_ticks_of_schedules_its_code_lacks(
    db_url: str, engine: AsyncEngine
) -> None:
    new, old = reports_flow(*NEW), reports_flow(*OLD)
    deploy_flows(db_url, new)
    await fire_due_schedules(engine, T0, [new])  # both get their next fire time
    fired = await fire_due_schedules(engine, T0 + timedelta(seconds=1, microseconds=5), [old])
    assert [(f.schedule, f.error) for f in fired] == [("a", None)]
    assert runs_of(db_url, "b") == []  # left for a worker that declares it
    fired = await fire_due_schedules(engine, T0 + timedelta(seconds=2, microseconds=5), [new])
    assert {(f.schedule, f.tick, f.error) for f in fired} == {
        ("a", T0 + timedelta(seconds=2), None),
        ("b", T0 + timedelta(seconds=1), None),
        ("b", T0 + timedelta(seconds=2), None),
    }


async def test_an_older_scheduler_does_not_spin_on_a_schedule_it_lacks(
    db_url: str, engine: AsyncEngine
) -> None:
    deploy_flows(db_url, reports_flow(*NEW))
    execute(
        db_url,
        "UPDATE pgflow_sa.schedules SET next_fire_at = now() + interval '1 hour' WHERE name = 'a'",
        "UPDATE pgflow_sa.schedules SET next_fire_at = now() - interval '1 minute' "
        "WHERE name = 'b'",
    )
    scheduler = Scheduler(engine, [reports_flow(*OLD)])
    assert await scheduler.look() > RACE_PAUSE
    assert await scheduler.look() > RACE_PAUSE
    assert runs_of(db_url, "b") == []


# --- D3: a bad stored definition ------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "fragment"),
    [
        (CreateScheduleOp("typo", "reports", "* * * * *", timezone="Europe/Pariss"), "time zone"),
        (CreateScheduleOp("typo", "reports", "61 * * * *"), "not a valid cron expression"),
        (CreateScheduleOp("typo", "reports", "* * * * *", catch_up="some"), "catch_up"),
        (CreateScheduleOp("typo", "reports", "* * * * *", catch_up_limit=0), "catch_up_limit"),
        (AlterScheduleOp("a", {"timezone": "Mars/Base"}, previous={}), "time zone"),
        (AlterScheduleOp("a", {"cron": "every day"}, previous={}), "not a valid cron"),
    ],
)
def test_alembic_schedule_ops_refuse_a_bad_definition(op: Any, fragment: str) -> None:
    with pytest.raises(CommandError, match=fragment) as caught:
        op.scripts()
    assert "schedule 'typo'" in str(caught.value) or "schedule 'a'" in str(caught.value)


def _store_bad_timezone(url: str) -> None:
    """A row as an unchecked op (or hand-written SQL) would store it."""
    execute(
        url,
        "INSERT INTO pgflow_sa.schedules (name, flow_slug, cron, timezone, input) "
        "VALUES ('typo', 'reports', '* * * * *', 'Europe/Pariss', '{}')",
    )


async def test_one_bad_stored_schedule_does_not_stop_the_others(
    db_url: str, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"cron": "* * * * * *", "name": "good", "input": {}}
    typo = {"cron": "* * * * *", "name": "typo", "input": {}}
    flow = reports_flow(good, typo)
    deploy_flows(db_url, reports_flow(good))
    _store_bad_timezone(db_url)
    await fire_due_schedules(engine, T0, [flow])
    fired = await fire_due_schedules(engine, T0 + timedelta(seconds=1, microseconds=5), [flow])
    assert [(f.schedule, f.error) for f in fired] == [("good", None)]

    execute(db_url, "UPDATE pgflow_sa.schedules SET next_fire_at = NULL")
    scheduler = Scheduler(engine, [flow])
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="pgflow_sa"):
        for _ in range(3):
            await scheduler.look()
    problems = [r.getMessage() for r in caplog.records if "typo" in r.getMessage()]
    assert len(problems) == 1, problems  # once, not every look
    assert "unknown time zone 'Europe/Pariss'" in problems[0]
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT next_fire_at IS NOT NULL FROM pgflow_sa.schedules WHERE name = 'good'"
        ).fetchone()
    assert row == (True,)


def test_schedules_list_shows_a_bad_row_with_its_problem(db_url: str) -> None:
    deploy_flows(db_url, reports_flow({"cron": "0 * * * *", "name": "good"}))
    _store_bad_timezone(db_url)
    infos = {i.name: i for i in list_schedules(db_url)}
    assert infos["good"].problem is None
    assert "unknown time zone 'Europe/Pariss'" in (infos["typo"].problem or "")
    assert infos["typo"].upcoming() is None

    table = run_cli("schedules", "list", "--database-url", db_url)
    assert table.returncode == 0, table.stderr
    assert "good" in table.stdout and "invalid" in table.stdout
    assert "unknown time zone 'Europe/Pariss'" in table.stdout
    as_json = run_cli("schedules", "list", "--json", "--database-url", db_url)
    assert as_json.returncode == 0, as_json.stderr
    rows = {r["name"]: r for r in map(json.loads, as_json.stdout.splitlines())}
    assert rows["good"]["problem"] is None and rows["good"]["next_fire_at"]
    assert "unknown time zone" in rows["typo"]["problem"]
    assert rows["typo"]["next_fire_at"] is None


# --- D5: async input functions are refused at declaration -----------------------------


def test_an_async_input_function_is_refused() -> None:
    async def coro(tick: datetime) -> dict[str, Any]:
        return {}

    with pytest.raises(FlowDefinitionError, match="async"):
        reports_flow({"cron": "* * * * *", "input": coro})


# --- D6: the input function runs off the event loop, with the row not locked ----------


async def test_the_input_function_runs_off_the_loop_without_the_row_locked(
    db_url: str, engine: AsyncEngine
) -> None:
    seen: list[tuple[bool, bool]] = []

    def probe(tick: datetime) -> dict[str, Any]:
        in_loop_thread = threading.current_thread() is threading.main_thread()
        with psycopg.connect(db_url, autocommit=True) as conn:
            try:
                conn.execute(
                    "SELECT 1 FROM pgflow_sa.schedules WHERE name = 'probe' FOR UPDATE NOWAIT"
                )
                locked = False
            except psycopg.errors.LockNotAvailable:
                locked = True
        seen.append((in_loop_thread, locked))
        return {"at": tick.isoformat()}

    flow = reports_flow({"cron": "* * * * * *", "name": "probe", "input": probe})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, T0, [flow])
    fired = await fire_due_schedules(engine, T0 + timedelta(seconds=1, microseconds=5), [flow])
    assert [(f.schedule, f.error) for f in fired] == [("probe", None)]
    assert seen == [(False, False)]


# --- D8: resume of a schedule that is not paused changes nothing ----------------------


async def test_resume_of_an_active_schedule_keeps_its_backlog(
    db_url: str, engine: AsyncEngine
) -> None:
    flow = reports_flow({"cron": "* * * * *", "catch_up": "all", "catch_up_limit": 4})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, T0 + timedelta(seconds=30), [flow])
    resume_schedule(db_url, "reports")  # not paused: nothing to do
    fired = await fire_due_schedules(engine, T0 + timedelta(hours=1, seconds=30), [flow])
    assert len(fired) == 4
    await asyncio.sleep(0)


# --- D2: a schedule name another flow owns is refused, not taken over ------------------


def _owner(url: str, name: str) -> tuple[str, str] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT flow_slug, cron FROM pgflow_sa.schedules WHERE name = %s", [name]
        ).fetchone()
    return None if row is None else (row[0], row[1])


def test_deploy_refuses_a_schedule_name_another_flow_owns(db_url: str) -> None:
    deploy_flows(db_url, reports_flow({"cron": "0 * * * *", "name": "nightly"}))
    other = Flow("other_app_flow")
    other.step(slug="echo")(lambda input: input)
    other.schedule("0 4 * * *", name="nightly")
    with pytest.raises(PgflowSaError) as caught:
        deploy_flows(db_url, other)
    message = str(caught.value)
    assert "'nightly'" in message and "flow 'reports'" in message
    assert "rename" in message and "drop" in message
    assert _owner(db_url, "nightly") == ("reports", "0 * * * *")
    with psycopg.connect(db_url) as conn:  # nothing of the deploy was written
        assert conn.execute(
            "SELECT count(*) FROM pgflow.flows WHERE flow_slug = 'other_app_flow'"
        ).fetchone() == (0,)


def test_alembic_create_schedule_refuses_a_name_another_flow_owns(db_url: str) -> None:
    deploy_flows(db_url, reports_flow({"cron": "0 * * * *", "name": "nightly"}))
    (script,) = CreateScheduleOp("nightly", "other_app_flow", "0 4 * * *").scripts()
    with pytest.raises(psycopg.errors.RaiseException, match="belongs to flow 'reports'"):
        execute(db_url, script)
    assert _owner(db_url, "nightly") == ("reports", "0 * * * *")
    # the same flow's schedule of that name still takes the definition
    (script,) = CreateScheduleOp("nightly", "reports", "0 5 * * *").scripts()
    execute(db_url, script)
    assert _owner(db_url, "nightly") == ("reports", "0 5 * * *")


# --- D4: an input whose stored reference would change at every deploy is refused ------


class _Callable:
    def __call__(self, tick: datetime) -> dict[str, Any]:
        return {}


def _prefixed(prefix: str, tick: datetime) -> dict[str, Any]:
    return {"p": prefix + tick.isoformat()}


@pytest.mark.parametrize(
    "function", [functools.partial(_prefixed, "x"), _Callable()], ids=["partial", "object"]
)
def test_an_input_callable_without_a_stable_name_is_refused(function: Any) -> None:
    with pytest.raises(FlowDefinitionError, match="give a function defined with def"):
        reports_flow({"cron": "* * * * *", "input": function})


def test_a_deploy_of_unchanged_input_functions_changes_nothing(db_url: str) -> None:
    flow = reports_flow(
        {"cron": "* * * * *", "name": "by_def", "input": computed},
        {"cron": "* * * * *", "name": "by_lambda", "input": lambda tick: {}},
    )
    assert deploy_flows(db_url, flow).schedules_added == ["by_def", "by_lambda"]
    again = deploy_flows(db_url, flow)
    assert (again.schedules_added, again.schedules_updated) == ([], [])
    assert _owner(db_url, "by_def") is not None
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT input_function FROM pgflow_sa.schedules WHERE name = 'by_def'"
        ).fetchone() == (f"{__name__}:computed",)


# --- a manual trigger computes the input before it locks the schedule's row ------------


def test_trigger_computes_the_input_without_the_row_locked(db_url: str) -> None:
    seen: list[bool] = []

    def probe(tick: datetime) -> dict[str, Any]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            try:
                conn.execute(
                    "SELECT 1 FROM pgflow_sa.schedules WHERE name = 'probe' FOR UPDATE NOWAIT"
                )
                seen.append(False)
            except psycopg.errors.LockNotAvailable:
                seen.append(True)
        return {"at": tick.isoformat()}

    flow = reports_flow({"cron": "0 * * * *", "name": "probe", "input": probe})
    deploy_flows(db_url, flow)
    run_id = trigger_schedule(db_url, "probe", flows=[flow])
    assert seen == [False]
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT manual FROM pgflow_sa.schedule_runs WHERE run_id = %s", [run_id]
        ).fetchone() == (True,)
