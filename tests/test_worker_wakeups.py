"""Which news wakes which poller (pure: no database)."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest

from pgflow_sa import Flow
from pgflow_sa.schema.rows import StepTaskRecord
from pgflow_sa.worker.task import ClaimedTask
from pgflow_sa.worker.wakeups import Wakeups

chain = Flow("wake_chain")


@chain.step
async def a(input: Any) -> list[int]:
    return [1]


@chain.step(depends_on=[a])
async def b(input: Any) -> int:
    return 1


@chain.map(depends_on=a)
async def m(value: int) -> int:
    return value


@chain.step(depends_on=[b, m])
async def c(input: Any) -> int:
    return 1


other = Flow("wake_other")


@other.step(slug="b")  # another flow's step of the same slug
async def other_b(input: Any) -> int:
    return 1


class Woken:
    def __init__(self, notified: bool = True) -> None:
        self.flows: list[str] = []
        self.everything = 0
        self.notified = notified
        self.more_waiting = False
        self.wakeups = Wakeups(
            [chain, other],
            self.flows.append,
            self._all,
            lambda: self.notified,
            lambda slug: self.more_waiting,
        )

    def _all(self) -> None:
        self.everything += 1


def _task(step: str, *, completed: bool = True, run_id: uuid.UUID | None = None) -> ClaimedTask:
    run_id = run_id or RUN
    task = ClaimedTask(
        flow=chain,
        step=chain.get_step(step),
        record=StepTaskRecord(chain.slug, run_id, step, {}, 1, 0),
        worker_id=uuid.uuid4(),
        started_at=datetime.datetime.now(datetime.timezone.utc),
        attempt=1,
        timeout=60,
    )
    task.completed = completed
    return task


RUN = uuid.uuid4()


@pytest.mark.parametrize("event_first", [False, True])
def test_a_step_started_by_the_workers_completion_wakes_once(event_first: bool) -> None:
    woken = Woken()
    if event_first:
        woken.wakeups.step_started(RUN, "b")
        woken.wakeups.step_started(RUN, "m")
        woken.wakeups.settled(_task("a"))
    else:
        woken.wakeups.settled(_task("a"))
        woken.wakeups.step_started(RUN, "b")
        woken.wakeups.step_started(RUN, "m")
    # the events name a step "b" of another flow too: the first arrival wakes both
    expected = ["wake_chain", "wake_other", "wake_chain"] if event_first else ["wake_chain"]
    assert woken.flows == expected


def test_one_event_of_two_first_still_wakes_for_the_other() -> None:
    woken = Woken()
    woken.wakeups.step_started(RUN, "m")
    woken.wakeups.settled(_task("a"))  # "b" is not announced yet: wake
    woken.wakeups.step_started(RUN, "b")  # paired with the completion: dropped
    assert woken.flows == ["wake_chain", "wake_chain"]


def test_a_step_with_two_dependencies_is_woken_by_its_event() -> None:
    woken = Woken()
    woken.wakeups.settled(_task("b"))  # it may or may not have started c: no wake-up
    assert woken.flows == []
    woken.wakeups.step_started(RUN, "c")
    assert woken.flows == ["wake_chain"]


def test_events_of_other_runs_are_not_paired() -> None:
    woken = Woken()
    woken.wakeups.settled(_task("a"))
    woken.wakeups.step_started(uuid.uuid4(), "b")
    assert woken.flows == ["wake_chain", "wake_chain", "wake_other"]


def test_failures_and_completions_without_events_wake_their_flow() -> None:
    woken = Woken()
    woken.wakeups.settled(_task("c", completed=False))  # a retry may be due
    woken.notified = False
    woken.wakeups.settled(_task("c"))
    assert woken.flows == ["wake_chain", "wake_chain"]


def test_while_a_backlog_waits_every_settle_wakes_its_flow() -> None:
    woken = Woken()
    woken.more_waiting = True
    woken.wakeups.settled(_task("c"))  # its slot is free again: claim at once
    assert woken.flows == ["wake_chain"]


def test_an_event_naming_no_step_wakes_every_flow() -> None:
    woken = Woken()
    woken.wakeups.step_started(None, None)
    woken.wakeups.step_started(RUN, "not_served")
    assert (woken.everything, woken.flows) == (1, [])
