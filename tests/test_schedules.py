"""Schedules in a real database, on a clock the tests choose: deploy, firing once per
tick, catch-up after missed ticks, DST, pause/resume/trigger from Python, upgrades."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from pgflow_sa import (
    Flow,
    ScheduleNotFoundError,
    async_engine_from_url,
    deploy_flows,
    fire_due_schedules,
    list_schedules,
    pause_schedule,
    resume_schedule,
    trigger_schedule,
)
from pgflow_sa.schema import check_schema, install_schema
from pgflow_sa.schema.installer import TABLES_UPDATE, SchemaState
from pgflow_sa.schema.schedules import SchedulesMissingError

from .helpers import reports_flow

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fired_ticks(url: str, name: str = "reports") -> list[tuple[datetime, Any]]:
    """(tick, run input) of every run the schedule started, by tick."""
    with psycopg.connect(url) as conn:
        return [
            (tick, run_input)
            for tick, run_input in conn.execute(
                "SELECT s.tick, r.input FROM pgflow_sa.schedule_runs s "
                "JOIN pgflow.runs r USING (run_id) WHERE s.schedule_name = %s ORDER BY s.tick",
                [name],
            )
        ]


def stored(url: str, name: str = "reports") -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT * FROM pgflow_sa.schedules WHERE name = %s", [name])
        row = cur.fetchone()
        assert row is not None
        return dict(zip([c.name for c in cur.description or ()], row, strict=True))


async def test_each_tick_starts_one_run_on_the_chosen_clock(
    db_url: str, engine: AsyncEngine
) -> None:
    flow = reports_flow({"cron": "*/5 * * * *", "input": {"kind": "daily"}})
    report = deploy_flows(db_url, flow)
    assert report.schedules_added == ["reports"]
    assert stored(db_url)["next_fire_at"] is None  # the first worker to look sets it

    assert await fire_due_schedules(engine, utc(2026, 1, 1, 12, 1), [flow]) == []
    assert stored(db_url)["next_fire_at"] == utc(2026, 1, 1, 12, 5)
    assert await fire_due_schedules(engine, utc(2026, 1, 1, 12, 4, 59), [flow]) == []

    fired = await fire_due_schedules(engine, utc(2026, 1, 1, 12, 5, 0, 200000), [flow])
    assert [(f.tick, f.error) for f in fired] == [(utc(2026, 1, 1, 12, 5), None)]
    # the same moment again, and a moment later: nothing more
    assert await fire_due_schedules(engine, utc(2026, 1, 1, 12, 5, 0, 200000), [flow]) == []
    assert await fire_due_schedules(engine, utc(2026, 1, 1, 12, 6), [flow]) == []
    row = stored(db_url)
    assert row["last_fired_tick"] == utc(2026, 1, 1, 12, 5)
    assert row["next_fire_at"] == utc(2026, 1, 1, 12, 10)
    assert fired_ticks(db_url) == [(utc(2026, 1, 1, 12, 5), {"kind": "daily"})]


async def test_racing_firers_start_one_run_per_tick(db_url: str) -> None:
    flow = reports_flow({"cron": "* * * * * *"})
    deploy_flows(db_url, flow)
    engines = [async_engine_from_url(db_url) for _ in range(4)]
    try:
        start = utc(2026, 1, 1, 12)
        await fire_due_schedules(engines[0], start, [flow])
        for second in range(1, 6):
            now = start + timedelta(seconds=second, microseconds=1000)
            await asyncio.gather(*(fire_due_schedules(e, now, [flow]) for e in engines))
    finally:
        for e in engines:
            await e.dispose()
    ticks = [tick for tick, _ in fired_ticks(db_url)]
    assert ticks == [start + timedelta(seconds=s) for s in range(1, 6)]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgflow.runs").fetchone() == (5,)


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("latest", [utc(2026, 1, 1, 12, 3)]),
        ("skip", []),
        ("all", [utc(2026, 1, 1, 12, 1), utc(2026, 1, 1, 12, 2), utc(2026, 1, 1, 12, 3)]),
    ],
)
async def test_a_worker_down_for_three_ticks_applies_the_catch_up_policy(
    db_url: str, engine: AsyncEngine, catch_up: str, expected: list[datetime]
) -> None:
    flow = reports_flow({"cron": "* * * * *", "catch_up": catch_up})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, utc(2026, 1, 1, 12, 0, 0, 500000), [flow])  # next: 12:01
    # no worker from 12:00:00.5 to 12:03:30: ticks 12:01, 12:02 and 12:03 fell due
    await fire_due_schedules(engine, utc(2026, 1, 1, 12, 3, 30), [flow])
    assert [tick for tick, _ in fired_ticks(db_url)] == expected
    assert stored(db_url)["next_fire_at"] == utc(2026, 1, 1, 12, 4)
    # back on time: the next tick fires whatever the policy
    await fire_due_schedules(engine, utc(2026, 1, 1, 12, 4, 0, 100000), [flow])
    assert [tick for tick, _ in fired_ticks(db_url)] == [*expected, utc(2026, 1, 1, 12, 4)]


async def _drive(engine: AsyncEngine, flow: Flow, start: datetime, end: datetime) -> None:
    """A worker looking every 10 minutes (of the chosen clock) from start to end."""
    now = start
    while now <= end:
        await fire_due_schedules(engine, now, [flow])
        now += timedelta(minutes=10)


async def test_dst_spring_forward_fires_at_the_right_wall_time(
    db_url: str, engine: AsyncEngine
) -> None:
    flow = reports_flow({"cron": "30 2 * * *", "timezone": "Europe/Paris"})
    deploy_flows(db_url, flow)
    # 2026-03-29 in Paris: 02:00 CET -> 03:00 CEST; 02:30 never happens that day
    await _drive(engine, flow, utc(2026, 3, 27, 23), utc(2026, 3, 30, 3))
    assert [tick for tick, _ in fired_ticks(db_url)] == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, right after the change
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]


async def test_dst_fall_back_fires_once_in_the_repeated_hour(
    db_url: str, engine: AsyncEngine
) -> None:
    flow = reports_flow({"cron": "30 2 * * *", "timezone": "Europe/Paris"})
    deploy_flows(db_url, flow)
    # 2026-10-25 in Paris: 03:00 CEST -> 02:00 CET; 02:30 happens twice that night
    await _drive(engine, flow, utc(2026, 10, 23, 23), utc(2026, 10, 26, 3))
    assert [tick for tick, _ in fired_ticks(db_url)] == [
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # the first 02:30 (CEST), not the second
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]


async def test_input_function_gets_the_tick(db_url: str, engine: AsyncEngine) -> None:
    flow = reports_flow({"cron": "0 * * * *", "input": lambda tick: {"hour": tick.hour}})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, utc(2026, 1, 1, 11, 30), [flow])
    await fire_due_schedules(engine, utc(2026, 1, 1, 12, 0, 1), [flow])
    assert fired_ticks(db_url) == [(utc(2026, 1, 1, 12), {"hour": 12})]
    assert stored(db_url)["input_function"].endswith("<lambda>")


async def test_a_refused_input_is_recorded_and_the_schedule_moves_on(
    db_url: str, engine: AsyncEngine
) -> None:
    flow = reports_flow({"cron": "0 * * * *", "input": lambda tick: ["not", "a", "dict"]})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, utc(2026, 1, 1, 11, 30), [flow])
    fired = await fire_due_schedules(engine, utc(2026, 1, 1, 12, 0, 1), [flow])
    assert fired[0].run_id is None
    assert "invalid input for flow 'reports'" in (fired[0].error or "")
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT run_id, error IS NOT NULL FROM pgflow_sa.schedule_runs"
        ).fetchall() == [(None, True)]
    assert stored(db_url)["next_fire_at"] == utc(2026, 1, 1, 13)


async def test_an_input_function_that_raises_is_recorded(db_url: str, engine: AsyncEngine) -> None:
    def broken(tick: datetime) -> dict[str, Any]:
        raise KeyError("region")

    flow = reports_flow({"cron": "0 * * * *", "input": broken})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, utc(2026, 1, 1, 11, 30), [flow])
    fired = await fire_due_schedules(engine, utc(2026, 1, 1, 12, 0, 1), [flow])
    assert [(f.run_id, f.error) for f in fired] == [
        (
            None,
            f"the input function {__name__}:test_an_input_function_that_raises_is_recorded."
            "<locals>.broken of schedule 'reports' raised KeyError: 'region'",
        )
    ]
    assert stored(db_url)["next_fire_at"] == utc(2026, 1, 1, 13)


async def test_pause_resume_and_trigger(db_url: str, engine: AsyncEngine) -> None:
    flow = reports_flow({"cron": "0 * * * *", "input": {"n": 7}})
    deploy_flows(db_url, flow)
    await fire_due_schedules(engine, utc(2026, 1, 1, 11, 30), [flow])
    pause_schedule(db_url, "reports")
    assert await fire_due_schedules(engine, utc(2026, 1, 1, 14, 0, 1), [flow]) == []
    (info,) = list_schedules(db_url)
    assert info.paused and info.upcoming() is None

    run_id = trigger_schedule(db_url, "reports")  # works while paused
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT r.input, s.manual FROM pgflow_sa.schedule_runs s JOIN pgflow.runs r "
            "USING (run_id) WHERE run_id = %s",
            [run_id],
        ).fetchone() == ({"n": 7}, True)

    resume_schedule(db_url, "reports")  # from the next tick on: 11:00-14:00 not caught up
    assert stored(db_url)["next_fire_at"] is None
    assert await fire_due_schedules(engine, utc(2026, 1, 1, 14, 0, 2), [flow]) == []
    assert stored(db_url)["next_fire_at"] == utc(2026, 1, 1, 15)

    with pytest.raises(
        ScheduleNotFoundError, match=r"no schedule 'nope' in this database \(schedules: reports\)"
    ):
        pause_schedule(db_url, "nope")


def test_deploy_updates_and_removes_schedules(db_url: str) -> None:
    deploy_flows(db_url, reports_flow({"cron": "0 * * * *", "name": "hourly"}))
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE pgflow_sa.schedules SET next_fire_at = now(), paused = true")
    report = deploy_flows(
        db_url, reports_flow({"cron": "0 * * * *", "name": "hourly", "input": {"a": 1}})
    )
    assert report.schedules_updated == ["hourly"]
    row = stored(db_url, "hourly")
    assert row["input"] == {"a": 1} and row["next_fire_at"] is not None and row["paused"]
    report = deploy_flows(
        db_url, reports_flow({"cron": "30 * * * *", "name": "hourly", "input": {"a": 1}})
    )
    assert report.schedules_updated == ["hourly"]
    assert stored(db_url, "hourly")["next_fire_at"] is None  # a new cron: computed again
    report = deploy_flows(db_url, reports_flow())
    assert report.schedules_removed == ["hourly"]
    assert list_schedules(db_url) == []


def test_an_install_without_schedules_is_upgraded(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("DROP TABLE pgflow_sa.schedules, pgflow_sa.schedule_runs")
    status = check_schema(db_url)
    assert status.state is SchemaState.OUTDATED
    assert status.pending == (TABLES_UPDATE,)
    assert "pgflow-sa tables: missing" in status.describe()
    with pytest.raises(SchedulesMissingError, match="run `pgflow-sa install`"):
        deploy_flows(db_url, reports_flow({"cron": "0 * * * *"}))
    report = install_schema(db_url)
    assert any("schedule_runs, run_cancellations" in action for action in report.actions)
    assert check_schema(db_url).state is SchemaState.INSTALLED
    assert deploy_flows(db_url, reports_flow({"cron": "0 * * * *"})).schedules_added == ["reports"]


async def test_an_idle_scheduler_looks_about_once_a_second(
    db_url: str, engine: AsyncEngine
) -> None:
    from sqlalchemy import event

    from pgflow_sa.worker.scheduler import Scheduler

    flow = reports_flow({"cron": "0 3 * * *"})
    deploy_flows(db_url, flow)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    stopping = asyncio.Event()
    task = asyncio.create_task(Scheduler(engine, [flow]).run(stopping))
    await asyncio.sleep(3.5)
    stopping.set()
    await asyncio.wait_for(task, 5)
    looks = [s for s in statements if "clock_timestamp()" in s]
    assert 3 <= len(looks) <= 5, statements
    # besides the looks, only setting the new schedule's next fire time (read, update)
    assert len(statements) - len(looks) == 2, statements
    assert stored(db_url)["next_fire_at"] is not None


def test_trigger_in_the_callers_transaction_twice_starts_two_runs(db_url: str) -> None:
    from pgflow_sa._db import sync_engine

    deploy_flows(db_url, reports_flow({"cron": "0 * * * *"}))
    engine = sync_engine(db_url)
    try:
        with engine.begin() as conn:
            first = trigger_schedule(conn, "reports")
            second = trigger_schedule(conn, "reports")
    finally:
        engine.dispose()
    assert first != second
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT run_id) FROM pgflow_sa.schedule_runs s "
            "JOIN pgflow.runs r USING (run_id)"
        ).fetchone()
    assert rows == (2, 2)
