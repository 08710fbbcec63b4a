"""Typed wrappers for the pgflow SQL functions and the pgmq functions a worker uses.

Each wrapper builds a :class:`Call`: a SQLAlchemy statement plus the conversion
of its rows into typed values. Run it on any connection or session, sync or
async, inside the caller's transaction::

    runs = fn.start_flow("my_flow", {"x": 1}).all(session)
    tasks = await fn.start_tasks("my_flow", [1, 2], worker_id).all_async(conn)

The statement itself (``call.statement``) composes like any other SQLAlchemy
construct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    Integer,
    Numeric,
    Result,
    Table,
    Text,
    bindparam,
    column,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, Executable
from sqlalchemy.sql.functions import Function
from sqlalchemy.types import DateTime, TypeEngine

from . import tables
from .names import PGFLOW_SCHEMA, PGMQ_SCHEMA
from .rows import (
    FlowRow,
    MessageRecord,
    QueueMetrics,
    RunRow,
    StepRow,
    StepTaskRecord,
    StepTaskRow,
    from_mapping,
)

T = TypeVar("T")
SyncExecutor = Connection | Session
AsyncExecutor = AsyncConnection | AsyncSession


class Call(Generic[T]):
    """A typed call of a SQL function: ``statement`` and how to read its rows."""

    __slots__ = ("convert", "statement")

    def __init__(self, statement: Executable, convert: Callable[[Row[Any]], T]) -> None:
        self.statement = statement
        self.convert = convert

    def _read(self, result: Result[Any]) -> list[T]:
        return [self.convert(row) for row in result]

    def all(self, conn: SyncExecutor) -> list[T]:
        return self._read(conn.execute(self.statement))

    def one(self, conn: SyncExecutor) -> T:
        return self.convert(conn.execute(self.statement).one())

    async def all_async(self, conn: AsyncExecutor) -> list[T]:
        return self._read(await conn.execute(self.statement))

    async def one_async(self, conn: AsyncExecutor) -> T:
        return self.convert((await conn.execute(self.statement)).one())


def _fn(schema: str, name: str, *args: Any, type_: TypeEngine[Any] | None = None) -> Function[Any]:
    generator = getattr(getattr(func, schema), name)
    result: Function[Any] = generator(*args, type_=type_) if type_ is not None else generator(*args)
    return result


def _param(value: Any, type_: TypeEngine[Any]) -> ColumnElement[Any]:
    return bindparam(None, value, type_=type_)


def _json(value: Any) -> ColumnElement[Any]:
    # none_as_null=False: Python None becomes JSON null, never SQL NULL
    return _param(value, JSONB(none_as_null=False))


def _text(value: str) -> ColumnElement[Any]:
    return _param(value, Text())


def _int(value: int | None) -> ColumnElement[Any]:
    return _param(value, Integer())


def _uuid(value: UUID | str | None) -> ColumnElement[Any]:
    if isinstance(value, str):
        value = UUID(value)
    return _param(value, PG_UUID(as_uuid=True))


def _bigints(values: Sequence[int]) -> ColumnElement[Any]:
    return _param(list(values), ARRAY(BigInteger()))


def _ints(values: Sequence[int]) -> ColumnElement[Any]:
    return _param(list(values), ARRAY(Integer()))


def _rows_of(fn: Function[Any], table: Table, row_type: type[T]) -> Call[T]:
    """A function returning rows of a pgflow table."""
    return _record_rows(fn, {c.name: c.type for c in table.columns}, row_type)


def _record_rows(
    fn: Function[Any], columns: dict[str, TypeEngine[Any]], row_type: type[T]
) -> Call[T]:
    tv = fn.table_valued(*[column(name, type_) for name, type_ in columns.items()])
    return Call(select(tv), lambda row: from_mapping(row_type, row._mapping))


def _scalar(fn: Function[Any]) -> Call[Any]:
    return Call(select(fn), lambda row: row[0])


def _scalars(fn: Function[Any]) -> Call[Any]:
    """A set-returning function of a scalar type (the function's ``type_``)."""
    return Call(select(fn.column_valued()), lambda row: row[0])


_TS: TypeEngine[Any] = DateTime(timezone=True)
_STEP_TASK_RECORD: dict[str, TypeEngine[Any]] = {
    "flow_slug": Text(),
    "run_id": PG_UUID(as_uuid=True),
    "step_slug": Text(),
    "input": JSONB(),
    "msg_id": BigInteger(),
    "task_index": Integer(),
}
_MESSAGE_RECORD: dict[str, TypeEngine[Any]] = {
    "msg_id": BigInteger(),
    "read_ct": Integer(),
    "enqueued_at": _TS,
    "last_read_at": _TS,
    "vt": _TS,
    "message": JSONB(),
    "headers": JSONB(),
}
_SET_VT_BATCH_RESULT: dict[str, TypeEngine[Any]] = {
    k: v for k, v in _MESSAGE_RECORD.items() if k != "last_read_at"
}


# --- pgflow: definitions -----------------------------------------------------


#: pgflow.create_flow's own defaults (0.8.1), used for options left as None.
CREATE_FLOW_DEFAULTS = {"max_attempts": 3, "base_delay": 5, "timeout": 60}


def create_flow(
    flow_slug: str,
    max_attempts: int | None = None,
    base_delay: int | None = None,
    timeout: int | None = None,
) -> Call[FlowRow]:
    """``pgflow.create_flow``: the flow row (existing or new). Options left None take
    pgflow's defaults (:data:`CREATE_FLOW_DEFAULTS`)."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "create_flow",
        _text(flow_slug),
        _int(CREATE_FLOW_DEFAULTS["max_attempts"] if max_attempts is None else max_attempts),
        _int(CREATE_FLOW_DEFAULTS["base_delay"] if base_delay is None else base_delay),
        _int(CREATE_FLOW_DEFAULTS["timeout"] if timeout is None else timeout),
    )
    return _rows_of(fn, tables.flows, FlowRow)


def add_step(
    flow_slug: str,
    step_slug: str,
    deps_slugs: Sequence[str] = (),
    max_attempts: int | None = None,
    base_delay: int | None = None,
    timeout: int | None = None,
    start_delay: int | None = None,
    step_type: str = "single",
) -> Call[StepRow]:
    """``pgflow.add_step``: the step row (existing or new)."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "add_step",
        _text(flow_slug),
        _text(step_slug),
        _param(list(deps_slugs), ARRAY(Text())),
        _int(max_attempts),
        _int(base_delay),
        _int(timeout),
        _int(start_delay),
        _text(step_type),
    )
    return _rows_of(fn, tables.steps, StepRow)


