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
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from .._db import DB_ERRORS, classify, first_line, sqlstate
from ..dsl import Flow
from ..schedules.firing import fire_schedule, set_next_fire_times
from ..schema import schedules as sql

logger = logging.getLogger("pgflow_sa.worker")

#: seconds between two looks at the schedules when no tick is due sooner
CHECK_INTERVAL = 1.0
#: seconds before looking again at a tick that another worker is firing
RACE_PAUSE = 0.05
_UNDEFINED_TABLE = "42P01"


class Scheduler:
    def __init__(
        self, engine: AsyncEngine, flows: Sequence[Flow], check_interval: float = CHECK_INTERVAL
    ) -> None:
        self.engine = engine
        self.flows = {flow.slug: flow for flow in flows}
        self.code = {s.name: s for flow in flows for s in flow.schedules}
        self.check_interval = check_interval

    async def look(self) -> float:
        """Fire what is due now; the seconds until the next look."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sql.poll_statement(list(self.flows)))).all()
        if not rows:
            return self.check_interval
        now: datetime = rows[0].now
        await self._fire(rows, now)
        upcoming = [r.next_fire_at for r in rows if not r.paused and r.next_fire_at is not None]
        if not upcoming:
            return self.check_interval
        until: float = (min(upcoming) - now).total_seconds()
        if until <= 0:  # just fired (or another worker is firing it): look again soon
            return RACE_PAUSE
        return min(self.check_interval, until)

    async def _fire(self, rows: Sequence[Row[Any]], now: datetime) -> None:
        unset = [r.name for r in rows if not r.paused and r.next_fire_at is None]
        if unset:
            async with self.engine.connect() as conn:
                full = (await conn.execute(sql.read_statement(names=unset))).mappings().all()
            await set_next_fire_times(self.engine, full, now)
        for row in rows:
            if not row.paused and row.next_fire_at is not None and row.next_fire_at <= now:
                await fire_schedule(self.engine, row.name, now, self.flows, self.code)

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
