"""The SQL of schedules: reading and syncing ``pgflow_sa.schedules``, claiming a tick
in ``pgflow_sa.schedule_runs``, and the same changes as SQL text for Alembic."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, text, true
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.sql import Executable

from ..exceptions import PgflowSaError
from . import tables
from .names import PGFLOW_SA_SCHEMA

s = tables.schedules
runs = tables.schedule_runs

#: the definition columns of a stored schedule (the rest is runtime state)
DEFINITION_COLUMNS = (
    "flow_slug",
    "cron",
    "timezone",
    "input",
    "input_function",
    "catch_up",
    "catch_up_limit",
)
#: changing one of these makes the next fire time be computed again (set to NULL)
TIMING_COLUMNS = frozenset({"cron", "timezone"})

_EXISTS = text(
    f"SELECT to_regclass('{PGFLOW_SA_SCHEMA}.schedules') IS NOT NULL "
    f"AND to_regclass('{PGFLOW_SA_SCHEMA}.schedule_runs') IS NOT NULL"
)


class SchedulesMissingError(PgflowSaError):
    """This database has no pgflow_sa.schedules table: run `pgflow-sa install` (or an
    Alembic migration with the UpgradePgflowOp autogenerate writes) to add it. Where
    another tool installed pgflow, pgflow-sa adds nothing to the database by itself:
    create the tables with the SQL of pgflow_sa/schema/sql/schedules.sql."""


def exists_statement() -> Executable:
    return _EXISTS


def read_statement(
    *, flow_slugs: Sequence[str] | None = None, names: Sequence[str] | None = None
) -> Executable:
    """Every column of the stored schedules, by name."""
    query = select(s).order_by(s.c.name)
    if flow_slugs is not None:
        query = query.where(s.c.flow_slug.in_(list(flow_slugs)))
    if names is not None:
        query = query.where(s.c.name.in_(list(names)))
    return query


def poll_statement(flow_slugs: Sequence[str], names: Sequence[str]) -> Executable:
    """What a worker's scheduler reads each time it looks: the database's clock and
    the timing of the schedules its code declares (one small query)."""
    return select(
        func.clock_timestamp().label("now"), s.c.name, s.c.next_fire_at, s.c.paused
    ).where(s.c.flow_slug.in_(list(flow_slugs)), s.c.name.in_(list(names)))


def lock_due_statement(name: str, now: datetime) -> Executable:
    """The schedule's row when it is due at ``now`` and no other worker is firing it
    (SKIP LOCKED: a racing worker moves on; once the first commits, the row is no
    longer due)."""
    return (
        select(s)
        .where(s.c.name == name, s.c.paused.is_(False), s.c.next_fire_at <= now)
        .with_for_update(skip_locked=True)
    )


def lock_statement(name: str) -> Executable:
    return select(s).where(s.c.name == name).with_for_update()


def claim_tick_statement(
    name: str, tick: datetime | None, flow_slug: str, run_id: uuid.UUID, *, manual: bool = False
) -> Executable:
    """Record that ``tick`` of ``name`` starts ``run_id``; returns a row only for the
    first claim of that tick (the primary key is the once-per-tick guarantee). A
    manual trigger (``tick`` None) takes the transaction's time."""
    return (
        insert(runs)
        .values(
            schedule_name=name,
            # clock_timestamp(): two triggers in one transaction are two ticks
            tick=func.clock_timestamp() if tick is None else tick,
            flow_slug=flow_slug,
            run_id=run_id,
            manual=manual,
        )
        .on_conflict_do_nothing(index_elements=["schedule_name", "tick"])
        .returning(runs.c.tick)
    )


def record_failure_statement(name: str, tick: datetime, error: str) -> Executable:
    """A tick whose run could not start keeps its claim (it is not retried), with why."""
    return (
        runs.update()
        .where(runs.c.schedule_name == name, runs.c.tick == tick)
        .values(run_id=None, error=error)
    )


def fired_statement(name: str, next_fire_at: datetime | None, last: datetime | None) -> Executable:
    values: dict[str, Any] = {"next_fire_at": next_fire_at}
    if last is not None:
        values["last_fired_tick"] = last
    return s.update().where(s.c.name == name).values(values)