def is_valid_slug(slug: str) -> Call[bool]:
    """``pgflow.is_valid_slug``."""
    return _scalar(_fn(PGFLOW_SCHEMA, "is_valid_slug", _text(slug), type_=Boolean()))


# --- pgflow: runs ------------------------------------------------------------


def start_flow(flow_slug: str, input: Any, run_id: UUID | str | None = None) -> Call[RunRow]:
    """``pgflow.start_flow``: the new run."""
    fn = _fn(PGFLOW_SCHEMA, "start_flow", _text(flow_slug), _json(input), _uuid(run_id))
    return _rows_of(fn, tables.runs, RunRow)


def start_flow_with_states(
    flow_slug: str, input: Any, run_id: UUID | str | None = None
) -> Call[dict[str, Any]]:
    """``pgflow.start_flow_with_states``: ``{"run": {...}, "steps": [...]}``."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "start_flow_with_states",
        _text(flow_slug),
        _json(input),
        _uuid(run_id),
        type_=JSONB(),
    )
    return _scalar(fn)


def get_run_with_states(run_id: UUID | str) -> Call[dict[str, Any] | None]:
    """``pgflow.get_run_with_states``: ``{"run": {...}, "steps": [...]}``, None for an unknown run."""
    return _scalar(_fn(PGFLOW_SCHEMA, "get_run_with_states", _uuid(run_id), type_=JSONB()))


def start_ready_steps(run_id: UUID | str) -> Call[None]:
    """``pgflow.start_ready_steps`` (internal to pgflow; exposed for completeness)."""
    return _scalar(_fn(PGFLOW_SCHEMA, "start_ready_steps", _uuid(run_id)))


def maybe_complete_run(run_id: UUID | str) -> Call[None]:
    """``pgflow.maybe_complete_run`` (internal to pgflow; exposed for completeness)."""
    return _scalar(_fn(PGFLOW_SCHEMA, "maybe_complete_run", _uuid(run_id)))


def cascade_complete_taskless_steps(run_id: UUID | str) -> Call[int]:
    """``pgflow.cascade_complete_taskless_steps``: how many steps it completed."""
    return _scalar(
        _fn(PGFLOW_SCHEMA, "cascade_complete_taskless_steps", _uuid(run_id), type_=Integer())
    )


def calculate_retry_delay(base_delay: int | float, attempts_count: int) -> Call[int]:
    """``pgflow.calculate_retry_delay``: ``floor(base_delay * 2 ^ attempts_count)``."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "calculate_retry_delay",
        _param(base_delay, Numeric()),
        _int(attempts_count),
        type_=Integer(),
    )
    return _scalar(fn)


