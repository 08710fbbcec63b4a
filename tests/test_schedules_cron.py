"""Schedules without a database: definitions, next ticks, due ticks and DST."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pgflow_sa import Flow, FlowDefinitionError, FlowRegistry
from pgflow_sa.schedules import due_ticks, next_tick
from pgflow_sa.schedules.firing import ticks_to_fire

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _flow(slug: str = "reports") -> Flow:
    flow = Flow(slug)

    @flow.step
    def only(input: dict[str, object]) -> int:
        return 1

    return flow


def test_next_tick_is_strictly_after() -> None:
    assert next_tick("*/5 * * * *", "UTC", utc(2026, 1, 1, 0, 0)) == utc(2026, 1, 1, 0, 5)
    assert next_tick("*/5 * * * *", "UTC", utc(2026, 1, 1, 0, 4, 59)) == utc(2026, 1, 1, 0, 5)
    assert next_tick("* * * * * *", "UTC", utc(2026, 1, 1, 0, 0, 0)) == utc(2026, 1, 1, 0, 0, 1)


def test_due_ticks_keeps_the_latest_and_includes_the_first_due() -> None:
    first = utc(2026, 1, 1, 12, 1)
    now = utc(2026, 1, 1, 12, 3, 30)
    assert due_ticks("* * * * *", "UTC", first, now, 10) == [
        utc(2026, 1, 1, 12, 1),
        utc(2026, 1, 1, 12, 2),
        utc(2026, 1, 1, 12, 3),
    ]
    assert due_ticks("* * * * *", "UTC", first, now, 1) == [utc(2026, 1, 1, 12, 3)]
    assert due_ticks("* * * * *", "UTC", first, first, 1) == [first]
    assert due_ticks("* * * * *", "UTC", first, first - timedelta(seconds=1), 5) == []


def test_due_ticks_cost_does_not_grow_with_the_gap() -> None:
    # a week of every-second ticks missed: only the last three are listed
    now = utc(2026, 1, 8, 0, 0, 0, 500000)
    ticks = due_ticks("* * * * * *", "UTC", utc(2026, 1, 1), now, 3)
    assert ticks == [utc(2026, 1, 7, 23, 59, 58), utc(2026, 1, 7, 23, 59, 59), utc(2026, 1, 8)]


def _row(catch_up: str, first: datetime, limit: int = 10) -> dict[str, object]:
    return {
        "cron": "* * * * *",
        "timezone": "UTC",
        "next_fire_at": first,
        "catch_up": catch_up,
        "catch_up_limit": limit,
    }


def test_catch_up_policies_after_three_missed_ticks() -> None:
    first = utc(2026, 1, 1, 12, 1)
    now = utc(2026, 1, 1, 12, 3, 30)  # 12:01, 12:02 and 12:03 fell due
    assert ticks_to_fire(_row("latest", first), now) == [utc(2026, 1, 1, 12, 3)]
    assert ticks_to_fire(_row("skip", first), now) == []  # 12:03 is 30 s late
    assert ticks_to_fire(_row("all", first), now) == [
        utc(2026, 1, 1, 12, 1),
        utc(2026, 1, 1, 12, 2),
        utc(2026, 1, 1, 12, 3),
    ]
    assert ticks_to_fire(_row("all", first, limit=2), now) == [
        utc(2026, 1, 1, 12, 2),
        utc(2026, 1, 1, 12, 3),
    ]
    # on time, every policy fires the tick
    on_time = utc(2026, 1, 1, 12, 1, 0, 300000)
    for policy in ("latest", "skip", "all"):
        assert ticks_to_fire(_row(policy, first), on_time) == [first]


# Europe/Paris: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET


def test_dst_spring_forward_daily_job_in_the_skipped_hour_runs_right_after() -> None:
    tick = next_tick("30 2 * * *", "Europe/Paris", utc(2026, 3, 28, 12))
    assert tick == utc(2026, 3, 29, 1, 0)  # 03:00 CEST, right after the change
    assert next_tick("30 2 * * *", "Europe/Paris", tick) == utc(2026, 3, 30, 0, 30)  # 02:30 CEST


def test_dst_spring_forward_hourly_job_skips_the_missing_hour() -> None:
    ticks = due_ticks("0 * * * *", "Europe/Paris", utc(2026, 3, 29, 0), utc(2026, 3, 29, 2), 10)
    # 01:00 CET, 03:00 CEST, 04:00 CEST: local 02:00 does not exist
    assert ticks == [utc(2026, 3, 29, 0), utc(2026, 3, 29, 1), utc(2026, 3, 29, 2)]


def test_dst_fall_back_daily_job_in_the_repeated_hour_runs_once() -> None:
    tick = next_tick("30 2 * * *", "Europe/Paris", utc(2026, 10, 24, 12))
    assert tick == utc(2026, 10, 25, 0, 30)  # the first 02:30 (CEST)
    assert next_tick("30 2 * * *", "Europe/Paris", tick) == utc(2026, 10, 26, 1, 30)  # CET


def test_dst_fall_back_hourly_job_runs_in_both_hours() -> None:
    ticks = due_ticks(
        "30 * * * *", "Europe/Paris", utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 30), 10
    )
    assert ticks == [
        utc(2026, 10, 24, 23, 30),  # 01:30 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 30),  # 02:30 CET
        utc(2026, 10, 25, 2, 30),  # 03:30 CET
    ]


def test_schedule_definition_and_registry() -> None:
    flow = _flow()
    nightly = flow.schedule("0 3 * * *", name="nightly", input={"n": 1}, timezone="Europe/Paris")
    hourly = flow.schedule("0 * * * *", name="hourly", catch_up="all", catch_up_limit=3)
    assert flow.schedules == (nightly, hourly)
    assert FlowRegistry(flow).schedules == {"nightly": nightly, "hourly": hourly}
    assert nightly.stored()["input"] == {"n": 1}
    assert hourly.stored()["input"] == {}
    assert _flow("other").schedule("* * * * *").name == "other"  # the flow slug by default


def test_input_function_is_stored_by_name_and_called_with_the_tick() -> None:
    def report_input(tick: datetime) -> dict[str, str]:
        return {"day": tick.date().isoformat()}

    schedule = _flow().schedule("0 3 * * *", input=report_input)
    assert schedule.stored()["input"] is None
    assert schedule.stored()["input_function"].endswith("report_input")
    assert schedule.input_at(utc(2026, 5, 1, 3)) == {"day": "2026-05-01"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "is not a valid cron expression"),
        ({"cron": ""}, "must be a non-empty string"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"cron": "* * * * *", "catch_up": "some"}, "catch_up must be one of latest, skip, all"),
        ({"cron": "* * * * *", "catch_up_limit": 0}, "catch_up_limit must be an integer >= 1"),
        ({"cron": "* * * * *", "name": "bad-name"}, "the schedule name cannot contain"),
        ({"cron": "* * * * *", "input": {"x": {1, 2}}}, "the input is not JSON-serialisable"),
    ],
)
def test_bad_definitions_are_refused_with_the_reason(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(FlowDefinitionError, match=message):
        _flow().schedule(**kwargs)  # type: ignore[arg-type]


def test_duplicate_names_are_refused() -> None:
    flow = _flow()
    flow.schedule("* * * * *")
    with pytest.raises(FlowDefinitionError, match="already has a schedule named 'reports'"):
        flow.schedule("0 * * * *")
    other = _flow("other")
    other.schedule("* * * * *", name="reports")
    with pytest.raises(FlowDefinitionError, match="both have a schedule named 'reports'"):
        _ = FlowRegistry(flow, other).schedules


def test_due_ticks_at_the_tick_right_after_the_spring_change() -> None:
    # reverse iteration offers 02:30 that day, a local time that does not exist
    tick = utc(2026, 3, 29, 1, 0)  # 03:00 CEST
    assert due_ticks("30 2 * * *", "Europe/Paris", tick, tick, 1) == [tick]