def set_next_statement(name: str, next_fire_at: datetime | None) -> Executable:
    """Set a next fire time left NULL (by a create, a cron change or a resume)."""
    return (
        s.update()
        .where(s.c.name == name, s.c.next_fire_at.is_(None))
        .values(next_fire_at=next_fire_at)
    )


def set_paused_statement(name: str, paused: bool) -> Executable:
    """Pause or resume a schedule that is not so already (no row returned otherwise:
    a resume of an active schedule keeps its next fire time, and so its catch-up
    backlog). A resume sets the next fire time to NULL, so ticks passed while paused
    are not caught up."""
    values: dict[str, Any] = {"paused": paused, "updated_at": func.now()}
    if not paused:
        values["next_fire_at"] = None
    return (
        s.update()
        .where(s.c.name == name, s.c.paused.is_(not paused))
        .values(values)
        .returning(s.c.name)
    )


def exists_one_statement(name: str) -> Executable:
    return select(s.c.name).where(s.c.name == name)


def recent_runs_statement(name: str, limit: int) -> Executable:
    return (
        select(runs).where(runs.c.schedule_name == name).order_by(runs.c.tick.desc()).limit(limit)
    )


def recent_ticks_statement(per_schedule: int) -> Executable:
    """The latest ``per_schedule`` ticks of every schedule, by schedule name and
    newest first: one query, each schedule's ticks read backwards on the primary
    key (schedule_name, tick), however many ticks are kept."""
    latest = (
        select(runs)
        .where(runs.c.schedule_name == s.c.name)
        .order_by(runs.c.tick.desc())
        .limit(per_schedule)
        .lateral("latest")
    )
    return (
        select(latest)
        .select_from(s.join(latest, true()))
        .order_by(latest.c.schedule_name, latest.c.tick.desc())
    )


# --- sync: the stored schedules of some flows follow the code --------------------------


@dataclass
class ScheduleChange:
    """A stored schedule whose definition differs from the code."""

    name: str
    changes: dict[str, Any]  # column -> value in code
    previous: dict[str, Any]  # column -> value stored


