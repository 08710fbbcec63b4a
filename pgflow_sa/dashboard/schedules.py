"""The schedules page's reading: every stored schedule (as
:func:`pgflow_sa.schedules.manage.list_schedules` reads them) and the latest ticks
of each, in one query."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from ..schedules.manage import ScheduleInfo, list_schedules
from ..schema import schedules as sql

#: ticks shown per schedule, the newest first
TICKS_SHOWN = 10


@dataclass(frozen=True)
class ScheduleView:
    info: ScheduleInfo
    upcoming: datetime | None
    ticks: Sequence[Any]  # rows of pgflow_sa.schedule_runs, the newest first


@dataclass(frozen=True)
class SchedulesView:
    schedules: list[ScheduleView]
    missing: str | None = None  # why there are none to show: no schedules tables


async def read_schedules(conn: AsyncConnection) -> SchedulesView:
    try:
        infos = await conn.run_sync(list_schedules)
    except sql.SchedulesMissingError as exc:
        return SchedulesView([], str(exc))
    rows = (await conn.execute(sql.recent_ticks_statement(TICKS_SHOWN))).all()
    ticks: dict[str, list[Any]] = {}
    for row in rows:
        ticks.setdefault(row.schedule_name, []).append(row)
    return SchedulesView(
        [ScheduleView(info, info.upcoming(), ticks.get(info.name, [])) for info in infos]
    )
