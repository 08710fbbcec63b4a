"""Schedules from Python: list, pause, resume, trigger, and sync with the code
(what ``pgflow-sa schedules ...`` and ``pgflow-sa flows deploy`` run)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from ..client import start_flow
from ..dsl import Flow
from ..exceptions import PgflowSaError, ScheduleConflictError, ScheduleNotFoundError
from ..schema import schedules as sql
from .cron import next_tick
from .definition import definition_problem

T = TypeVar("T")
Target = Connection | Engine | str | URL


@dataclass(frozen=True)
class ScheduleInfo:
    """A stored schedule: its definition and its state."""

    name: str
    flow_slug: str
    cron: str
    timezone: str
    input: Any
    input_function: str | None
    catch_up: str
    catch_up_limit: int
    next_fire_at: datetime | None
    last_fired_tick: datetime | None
    paused: bool

    @property
    def problem(self) -> str | None:
        """Why no worker can fire this stored definition (an unknown time zone, a cron
        expression cronsim does not read, written by hand or by an old migration), or
        None."""
        return definition_problem(
            {c: getattr(self, c) for c in ("cron", "timezone", "catch_up", "catch_up_limit")}
        )

    def upcoming(self, now: datetime | None = None) -> datetime | None:
        """When it fires next (UTC): the stored time, or, for a schedule no worker has
        looked at since it was created, changed or resumed, the first tick after
        ``now``. None while paused, or when its definition has a :attr:`problem`."""
        if self.paused or self.problem is not None:
            return None
        if self.next_fire_at is not None:
            return self.next_fire_at
        return next_tick(self.cron, self.timezone, now or datetime.now(timezone.utc))


def _in_transaction(target: Target, work: Callable[[Connection], T]) -> T:
    if isinstance(target, Connection):
        return work(target)
    from .._db import database_errors, sync_engine

    engine = sync_engine(target)
    with database_errors(engine.url, PgflowSaError), engine.begin() as conn:
        return work(conn)


def _require_table(conn: Connection) -> None:
    if not sql.schedules_installed(conn):
        raise sql.SchedulesMissingError()


def _info(row: Any) -> ScheduleInfo:
    return ScheduleInfo(**{f: row[f] for f in ScheduleInfo.__dataclass_fields__})


def list_schedules(target: Target) -> list[ScheduleInfo]:
    """Every stored schedule, by name."""

    def work(conn: Connection) -> list[ScheduleInfo]:
        _require_table(conn)
        return [_info(r) for r in conn.execute(sql.read_statement()).mappings()]

    return _in_transaction(target, work)


def _set_paused(target: Target, name: str, paused: bool) -> None:
    def work(conn: Connection) -> None:
        _require_table(conn)
        if conn.execute(sql.set_paused_statement(name, paused)).first() is not None:
            return
        if conn.execute(sql.exists_one_statement(name)).first() is None:
            raise _not_found(conn, name)

    _in_transaction(target, work)


def _not_found(conn: Connection, name: str) -> ScheduleNotFoundError:
    names = [r["name"] for r in conn.execute(sql.read_statement()).mappings()]
    return ScheduleNotFoundError(
        f"no schedule {name!r} in this database (schedules: {', '.join(names) or 'none'}); "
        "schedules are created by `pgflow-sa flows deploy APP` or an Alembic migration"
    )


def pause_schedule(target: Target, name: str) -> None:
    """Stop firing ``name`` until :func:`resume_schedule`."""
    _set_paused(target, name, True)


def resume_schedule(target: Target, name: str) -> None:
    """Fire ``name`` again from its next tick on (ticks passed while paused are not
    caught up). Changes nothing when ``name`` is not paused."""
    _set_paused(target, name, False)


def trigger_schedule(target: Target, name: str, *, flows: Iterable[Flow] = ()) -> uuid.UUID:
    """Start one run of ``name`` now, with its input, recorded in
    ``pgflow_sa.schedule_runs`` as a manual tick; returns the run id. Works while
    paused. ``flows``: needed when the schedule computes its input in code."""

    def work(conn: Connection) -> uuid.UUID:
        _require_table(conn)
        # the input is computed before the row is locked (as the workers do): a slow
        # input function holds up no worker firing this schedule
        row = conn.execute(sql.read_statement(names=[name])).mappings().first()
        if row is None:
            raise _not_found(conn, name)
        flow: Flow | str = row["flow_slug"]
        value = row["input"]
        for candidate in flows:
            if candidate.slug == row["flow_slug"]:
                flow = candidate
        if row["input_function"] is not None:
            code = next((s for s in getattr(flow, "schedules", ()) if s.name == name), None)
            if code is None:
                raise PgflowSaError(
                    f"schedule {name!r} computes its input in code ({row['input_function']}): "
                    "give its flows (trigger_schedule(..., flows=registry), or --app APP)"
                )
            value = code.input_at(datetime.now(timezone.utc))
        if conn.execute(sql.lock_statement(name)).first() is None:
            raise _not_found(conn, name)  # deleted meanwhile
        run_id = uuid.uuid4()
        claim = sql.claim_tick_statement(name, None, row["flow_slug"], run_id, manual=True)
        if conn.execute(claim).first() is None:  # pragma: no cover - clock_timestamp() ticks
            raise PgflowSaError(f"schedule {name!r} was triggered at this very moment already")
        start_flow(conn, flow, value, run_id=run_id)
        return run_id

    return _in_transaction(target, work)


def refuse_taken_names(conn: Connection, code: list[dict[str, Any]]) -> None:
    """Raise :class:`ScheduleConflictError` when a schedule of ``code``
    (``Schedule.stored()``) has the name of another flow's stored schedule."""
    if not code or not sql.schedules_installed(conn):
        return
    problems = sql.owner_conflicts(conn, code)
    if problems:
        raise ScheduleConflictError("nothing was deployed: " + "; ".join(problems))


def sync_schedules(conn: Connection, flows: Iterable[Flow]) -> sql.ScheduleDiff:
    """Make the stored schedules of ``flows`` those their code declares: add the new,
    update the changed (a changed cron or time zone fires from its next tick), delete
    those no longer declared (the runs they started stay). Paused stays paused. A
    schedule name another flow's stored schedule has is refused
    (:class:`ScheduleConflictError`), before anything changes."""
    chosen = list(flows)
    code = [s.stored() for flow in chosen for s in flow.schedules]
    if not sql.schedules_installed(conn):
        if code:
            raise sql.SchedulesMissingError()
        return sql.ScheduleDiff()
    refuse_taken_names(conn, code)
    diff = sql.diff_schedules(code, sql.read_definitions(conn, [f.slug for f in chosen]))
    sql.apply_diff(conn, diff)
    return diff
