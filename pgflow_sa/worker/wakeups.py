"""Which news wakes which poller, so that each started step costs one claim.

A step that the worker's own completion starts is announced twice: the completion
statement returns, and pgflow's ``step:<slug>:started`` event of the same commit
arrives over the LISTEN connection (mostly a moment later, now and then before).
Either one alone is enough (a claim that begins after the commit sees the step's
messages); the second only starts a claim that finds nothing, while the worker's
claims wait their turn for the concurrency budget. So the first wakes the flow's
poller and the second is dropped, but only where the two surely name one commit: a
step whose only dependency is a single step is started by the completion of that
step's one task, and by nothing else. Any other started step is woken by its event
alone (a completion does not know which steps it started). Without pgflow's events,
or while a flow's queue holds more than its latest claim could take, every settle
wakes its flow's poller.

Dropping is never a guess: an entry that finds no partner is forgotten after a
while (at worst, one claim more), and a wake-up is dropped only when its partner
has already woken the poller.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable, Iterable, Sequence

from ..dsl import Flow
from .task import ClaimedTask

#: unpaired announcements remembered (each is a run id and a step slug)
MEMORY = 4096

_Key = tuple[uuid.UUID, str]


class Wakeups:
    """Decides the wake-ups from settles and from pgflow's step:started events."""

    def __init__(
        self,
        flows: Iterable[Flow],
        wake_flow: Callable[[str], None],
        wake_all: Callable[[], None],
        notified: Callable[[], bool],
        more_waiting: Callable[[str], bool],
    ) -> None:
        """``more_waiting(flow_slug)``: whether the flow's latest claim left messages it
        could not take (then every settle wakes its poller: the slot it frees may take
        one at once)."""
        self._more_waiting = more_waiting
        self._wake_flow = wake_flow
        self._wake_all = wake_all
        self._notified = notified
        #: the served flows that have a step of this slug (pgflow's step events do not
        #: name the flow)
        self._flows_by_step: dict[str, list[str]] = {}
        #: (flow, single step) -> the steps that depend on it alone
        self._sole_dependents: dict[tuple[str, str], list[str]] = {}
        for flow in flows:
            single = {step.slug for step in flow.steps if not step.is_map}
            for step in flow.steps:
                self._flows_by_step.setdefault(step.slug, []).append(flow.slug)
                if len(step.depends_on) == 1 and step.depends_on[0] in single:
                    key = (flow.slug, step.depends_on[0])
                    self._sole_dependents.setdefault(key, []).append(step.slug)
        #: slugs of the steps whose two announcements are paired
        self._paired = {step for steps in self._sole_dependents.values() for step in steps}
        #: started steps whose event arrived first (it woke the poller)
        self._announced: collections.OrderedDict[_Key, None] = collections.OrderedDict()
        #: started steps whose completion returned first (it woke the poller)
        self._expected: collections.OrderedDict[_Key, None] = collections.OrderedDict()

    def claim_after(self, tasks: Sequence[ClaimedTask]) -> str | None:
        """The flow to claim from in the statement that completes ``tasks`` (see
        Settler.complete_and_claim): their one flow, when their completions may start
        a step of it (one that depends on one of them alone) or its queue holds more
        than its latest claim could take; else None (the poller claims if woken)."""
        flow_slug = tasks[0].flow.slug
        if any(task.flow.slug != flow_slug for task in tasks):
            return None
        if self._more_waiting(flow_slug):
            return flow_slug
        if any((flow_slug, task.record.step_slug) in self._sole_dependents for task in tasks):
            return flow_slug
        return None

    def claiming(self, tasks: Sequence[ClaimedTask]) -> None:
        """A statement completing ``tasks`` and claiming after them is about to be
        sent: the events of the steps those completions start are not news (they may
        arrive before the statement's answer)."""
        for task in tasks:
            self._expect(task)

    def settled(self, task: ClaimedTask) -> None:
        """A task this worker settled: its completion may have started steps, and its
        failure may have made a retry due sooner than the poller knows. A completion
        whose statement claimed too wakes nothing: that claim read the queue after the
        completion (and woke the poller itself when it read a full batch)."""
        flow_slug = task.flow.slug
        if task.claim_followed:
            return  # expected before its statement was sent (see claiming)
        if not (task.completed and self._notified()):
            self._wake_flow(flow_slug)
            return
        if self._more_waiting(flow_slug):
            self._wake_flow(flow_slug)  # and the step events as they come
            return
        if self._expect(task):
            self._wake_flow(flow_slug)

    def _expect(self, task: ClaimedTask) -> bool:
        """Pair the steps ``task``'s completion started with their events: whether one
        has not been announced yet (its event, when it comes, is dropped)."""
        run_id = task.record.run_id
        dependents = self._sole_dependents.get((task.flow.slug, task.record.step_slug), ())
        fresh = [step for step in dependents if (run_id, step) not in self._announced]
        for step in dependents:
            self._announced.pop((run_id, step), None)
        for step in fresh:
            _remember(self._expected, (run_id, step))
        return bool(fresh)

    def step_started(self, run_id: uuid.UUID | None, step_slug: str | None) -> None:
        """pgflow's step:started event (None: one that names no run or step)."""
        if run_id is None or step_slug is None:
            self._wake_all()
            return
        key = (run_id, step_slug)
        if key in self._expected:
            del self._expected[key]  # its completion woke the poller after the commit
            return
        if step_slug in self._paired:
            _remember(self._announced, key)
        flows = self._flows_by_step.get(step_slug, ())
        for flow_slug in flows:
            self._wake_flow(flow_slug)


def _remember(memory: collections.OrderedDict[_Key, None], key: _Key) -> None:
    memory[key] = None
    while len(memory) > MEMORY:
        memory.popitem(last=False)