# --- pgflow: worker protocol -------------------------------------------------


def start_tasks(
    flow_slug: str, msg_ids: Sequence[int], worker_id: UUID | str
) -> Call[StepTaskRecord]:
    """``pgflow.start_tasks``: claim the queued tasks behind these messages."""
    fn = _fn(PGFLOW_SCHEMA, "start_tasks", _text(flow_slug), _bigints(msg_ids), _uuid(worker_id))
    return _record_rows(fn, _STEP_TASK_RECORD, StepTaskRecord)


def complete_task(
    run_id: UUID | str, step_slug: str, task_index: int, output: Any
) -> Call[StepTaskRow]:
    """``pgflow.complete_task``: stores ``output`` (any JSON value, falsy ones included)."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "complete_task",
        _uuid(run_id),
        _text(step_slug),
        _int(task_index),
        _json(output),
    )
    return _rows_of(fn, tables.step_tasks, StepTaskRow)


def fail_task(
    run_id: UUID | str, step_slug: str, task_index: int, error_message: str
) -> Call[StepTaskRow]:
    """``pgflow.fail_task``: re-queues with backoff, or fails the step and run."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "fail_task",
        _uuid(run_id),
        _text(step_slug),
        _int(task_index),
        _text(error_message),
    )
    return _rows_of(fn, tables.step_tasks, StepTaskRow)


def set_vt_batch(
    queue_name: str, msg_ids: Sequence[int], vt_offsets: Sequence[int]
) -> Call[MessageRecord]:
    """``pgflow.set_vt_batch``: per-message visibility timeouts (seconds from now)."""
    fn = _fn(PGFLOW_SCHEMA, "set_vt_batch", _text(queue_name), _bigints(msg_ids), _ints(vt_offsets))
    return _record_rows(fn, _SET_VT_BATCH_RESULT, MessageRecord)


def poll_for_tasks(
    queue_name: str, vt: int, qty: int, max_poll_seconds: int = 5, poll_interval_ms: int = 100
) -> Call[StepTaskRecord]:
    """``pgflow.poll_for_tasks``: deprecated upstream, returns no rows in 0.8.1."""
    fn = _fn(
        PGFLOW_SCHEMA,
        "poll_for_tasks",
        _text(queue_name),
        _int(vt),
        _int(qty),
        _int(max_poll_seconds),
        _int(poll_interval_ms),
    )
    return _record_rows(fn, _STEP_TASK_RECORD, StepTaskRecord)


