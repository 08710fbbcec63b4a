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

import enum
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError

from ._db import first_line
from .dsl import Flow
from .exceptions import FlowNotFoundError, InvalidInputError, PgflowSaError
from .schema import functions as fn
from .schema import tables
from .schema.functions import AsyncExecutor, SyncExecutor
from .schema.rows import RunRow


class RunStatus(str, enum.Enum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class Run(BaseModel):
    """A flow run. ``created`` is False when a start with an existing ``run_id``
    found the run already there (idempotent start)."""

    model_config = ConfigDict(frozen=True)

    run_id: uuid.UUID
    flow_slug: str
    status: RunStatus
    input: Any
    output: Any = None
    remaining_steps: int
    started_at: datetime
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    created: bool = True

    @classmethod
    def from_row(cls, row: Any, created: bool = True) -> Run:
        return cls(
            run_id=row.run_id,
            flow_slug=row.flow_slug,
            status=RunStatus(row.status),
            input=row.input,
            output=row.output,
            remaining_steps=row.remaining_steps,
            started_at=row.started_at,
            completed_at=row.completed_at,
            failed_at=row.failed_at,
            created=created,
        )


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
    if run_id is not None and not isinstance(run_id, uuid.UUID):
        try:
            run_id = uuid.UUID(str(run_id))
        except ValueError:
            raise InvalidInputError(f"run_id must be a UUID, not {run_id!r}") from None
    return slug, value, run_id


def _not_found(slug: str) -> FlowNotFoundError:
    return FlowNotFoundError(
        f"flow {slug!r} is not in this database: create it with the SQL that "
        f"`pgflow-sa compile APP {slug}` prints (for example "
        f'`pgflow-sa compile APP {slug} | psql "$DATABASE_URL"`), or with an Alembic migration'
    )


def _run_query(run_id: uuid.UUID) -> Any:
    return select(tables.runs).where(tables.runs.c.run_id == run_id)


def _flow_exists(slug: str) -> Any:
    return select(tables.flows.c.flow_slug).where(tables.flows.c.flow_slug == slug)


def _translate(exc: DBAPIError, slug: str) -> PgflowSaError:
    return InvalidInputError(f"pgflow refused to start flow {slug!r}: {first_line(exc)}")


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
    if conn.execute(_flow_exists(slug)).first() is None:
        raise _not_found(slug)
    if rid is not None:
        existing = conn.execute(_run_query(rid)).first()
        if existing is not None:
            return Run.from_row(existing, created=False)
    try:
        with conn.begin_nested():
            row: RunRow = fn.start_flow(slug, value, rid).one(conn)
    except IntegrityError:
        if rid is None:
            raise
        existing = conn.execute(_run_query(rid)).first()
        if existing is None:
            raise
        return Run.from_row(existing, created=False)
    except DBAPIError as exc:
        raise _translate(exc, slug) from exc
    return Run.from_row(row)


async def start_flow_async(
    conn: AsyncExecutor, flow: Flow | str, input: Any, *, run_id: uuid.UUID | str | None = None
) -> Run:
    """:func:`start_flow` for an AsyncConnection or AsyncSession."""
    slug, value, rid = _prepare(flow, input, run_id)
    if (await conn.execute(_flow_exists(slug))).first() is None:
        raise _not_found(slug)
    if rid is not None:
        existing = (await conn.execute(_run_query(rid))).first()
        if existing is not None:
            return Run.from_row(existing, created=False)
    try:
        async with conn.begin_nested():
            row: RunRow = await fn.start_flow(slug, value, rid).one_async(conn)
    except IntegrityError:
        if rid is None:
            raise
        existing = (await conn.execute(_run_query(rid))).first()
        if existing is None:
            raise
        return Run.from_row(existing, created=False)
    except DBAPIError as exc:
        raise _translate(exc, slug) from exc
    return Run.from_row(row)


def get_run(conn: SyncExecutor, run_id: uuid.UUID | str) -> Run | None:
    """The run, or None when there is no such run."""
    row = conn.execute(_run_query(uuid.UUID(str(run_id)))).first()
    return None if row is None else Run.from_row(row)


async def get_run_async(conn: AsyncExecutor, run_id: uuid.UUID | str) -> Run | None:
    """:func:`get_run` for an AsyncConnection or AsyncSession."""
    row = (await conn.execute(_run_query(uuid.UUID(str(run_id))))).first()
    return None if row is None else Run.from_row(row)
