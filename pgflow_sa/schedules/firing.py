"""Firing due ticks: each due tick of a schedule starts one run, claimed in
``pgflow_sa.schedule_runs`` in the same transaction as ``pgflow.start_flow``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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


def _input(row: Mapping[Any, Any], code: Schedule | None, tick: datetime) -> Any:
    if row["input_function"] is None:
        return row["input"]
    if code is None:
        raise PgflowSaError(
            f"schedule {row['name']!r} computes its input with {row['input_function']}, "
            "which this process does not define"
        )
    try:
        return code.input_at(tick)
    except Exception as exc:  # the app's code: recorded, and the schedule moves on
        raise PgflowSaError(
            f"the input function {row['input_function']} of schedule {row['name']!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc


async def start_scheduled(
    conn: AsyncConnection,
    row: Mapping[Any, Any],
    tick: datetime,
    flow: Flow | str,
    code: Schedule | None,
) -> FiredTick | None:
    """Claim ``tick`` of the schedule and start its run, in the caller's transaction.
    None when the tick was already claimed."""
    run_id = uuid.uuid4()
    claimed = (
        await conn.execute(sql.claim_tick_statement(row["name"], tick, row["flow_slug"], run_id))
    ).scalar()
    if claimed is None:
        return None
    try:
        await start_flow_async(conn, flow, _input(row, code, claimed), run_id=run_id)
    except PgflowSaError as exc:  # start_flow_async leaves the transaction usable
        logger.error("schedule %s: tick %s started no run: %s", row["name"], claimed, exc)
        await conn.execute(sql.record_failure_statement(row["name"], claimed, str(exc)))
        return FiredTick(row["name"], claimed, None, str(exc))
    return FiredTick(row["name"], claimed, run_id)


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
    for inputs computed at tick time."""
    fired: list[FiredTick] = []
    async with engine.begin() as conn:
        row = (await conn.execute(sql.lock_due_statement(name, now))).mappings().first()
        if row is None:
            return fired
        flow: Flow | str = (flows or {}).get(row["flow_slug"], row["flow_slug"])
        for tick in ticks_to_fire(row, now):
            result = await start_scheduled(conn, row, tick, flow, (code or {}).get(name))
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
) -> None:
    """Compute the next fire time of schedules that have none (new, changed or
    resumed): the first tick after ``now``."""
    async with engine.begin() as conn:
        for row in rows:
            nxt = next_tick(row["cron"], row["timezone"], now)
            await conn.execute(sql.set_next_statement(row["name"], nxt))


async def fire_due_schedules(
    engine: AsyncEngine, now: datetime, flows: Sequence[Flow] | None = None
) -> list[FiredTick]:
    """Fire every schedule due at ``now`` (of ``flows``, or of every flow), first
    giving a next fire time to the schedules without one. This is one step of a
    worker's scheduler; tests call it with a chosen ``now``."""
    slugs = None if flows is None else [f.slug for f in flows]
    async with engine.connect() as conn:
        rows = (await conn.execute(sql.read_statement(flow_slugs=slugs))).mappings().all()
    unset = [r for r in rows if r["next_fire_at"] is None and not r["paused"]]
    if unset:
        await set_next_fire_times(engine, unset, now)
    by_slug = {f.slug: f for f in flows or ()}
    code = {s.name: s for f in flows or () for s in f.schedules}
    fired: list[FiredTick] = []
    for row in rows:
        if not row["paused"] and row["next_fire_at"] is not None and row["next_fire_at"] <= now:
            fired += await fire_schedule(engine, row["name"], now, by_slug, code)
    return fired
