"""Start flows inside the caller's transaction and read runs back.

::

    with Session(engine) as session, session.begin():
        session.add(Order(...))
        run = start_flow(session, order_flow, {"order_id": 7})
    # committed: the run, its step states and its first queue messages exist;
    # rolled back: none of them do.

Nothing here commits or rolls back on the caller's behalf.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from ._db import first_line, translated, translated_async
from .dsl import Flow
from .exceptions import FlowNotFoundError, InvalidInputError, PgflowSaError, deploy_advice
from .models import (
    FlowStatus,
    Run,
    RunPage,
    RunStatus,
    StepState,
    StepStatus,
    StepTask,
    TaskStatus,
)
from .schema import functions as fn
from .schema import queries
from .schema.functions import AsyncExecutor, SyncExecutor


def _run(row: Any, created: bool = True, steps: tuple[StepState, ...] | None = None) -> Run:
    cancelled_at = getattr(row, "cancelled_at", None)
    error = getattr(row, "error", None)
    if cancelled_at is not None and error is None:
        reason = getattr(row, "cancel_reason", None)
        error = f"Cancelled: {reason}" if reason else "Cancelled"
    return Run(
        run_id=row.run_id,
        flow_slug=row.flow_slug,
        status=RunStatus.CANCELLED if cancelled_at is not None else RunStatus(row.status),
        input=row.input,
        output=row.output,
        remaining_steps=row.remaining_steps,
        started_at=row.started_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        error=error,
        steps=steps,
        created=created,
        cancelled_at=cancelled_at,
        cancel_reason=getattr(row, "cancel_reason", None),
        retry_of=getattr(row, "retry_of", None),
    )


def _steps(state_rows: Sequence[Row[Any]], task_rows: Sequence[Row[Any]]) -> tuple[StepState, ...]:
    tasks: dict[str, list[StepTask]] = {}
    for t in task_rows:
        tasks.setdefault(t.step_slug, []).append(
            StepTask(
                task_index=t.task_index,
                status=TaskStatus(t.status),
                attempts_count=t.attempts_count,
                output=t.output,
                error_message=t.error_message,
                message_id=t.message_id,
                last_worker_id=t.last_worker_id,
                queued_at=t.queued_at,
                started_at=t.started_at,
                completed_at=t.completed_at,
                failed_at=t.failed_at,
            )
        )
    result = []
    for s in state_rows:
        own = tasks.get(s.step_slug, [])
        status = StepStatus(s.status)
        output = None
        if status is StepStatus.COMPLETED:
            outputs = [t.output for t in own]
            output = outputs if s.step_type == "map" else (outputs[0] if outputs else None)
        result.append(
            StepState(
                step_slug=s.step_slug,
                step_type=s.step_type,
                step_index=s.step_index,
                status=status,
                remaining_deps=s.remaining_deps,
                remaining_tasks=s.remaining_tasks,
                initial_tasks=s.initial_tasks,
                error_message=s.error_message,
                created_at=s.created_at,
                started_at=s.started_at,
                completed_at=s.completed_at,
                failed_at=s.failed_at,
                attempts=max((t.attempts_count for t in own), default=0),
                output=output,
                tasks=tuple(own),
            )
        )
    return tuple(result)


def _prepare(
    flow: Flow | str, input: Any, run_id: uuid.UUID | str | None
) -> tuple[str, Any, uuid.UUID | None]:
    """Validate everything that can be checked without the database."""
    if isinstance(flow, Flow):
        slug, value = flow.slug, flow.validate_input(input)
    elif isinstance(flow, str):
        slug, value = flow, Flow.check_json(flow, input)
    else:
        raise InvalidInputError(f"start_flow takes a Flow or a flow slug, not {flow!r}")
    return slug, value, None if run_id is None else parse_run_id(run_id)


def _not_found(slug: str) -> FlowNotFoundError:
    return FlowNotFoundError(f"flow {slug!r} is not in this database: {deploy_advice([slug])}")


def _translate(exc: DBAPIError, slug: str) -> PgflowSaError:
    return InvalidInputError(f"pgflow refused to start flow {slug!r}: {first_line(exc)}")


@translated
def start_flow(
    conn: SyncExecutor, flow: Flow | str, input: Any, *, run_id: uuid.UUID | str | None = None
) -> Run:
    """Start a run in the transaction of ``conn`` (a Connection or Session).

    The input is checked first (JSON, the flow's declared input type, an array
    for root-map flows), then the flow's presence in the database; neither check
    touches the caller's transaction state. With ``run_id`` the start is
    idempotent: a second start returns the existing run with ``created=False``.
    """
    slug, value, rid = _prepare(flow, input, run_id)
    if conn.execute(queries.flow_exists(slug)).first() is None:
        raise _not_found(slug)
    if rid is not None:
        existing = conn.execute(queries.run_by_id(rid)).first()
        if existing is not None:
            return _run(existing, created=False)
    try:
        with conn.begin_nested():
            row = fn.start_flow(slug, value, rid).one(conn)
    except IntegrityError:
        if rid is None:
            raise
        existing = conn.execute(queries.run_by_id(rid)).first()
        if existing is None:
            raise
        return _run(existing, created=False)
    except DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            raise  # a lost connection, not a refusal: translated by @translated
        raise _translate(exc, slug) from exc
    return _run(row)


@translated_async
async def start_flow_async(
    conn: AsyncExecutor, flow: Flow | str, input: Any, *, run_id: uuid.UUID | str | None = None
) -> Run:
    """:func:`start_flow` for an AsyncConnection or AsyncSession."""
    slug, value, rid = _prepare(flow, input, run_id)
    if (await conn.execute(queries.flow_exists(slug))).first() is None:
        raise _not_found(slug)
    if rid is not None:
        existing = (await conn.execute(queries.run_by_id(rid))).first()
        if existing is not None:
            return _run(existing, created=False)
    try:
        async with conn.begin_nested():
            row = await fn.start_flow(slug, value, rid).one_async(conn)
    except IntegrityError:
        if rid is None:
            raise
        existing = (await conn.execute(queries.run_by_id(rid))).first()
        if existing is None:
            raise
        return _run(existing, created=False)
    except DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            raise  # a lost connection, not a refusal: translated by @translated
        raise _translate(exc, slug) from exc
    return _run(row)


def _prepare_many(flow: Flow | str, inputs: Iterable[Any]) -> tuple[str, list[Any]]:
    if isinstance(inputs, (str, bytes, dict)):
        raise InvalidInputError(
            "start_flows takes a list of inputs (one run each), not a single "
            f"{type(inputs).__name__}: use start_flow for one run"
        )
    prepared = [_prepare(flow, value, None) for value in inputs]
    slug = flow.slug if isinstance(flow, Flow) else str(flow)
    return slug, [value for _, value, _ in prepared]


@translated
def start_flows(conn: SyncExecutor, flow: Flow | str, inputs: Iterable[Any]) -> list[Run]:
    """Start one run per input in the transaction of ``conn``, in one statement (one
    round trip however many). Every input is checked as :func:`start_flow` checks
    it before anything is sent; the runs come back in input order. All of them start
    or, when pgflow refuses one, none (the caller's transaction stays usable)."""
    slug, values = _prepare_many(flow, inputs)
    if not values:
        return []
    if conn.execute(queries.flow_exists(slug)).first() is None:
        raise _not_found(slug)
    try:
        with conn.begin_nested():
            rows = conn.execute(queries.start_flows(slug, values)).all()
    except DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            raise  # a lost connection, not a refusal: translated by @translated
        raise _translate(exc, slug) from exc
    return [_run(row) for row in rows]


@translated_async
async def start_flows_async(
    conn: AsyncExecutor, flow: Flow | str, inputs: Iterable[Any]
) -> list[Run]:
    """:func:`start_flows` for an AsyncConnection or AsyncSession."""
    slug, values = _prepare_many(flow, inputs)
    if not values:
        return []
    if (await conn.execute(queries.flow_exists(slug))).first() is None:
        raise _not_found(slug)
    try:
        async with conn.begin_nested():
            rows = (await conn.execute(queries.start_flows(slug, values))).all()
    except DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            raise  # a lost connection, not a refusal: translated by @translated
        raise _translate(exc, slug) from exc
    return [_run(row) for row in rows]


def parse_run_id(run_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(run_id, uuid.UUID):
        return run_id
    try:
        return uuid.UUID(str(run_id))
    except ValueError:
        raise InvalidInputError(f"run_id must be a UUID, not {run_id!r}") from None


@translated
def get_run(conn: SyncExecutor, run_id: uuid.UUID | str, *, steps: bool = True) -> Run | None:
    """The run with its step states and tasks (``steps=False``: the run alone), or None
    when there is no such run."""
    rid = parse_run_id(run_id)
    row = conn.execute(queries.run_by_id(rid)).first()
    if row is None:
        return None
    if not steps:
        return _run(row)
    states = conn.execute(queries.run_step_states(rid)).all()
    tasks = conn.execute(queries.run_tasks(rid)).all()
    return _run(row, steps=_steps(states, tasks))


@translated_async
async def get_run_async(
    conn: AsyncExecutor, run_id: uuid.UUID | str, *, steps: bool = True
) -> Run | None:
    """:func:`get_run` for an AsyncConnection or AsyncSession."""
    rid = parse_run_id(run_id)
    row = (await conn.execute(queries.run_by_id(rid))).first()
    if row is None:
        return None
    if not steps:
        return _run(row)
    states = (await conn.execute(queries.run_step_states(rid))).all()
    tasks = (await conn.execute(queries.run_tasks(rid))).all()
    return _run(row, steps=_steps(states, tasks))


MAX_PAGE_SIZE = 1000


def _page_query(
    flow: Flow | str | None,
    status: RunStatus | str | None,
    started_after: datetime | None,
    started_before: datetime | None,
    after: str | None,
    limit: int,
    retry_of: uuid.UUID | str | None = None,
) -> Any:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE_SIZE}, not {limit}")
    cursor = None
    if after is not None:
        try:
            stamp, _, rid = after.partition("|")
            moment = datetime.fromisoformat(stamp)
            if moment.tzinfo is not None:
                moment.astimezone(timezone.utc)  # out of the database's range: refused here
            cursor = (moment, uuid.UUID(rid))
        except (ValueError, OverflowError):
            raise InvalidInputError(
                f"after must be a next_cursor from a previous page, not {after!r}"
            ) from None
    try:
        status_value = RunStatus(status).value if status is not None else None
    except ValueError:
        raise InvalidInputError(
            f"status must be one of {', '.join(s.value for s in RunStatus)}, not {status!r}"
        ) from None
    return queries.runs_page(
        flow_slug=flow.slug if isinstance(flow, Flow) else flow,
        status=status_value,
        started_after=started_after,
        started_before=started_before,
        after=cursor,
        limit=limit + 1,
        retry_of=None if retry_of is None else parse_run_id(retry_of),
    )


def _page(rows: Sequence[Row[Any]], limit: int) -> RunPage:
    runs = tuple(_run(r) for r in rows[:limit])
    next_cursor = None
    if len(rows) > limit:
        last = runs[-1]
        next_cursor = f"{last.started_at.isoformat()}|{last.run_id}"
    return RunPage(runs=runs, next_cursor=next_cursor)


@translated
def list_runs(
    conn: SyncExecutor,
    *,
    flow: Flow | str | None = None,
    status: RunStatus | str | None = None,
    started_after: datetime | None = None,
    started_before: datetime | None = None,
    after: str | None = None,
    limit: int = 50,
    retry_of: uuid.UUID | str | None = None,
) -> RunPage:
    """Runs, newest first, filtered by flow, status, start time and the run they
    retry (``retry_of``); ``after`` is the ``next_cursor`` of the previous page."""
    query = _page_query(flow, status, started_after, started_before, after, limit, retry_of)
    return _page(conn.execute(query).all(), limit)


@translated_async
async def list_runs_async(
    conn: AsyncExecutor,
    *,
    flow: Flow | str | None = None,
    status: RunStatus | str | None = None,
    started_after: datetime | None = None,
    started_before: datetime | None = None,
    after: str | None = None,
    limit: int = 50,
    retry_of: uuid.UUID | str | None = None,
) -> RunPage:
    """:func:`list_runs` for an AsyncConnection or AsyncSession."""
    query = _page_query(flow, status, started_after, started_before, after, limit, retry_of)
    return _page((await conn.execute(query)).all(), limit)


def _status_query(window_seconds: int, live_seconds: int) -> Any:
    if window_seconds <= 0 or live_seconds <= 0:
        raise ValueError("window_seconds and live_seconds must be positive")
    return queries.flow_status(window_seconds, live_seconds)


@translated
def flow_status(
    conn: SyncExecutor, *, window_seconds: int = 3600, live_seconds: int = 30
) -> list[FlowStatus]:
    """Every flow's queue length, runs in progress, runs completed and failed in the
    last ``window_seconds``, and workers whose heartbeat is under ``live_seconds`` old."""
    rows = conn.execute(_status_query(window_seconds, live_seconds)).all()
    return [FlowStatus.model_validate(dict(row._mapping)) for row in rows]


@translated_async
async def flow_status_async(
    conn: AsyncExecutor, *, window_seconds: int = 3600, live_seconds: int = 30
) -> list[FlowStatus]:
    """:func:`flow_status` for an AsyncConnection or AsyncSession."""
    rows = (await conn.execute(_status_query(window_seconds, live_seconds))).all()
    return [FlowStatus.model_validate(dict(row._mapping)) for row in rows]
