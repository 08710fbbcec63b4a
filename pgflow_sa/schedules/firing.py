"""Firing due ticks: each due tick of a schedule starts one run, claimed in
``pgflow_sa.schedule_runs`` in the same transaction as ``pgflow.start_flow``.

A process fires only the schedules its code declares (an older worker of a rolling
deploy leaves the newer schedules to the workers that know them), and a schedule
whose stored definition cannot be fired (a bad time zone or cron written by hand)
is reported and skipped, never stopping the others."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._db import DB_ERRORS
from ..client import start_flow_async
from ..dsl import Flow
from ..exceptions import PgflowSaError
from ..schema import schedules as sql
from .cron import due_ticks, next_tick
from .definition import SKIP_GRACE_SECONDS, Schedule

logger = logging.getLogger("pgflow_sa.schedules")


@dataclass(frozen=True)
class FiredTick:
    """One tick that a call fired: the run it started, or why none started."""

    schedule: str
    tick: datetime
    run_id: uuid.UUID | None
    error: str | None = None


def ticks_to_fire(row: Mapping[Any, Any], now: datetime) -> list[datetime]:
    """The ticks of a stored, due schedule that fire at ``now``, by its catch-up policy."""
    first_due = row["next_fire_at"]
    keep = row["catch_up_limit"] if row["catch_up"] == "all" else 1
    ticks = due_ticks(row["cron"], row["timezone"], first_due, now, keep)
    if row["catch_up"] == "skip":
        grace = timedelta(seconds=SKIP_GRACE_SECONDS)
        ticks = [t for t in ticks if now - t <= grace]
    return ticks


#: an input computed before the row is locked: the value, or why there is none
Computed = Any


async def _compute(row: Mapping[Any, Any], code: Schedule | None, tick: datetime) -> Computed:
    """The input of ``tick`` (a PgflowSaError instead when there is none). An input
    function runs in a thread: a slow one does not hold up the worker's event loop."""
    if row["input_function"] is None:
        return row["input"]
    if code is None:
        return PgflowSaError(
            f"schedule {row['name']!r} computes its input with {row['input_function']}, "
            "which this process does not define"
        )
    try:
        return await asyncio.to_thread(code.input_at, tick)
    except Exception as exc:  # the app's code: recorded, and the schedule moves on
        return PgflowSaError(
            f"the input function {row['input_function']} of schedule {row['name']!r} raised "
            f"{type(exc).__name__}: {exc}"
        )


async def start_scheduled(
    conn: AsyncConnection,
    row: Mapping[Any, Any],
    tick: datetime,
    flow: Flow | str,
    value: Computed,
) -> FiredTick | None:
    """Claim ``tick`` of the schedule and start its run with ``value`` (computed
    beforehand by ``_compute``), in the caller's transaction. None when the tick was
    already claimed."""
    run_id = uuid.uuid4()
    claimed = (
        await conn.execute(sql.claim_tick_statement(row["name"], tick, row["flow_slug"], run_id))
    ).scalar()
    if claimed is None:
        return None
    try:
        if isinstance(value, PgflowSaError):
            raise value
        await start_flow_async(conn, flow, value, run_id=run_id)
    except PgflowSaError as exc:  # start_flow_async leaves the transaction usable
        logger.error("schedule %s: tick %s started no run: %s", row["name"], claimed, exc)
        await conn.execute(sql.record_failure_statement(row["name"], claimed, str(exc)))
        return FiredTick(row["name"], claimed, None, str(exc))
    return FiredTick(row["name"], claimed, run_id)


def _due(row: Mapping[Any, Any] | None, now: datetime) -> bool:
    return (
        row is not None
        and not row["paused"]
        and row["next_fire_at"] is not None
        and row["next_fire_at"] <= now
    )