# --- pgmq ----------------------------------------------------------------------


def pgmq_read(queue_name: str, vt: int, qty: int) -> Call[MessageRecord]:
    """``pgmq.read``: up to ``qty`` visible messages, hidden for ``vt`` seconds."""
    fn = _fn(PGMQ_SCHEMA, "read", _text(queue_name), _int(vt), _int(qty))
    return _record_rows(fn, _MESSAGE_RECORD, MessageRecord)


def pgmq_read_with_poll(
    queue_name: str, vt: int, qty: int, max_poll_seconds: int = 5, poll_interval_ms: int = 100
) -> Call[MessageRecord]:
    """``pgmq.read_with_poll``: like read, waiting up to ``max_poll_seconds`` for messages."""
    fn = _fn(
        PGMQ_SCHEMA,
        "read_with_poll",
        _text(queue_name),
        _int(vt),
        _int(qty),
        _int(max_poll_seconds),
        _int(poll_interval_ms),
    )
    return _record_rows(fn, _MESSAGE_RECORD, MessageRecord)


def pgmq_set_vt(queue_name: str, msg_ids: Sequence[int], vt: int) -> Call[MessageRecord]:
    """``pgmq.set_vt``: make messages visible again ``vt`` seconds from now."""
    fn = _fn(PGMQ_SCHEMA, "set_vt", _text(queue_name), _bigints(msg_ids), _int(vt))
    return _record_rows(fn, _MESSAGE_RECORD, MessageRecord)


def pgmq_delete(queue_name: str, msg_ids: Sequence[int]) -> Call[int]:
    """``pgmq.delete``: the ids of the messages deleted."""
    return _scalars(
        _fn(PGMQ_SCHEMA, "delete", _text(queue_name), _bigints(msg_ids), type_=BigInteger())
    )


def pgmq_archive(queue_name: str, msg_ids: Sequence[int]) -> Call[int]:
    """``pgmq.archive``: the ids of the messages moved to the archive."""
    return _scalars(
        _fn(PGMQ_SCHEMA, "archive", _text(queue_name), _bigints(msg_ids), type_=BigInteger())
    )


def pgmq_send(queue_name: str, message: Any, delay: int = 0) -> Call[int]:
    """``pgmq.send``: the new message id."""
    fn = _fn(
        PGMQ_SCHEMA, "send", _text(queue_name), _json(message), _int(delay), type_=BigInteger()
    )
    return _scalars(fn)


def pgmq_metrics(queue_name: str) -> Call[QueueMetrics]:
    """``pgmq.metrics`` of one queue."""
    fn = _fn(PGMQ_SCHEMA, "metrics", _text(queue_name))
    stmt: Executable = select(literal_column("*")).select_from(fn)
    return Call(stmt, lambda row: from_mapping(QueueMetrics, row._mapping))


def pgmq_create(queue_name: str) -> Call[None]:
    """``pgmq.create``: create a queue (pgflow.create_flow does this for flows)."""
    return _scalar(_fn(PGMQ_SCHEMA, "create", _text(queue_name)))


def pgmq_drop_queue(queue_name: str) -> Call[bool]:
    """``pgmq.drop_queue``."""
    return _scalar(_fn(PGMQ_SCHEMA, "drop_queue", _text(queue_name), type_=Boolean()))


def pgmq_enable_notify_insert(queue_name: str, throttle_interval_ms: int = 0) -> Call[None]:
    """``pgmq.enable_notify_insert`` (pgmq >= 1.7): NOTIFY on every new message."""
    fn = _fn(PGMQ_SCHEMA, "enable_notify_insert", _text(queue_name), _int(throttle_interval_ms))
    return _scalar(fn)


def pgmq_disable_notify_insert(queue_name: str) -> Call[None]:
    """``pgmq.disable_notify_insert``."""
    return _scalar(_fn(PGMQ_SCHEMA, "disable_notify_insert", _text(queue_name)))
