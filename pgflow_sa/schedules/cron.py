"""Cron arithmetic for schedules: the next tick, and the ticks that fell due.

Cron parsing and iteration come from ``cronsim`` rather than ``croniter``:

- maintenance: cronsim is kept by the Healthchecks.io author for a service whose job
  is judging cron times, with regular releases; croniter was declared abandoned by
  its maintainer in 2024-25 before pallets-eco adopted it, and projects were told to
  move off it meanwhile;
- DST: cronsim follows Debian's cron on purpose and documents it (a daily job whose
  time is skipped by the spring change runs right after it; one whose time repeats in
  autumn runs once; jobs every hour or more often run on the clock as usual), on
  ``zoneinfo`` datetimes; croniter's DST handling has a long history of bug reports;
- licence and weight: BSD-3-Clause with no dependencies (croniter: MIT, needs
  python-dateutil);
- it also reads an optional seconds field (six fields, seconds first).

cronsim 2.7 is the last release for Python 3.10 (2.8 needs 3.11); both are tested.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ..exceptions import FlowDefinitionError

_SECOND = timedelta(seconds=1)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (e.g. ``Europe/Paris``), or a clear error."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise FlowDefinitionError(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None


def zone_problem(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone, or None."""
    try:
        zone(name)
    except FlowDefinitionError as exc:
        return str(exc)
    return None


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a cron expression cronsim reads, or None."""
    if not isinstance(expression, str) or not expression.strip():
        return "must be a non-empty string such as '*/5 * * * *'"
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except CronSimError as exc:
        return f"is not a valid cron expression ({exc})"
    return None


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("schedule times must be timezone-aware datetimes")
    return moment


def next_tick(expression: str, timezone_name: str, after: datetime) -> datetime | None:
    """The first tick strictly after ``after``, in UTC (None if the expression never
    matches again)."""
    local = _aware(after).astimezone(zone(timezone_name))
    try:
        return next(CronSim(expression, local)).astimezone(timezone.utc)
    except StopIteration:
        return None


def due_ticks(
    expression: str, timezone_name: str, first_due: datetime, now: datetime, keep: int
) -> list[datetime]:
    """The last ``keep`` ticks ``t`` with ``first_due <= t <= now``, oldest first, in UTC.

    ``first_due`` is itself a tick (a schedule's stored next fire time). Cost grows with
    ``keep``, not with how long ago ``first_due`` was: reverse iteration finds where
    the last ``keep`` ticks begin, and forward iteration from there lists them (forward
    is what decides a tick; around a DST change the two may disagree)."""
    tz = zone(timezone_name)
    first_due, now = _aware(first_due), _aware(now)
    if first_due > now or keep < 1:
        return []
    start = first_due
    # arithmetic in UTC: on zoneinfo datetimes it is wall-clock arithmetic, which can
    # land on a local time that does not exist
    floor = now.astimezone(timezone.utc).replace(microsecond=0) + _SECOND
    back = CronSim(expression, floor.astimezone(tz), reverse=True)
    for _ in range(keep + 1):
        try:
            candidate = next(back)
        except StopIteration:
            break
        if candidate > now:  # a local time the spring change skipped, read as after it
            continue
        if candidate < first_due:
            break
        start = candidate
    ticks: deque[datetime] = deque(maxlen=keep)
    forward = CronSim(expression, (start.astimezone(timezone.utc) - _SECOND).astimezone(tz))
    while True:
        try:
            tick = next(forward)
        except StopIteration:
            break
        if tick > now:
            break
        if tick >= first_due:
            ticks.append(tick.astimezone(timezone.utc))
    return list(ticks)