async def fire_schedule(
    engine: AsyncEngine,
    name: str,
    now: datetime,
    flows: Mapping[str, Flow] | None = None,
    code: Mapping[str, Schedule] | None = None,
) -> list[FiredTick]:
    """Fire the ticks of schedule ``name`` due at ``now`` (by its catch-up policy) in
    one transaction, and move its next fire time past ``now``. Nothing when it is
    not due, paused, or being fired by another worker right now. ``flows``: Flow
    objects by slug, to check inputs against their types; ``code``: schedules by name,
    for inputs computed at tick time.

    Inputs computed by a function are computed first, with no lock held (the function
    may be slow); then the row is locked, checked to be still due, and each tick is
    claimed and started. Workers racing for a tick may each call the function; one
    run starts."""
    schedule = (code or {}).get(name)
    async with engine.connect() as conn:
        seen = (await conn.execute(sql.read_statement(names=[name]))).mappings().first()
    if seen is None or not _due(seen, now):
        return []
    computed: dict[datetime, Computed] = {}
    if seen["input_function"] is not None:
        for tick in ticks_to_fire(seen, now):
            computed[tick] = await _compute(seen, schedule, tick)
    fired: list[FiredTick] = []
    async with engine.begin() as conn:
        row = (await conn.execute(sql.lock_due_statement(name, now))).mappings().first()
        if row is None:
            return fired
        flow: Flow | str = (flows or {}).get(row["flow_slug"], row["flow_slug"])
        same = row["input_function"] == seen["input_function"]
        for tick in ticks_to_fire(row, now):
            if row["input_function"] is None:
                value = row["input"]
            elif same and tick in computed:
                value = computed[tick]
            else:  # the definition changed in between: rare, computed under the lock
                value = await _compute(row, schedule, tick)
            result = await start_scheduled(conn, row, tick, flow, value)
            if result is not None:
                fired.append(result)
        last = fired[-1].tick if fired else None
        following = next_tick(row["cron"], row["timezone"], now)
        await conn.execute(sql.fired_statement(name, following, last))
    for item in fired:
        if item.run_id is not None:
            logger.info("schedule %s: tick %s started run %s", name, item.tick, item.run_id)
    return fired


async def set_next_fire_times(
    engine: AsyncEngine, rows: Sequence[Mapping[Any, Any]], now: datetime
) -> dict[str, str]:
    """Compute the next fire time of schedules that have none (new, changed or
    resumed): the first tick after ``now``. Returns the schedules whose definition
    gives none (name -> why); the others are set."""
    problems: dict[str, str] = {}
    async with engine.begin() as conn:
        for row in rows:
            try:
                nxt = next_tick(row["cron"], row["timezone"], now)
            except Exception as exc:  # a bad stored cron or time zone: reported
                problems[row["name"]] = _problem(exc)
                continue
            await conn.execute(sql.set_next_statement(row["name"], nxt))
    return problems


def _problem(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Step:
    """What one step of a scheduler did: the ticks it fired, the schedules it could
    not fire (name -> why: a stored definition no worker can fire) and the schedules
    it tried (set a next fire time for, or fired)."""

    fired: list[FiredTick]
    problems: dict[str, str]
    tried: set[str]


async def fire_step(
    engine: AsyncEngine,
    rows: Sequence[Mapping[Any, Any]],
    now: datetime,
    flows: Mapping[str, Flow],
    code: Mapping[str, Schedule],
) -> Step:
    """Give a next fire time to the schedules of ``rows`` without one, and fire those
    due at ``now``, each on its own: one whose stored definition cannot be fired is
    reported in the result, and the others fire. ``rows``: name, next_fire_at, paused
    of the schedules this process fires. Database errors are raised."""
    step = Step([], {}, set())
    unset = [r["name"] for r in rows if not r["paused"] and r["next_fire_at"] is None]
    if unset:
        async with engine.connect() as conn:
            full = (await conn.execute(sql.read_statement(names=unset))).mappings().all()
        step.problems.update(await set_next_fire_times(engine, full, now))
        step.tried.update(unset)
    for row in rows:
        if _due(row, now):
            step.tried.add(row["name"])
            try:
                step.fired += await fire_schedule(engine, row["name"], now, flows, code)
            except DB_ERRORS:
                raise
            except Exception as exc:  # a bad stored cron or time zone: reported
                step.problems[row["name"]] = _problem(exc)
    return step


def fired_by(
    rows: Sequence[Mapping[Any, Any]], code: Collection[str] | None
) -> list[Mapping[Any, Any]]:
    """The rows of the schedules this process fires: those its code declares (by
    name), or, with no code given, those whose input is stored."""
    if code is None:
        return [r for r in rows if r["input_function"] is None]
    return [r for r in rows if r["name"] in code]


async def fire_due_schedules(
    engine: AsyncEngine, now: datetime, flows: Sequence[Flow] | None = None
) -> list[FiredTick]:
    """Fire every schedule due at ``now`` that ``flows`` declare (with no flows: every
    stored schedule whose input is stored), first giving a next fire time to the
    schedules without one. This is one step of a worker's scheduler; tests call it
    with a chosen ``now``. A schedule whose stored definition cannot be fired is
    logged and skipped."""
    slugs = None if flows is None else [f.slug for f in flows]
    async with engine.connect() as conn:
        rows = (await conn.execute(sql.read_statement(flow_slugs=slugs))).mappings().all()
    code = {s.name: s for f in flows or () for s in f.schedules}
    chosen = fired_by(rows, None if flows is None else code)
    step = await fire_step(engine, chosen, now, {f.slug: f for f in flows or ()}, code)
    for name, problem in step.problems.items():
        logger.error("schedule %s is not fired: its stored definition fails (%s)", name, problem)
    return step.fired