@dataclass
class ScheduleDiff:
    """What syncing the stored schedules of some flows with the code would do."""

    added: list[dict[str, Any]] = field(default_factory=list)  # stored() of each
    changed: list[ScheduleChange] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)  # the stored definition
    unchanged: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def definition_of(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored row's definition (``name`` and :data:`DEFINITION_COLUMNS`)."""
    return {"name": row["name"], **{c: row[c] for c in DEFINITION_COLUMNS}}


def diff_schedules(
    code: Iterable[Mapping[str, Any]], stored: Iterable[Mapping[Any, Any]]
) -> ScheduleDiff:
    """Compare definitions in code (``Schedule.stored()``) with stored ones (rows of
    the schedules of the same flows)."""
    diff = ScheduleDiff()
    stored_by_name = {row["name"]: definition_of(row) for row in stored}
    for wanted in code:
        found = stored_by_name.pop(wanted["name"], None)
        if found is None:
            diff.added.append(dict(wanted))
            continue
        changed = {c: wanted[c] for c in DEFINITION_COLUMNS if wanted[c] != found[c]}
        if changed:
            previous = {c: found[c] for c in changed}
            diff.changed.append(ScheduleChange(wanted["name"], changed, previous))
        else:
            diff.unchanged.append(wanted["name"])
    diff.removed.extend(stored_by_name.values())
    return diff


def owner_advice(name: str, owner: str, flow_slug: str) -> str:
    """Why a schedule of ``flow_slug`` named ``name`` is refused, and what to do."""
    return (
        f"schedule {name!r} belongs to flow {owner!r}, not {flow_slug!r} (schedule names "
        "are unique in a database): rename this one (flow.schedule(..., name=...)), or "
        f"drop the other one first (deploy the app of {owner!r} without it, or an Alembic "
        "DropScheduleOp)"
    )


def owner_conflicts(conn: Connection, code: Iterable[Mapping[str, Any]]) -> list[str]:
    """Why each schedule in ``code`` (``Schedule.stored()``) whose name another flow's
    stored schedule has is refused (a sync must not take it over)."""
    wanted = {d["name"]: d["flow_slug"] for d in code}
    if not wanted:
        return []
    rows = conn.execute(read_statement(names=list(wanted))).mappings()
    return [
        owner_advice(r["name"], r["flow_slug"], wanted[r["name"]])
        for r in rows
        if r["flow_slug"] != wanted[r["name"]]
    ]


def read_definitions(conn: Connection, flow_slugs: Sequence[str]) -> list[dict[str, Any]]:
    rows = conn.execute(read_statement(flow_slugs=flow_slugs)).mappings().all()
    return [definition_of(row) for row in rows]


def schedules_installed(conn: Connection) -> bool:
    return bool(conn.execute(_EXISTS).scalar())


def apply_diff(conn: Connection, diff: ScheduleDiff) -> None:
    """Apply a :class:`ScheduleDiff` in the connection's transaction."""
    from .installer import run_script

    for sql in diff_sql(diff):
        run_script(conn, sql)


def diff_sql(diff: ScheduleDiff) -> list[str]:
    return (
        [create_schedule_sql(d) for d in diff.added]
        + [alter_schedule_sql(c.name, c.changes) for c in diff.changed]
        + [drop_schedule_sql(d["name"]) for d in diff.removed]
    )


# --- the same as SQL text (no parameters), for Alembic's online and offline modes ------


def _literal(value: Any, column: str) -> str:
    from .installer import sql_literal

    if column == "input":
        return "NULL" if value is None else f"{sql_literal(json.dumps(value))}::jsonb"
    if value is None:
        return "NULL"
    if column == "catch_up_limit":
        return str(int(value))
    return sql_literal(str(value))


def create_schedule_sql(definition: Mapping[str, Any]) -> str:
    """Insert a schedule (its next fire time is left to the first worker that looks);
    an existing one of the same name and flow takes the definition; one of another
    flow makes it raise (a DO block: also in Alembic's offline SQL)."""
    from .installer import sql_literal

    columns = ["name", *DEFINITION_COLUMNS]
    values = ", ".join(_literal(definition[c], c) for c in columns)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in DEFINITION_COLUMNS)
    table = f"{PGFLOW_SA_SCHEMA}.schedules"
    message = sql_literal(
        owner_advice(definition["name"], "%", definition["flow_slug"])
        .replace("%", "%%")
        .replace("'%%'", "%")
    )
    body = f"""
DECLARE
  owner text;
BEGIN
  INSERT INTO {table} ({", ".join(columns)}) VALUES ({values})
  ON CONFLICT (name) DO UPDATE SET {updates}, next_fire_at = NULL, updated_at = now()
  WHERE {table}.flow_slug = EXCLUDED.flow_slug;
  IF NOT FOUND THEN
    SELECT flow_slug INTO owner FROM {table} WHERE name = {_literal(definition["name"], "name")};
    RAISE EXCEPTION {message}, quote_literal(owner), quote_literal(owner);
  END IF;
END
"""
    return f"DO {dollar_quoted(body)};"


def dollar_quoted(body: str) -> str:
    """``body`` in dollar quotes whose tag does not occur in it (a schedule's input or
    name may hold any text, ``$pgflow_sa$`` included)."""
    tag, n = "$pgflow_sa$", 0
    while tag in body:
        n += 1
        tag = f"$pgflow_sa_{n}$"
    return f"{tag}{body}{tag}"


def alter_schedule_sql(name: str, changes: Mapping[str, Any]) -> str:
    sets = [f"{c} = {_literal(v, c)}" for c, v in changes.items() if c in DEFINITION_COLUMNS]
    if TIMING_COLUMNS & set(changes):
        sets.append("next_fire_at = NULL")
    sets.append("updated_at = now()")
    return (
        f"UPDATE {PGFLOW_SA_SCHEMA}.schedules SET {', '.join(sets)} "
        f"WHERE name = {_literal(name, 'name')};"
    )


def drop_schedule_sql(name: str) -> str:
    """Delete a schedule; the runs it started and their records stay."""
    return f"DELETE FROM {PGFLOW_SA_SCHEMA}.schedules WHERE name = {_literal(name, 'name')};"


__all__ = [
    "DEFINITION_COLUMNS",
    "ScheduleChange",
    "ScheduleDiff",
    "SchedulesMissingError",
    "alter_schedule_sql",
    "apply_diff",
    "create_schedule_sql",
    "diff_schedules",
    "diff_sql",
    "drop_schedule_sql",
]
