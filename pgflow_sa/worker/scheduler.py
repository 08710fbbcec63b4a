"""The worker's scheduler: fires the due ticks of the schedules of the flows it
serves. Every worker runs one; the database decides which of them fires a tick.

Each look is one small query (the database's clock and the schedules' next fire
times); between looks it sleeps until the next tick, at most ``check_interval``
seconds, so an idle worker asks at most about once a second, and a paused, resumed or
newly deployed schedule is seen within that time. The database's clock, not this
machine's, says when a tick is due, so workers on several machines agree."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from .._db import DB_ERRORS, classify, first_line, sqlstate
from ..dsl import Flow
from ..schedules.firing import fire_step
from ..schema import schedules as sql

logger = logging.getLogger("pgflow_sa.worker")

#: seconds between two looks at the schedules when no tick is due sooner
CHECK_INTERVAL = 1.0
#: seconds before looking again at a tick that another worker is firing
RACE_PAUSE = 0.05
_UNDEFINED_TABLE = "42P01"


class Scheduler:
    """Fires the schedules ``flows`` declare, by name: a stored schedule this code
    does not declare (a newer release's, during a rolling deploy) is left to the
    workers that do. A schedule whose stored definition cannot be fired is logged
    once (again when its problem changes) and skipped; the others keep firing."""

    def __init__(
        self, engine: AsyncEngine, flows: Sequence[Flow], check_interval: float = CHECK_INTERVAL
    ) -> None:
        self.engine = engine
        self.flows = {flow.slug: flow for flow in flows}
        self.code = {s.name: s for flow in flows for s in flow.schedules}
        self.check_interval = check_interval
        #: schedules whose stored definition cannot be fired: name -> why (as logged)
        self.problems: dict[str, str] = {}

    async def look(self) -> float:
        """Fire what is due now; the seconds until the next look."""
        async with self.engine.connect() as conn:
            statement = sql.poll_statement(list(self.flows), names=list(self.code))
            rows = (await conn.execute(statement)).mappings().all()
        if not rows:
            return self.check_interval
        now: datetime = rows[0]["now"]
        await self._fire(rows, now)
        upcoming = [
            r["next_fire_at"]
            for r in rows
            if not r["paused"] and r["next_fire_at"] is not None and r["name"] not in self.problems
        ]
        if not upcoming:
            return self.check_interval
        until: float = (min(upcoming) - now).total_seconds()
        if until <= 0:  # just fired (or another worker is firing it): look again soon
            return RACE_PAUSE
        return min(self.check_interval, until)

    async def _fire(self, rows: Sequence[RowMapping], now: datetime) -> None:
        step = await fire_step(self.engine, rows, now, self.flows, self.code)
        for name, problem in step.problems.items():
            if self.problems.get(name) != problem:
                logger.error(
                    "schedule %s is not fired: its stored definition fails (%s); the other "
                    "schedules fire. Correct it with `pgflow-sa flows deploy` or a migration",
                    name,
                    problem,
                )
        present = {r["name"] for r in rows}
        self.problems = {
            name: problem
            for name, problem in {**self.problems, **step.problems}.items()
            if name in present and (name in step.problems or name not in step.tried)
        }

    async def run(self, stopping: asyncio.Event) -> None:
        """Look, sleep, look again, until ``stopping`` is set. Database errors are
        logged and the next look comes after ``check_interval``; a database without
        the schedules table ends the loop with a warning that says what to run."""
        while not stopping.is_set():
            try:
                delay = await self.look()
            except DB_ERRORS as exc:
                if sqlstate(exc) == _UNDEFINED_TABLE:
                    logger.warning(
                        "no schedules are fired: this database has no pgflow_sa.schedules "
                        "table (run `pgflow-sa install` to add it, then restart the worker)"
                    )
                    return
                logger.warning(
                    "firing schedules failed (%s: %s); again in %.1f s",
                    classify(exc).value,
                    first_line(exc),
                    self.check_interval,
                )
                delay = self.check_interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)
