"""Engines for pgflow-sa's own connections, and translation of driver errors."""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ParamSpec, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from .config import mask_password, to_sqlalchemy_url
from .exceptions import DatabaseUnavailableError, PgflowSaError


def first_line(exc: BaseException) -> str:
    """The first meaningful line of a driver error (no SQL, no traceback)."""
    orig = getattr(exc, "orig", None) or exc
    for line in str(orig).splitlines():
        if line.strip():
            return line.strip()
    return type(orig).__name__


def sync_engine(url: str | URL | Engine) -> Engine:
    """A psycopg engine for a URL (an Engine is returned as it is)."""
    if isinstance(url, Engine):
        return url
    from .pooler import psycopg_connect_args

    return create_engine(
        to_sqlalchemy_url(url, "psycopg"), poolclass=NullPool, connect_args=psycopg_connect_args()
    )


class ErrorKind(enum.Enum):
    """What a database error means for whoever retries (see :func:`classify`)."""

    #: the connection was lost or could not be made, or the server is starting or
    #: stopping: retry with backoff once it is back; the work in hand stays valid
    CONNECTION = "connection"
    #: a conflict with other transactions or a lack of resources (lock or statement
    #: timeout, serialization failure, deadlock, out of memory/disk/connections):
    #: retry with backoff
    CONFLICT = "conflict"
    #: pgflow's start_tasks stamps started_at with the transaction's start, which can
    #: precede the queued_at of a task committed while the statement ran: retry at once
    RACE = "race"
    #: the database refused the statement itself: retrying cannot help
    REFUSED = "refused"

    @property
    def transient(self) -> bool:
        return self is not ErrorKind.REFUSED


#: what a driver can raise: its errors wrapped by SQLAlchemy, socket errors asyncpg lets
#: through, and what SQLAlchemy 2.0 lets through unwrapped when asyncpg connects (2.1
#: wraps them): asyncpg's own errors (too many connections, cannot connect now) and its
#: timeout, an asyncio.TimeoutError that on Python 3.10 is not an OSError
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    DBAPIError,
    OSError,
    asyncpg.PostgresError,
    asyncio.TimeoutError,
)
#: what a database call can raise: the driver's errors, and a connection pool that had
#: no connection in time
DB_ERRORS: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, PoolTimeoutError)

_CONNECTION_STATES = ("57P01", "57P02", "57P03")
_CONFLICT_STATES = ("40001", "40P01", "55P03", "57014")
_START_RACE = "started_at_is_after_queued_at"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, through SQLAlchemy's wrapper (asyncpg's adapted
    errors and psycopg's both carry ``sqlstate``)."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


def classify(exc: BaseException) -> ErrorKind:
    """The one place that decides whether a database error is worth retrying: by
    SQLSTATE first (asyncpg's "cannot connect now" reaches SQLAlchemy as a plain
    DBAPIError), then by what the driver says about the connection."""
    code = sqlstate(exc)
    if code is not None:
        if code.startswith("08") or code in _CONNECTION_STATES:
            return ErrorKind.CONNECTION
        if code in _CONFLICT_STATES or code.startswith("53"):
            return ErrorKind.CONFLICT
        if code == "23514" and _START_RACE in str(getattr(exc, "orig", None) or exc):
            return ErrorKind.RACE
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return ErrorKind.CONNECTION
        return ErrorKind.REFUSED
    if isinstance(exc, PoolTimeoutError):  # every pooled connection is busy
        return ErrorKind.CONFLICT
    if isinstance(
        exc, (OperationalError, InterfaceError, OSError, ConnectionError, asyncio.TimeoutError)
    ):
        # asyncpg lets socket errors (e.g. connection refused) and timeouts through
        return ErrorKind.CONNECTION
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return ErrorKind.CONNECTION
    return ErrorKind.REFUSED


def from_driver(exc: Exception, statement: str, *, connection_lost: bool) -> Exception:
    """An error asyncpg raised for a statement run straight on its connection (see
    :mod:`pgflow_sa.worker.direct`), as SQLAlchemy raises asyncpg's errors: its
    interface errors as InterfaceError, its other errors as DBAPIError (``orig`` is
    asyncpg's, with its ``sqlstate``), both ``connection_invalidated`` when the
    connection is closed; anything else (socket errors, timeouts) as it is. So
    :func:`classify` reads them as it reads SQLAlchemy's."""
    if isinstance(exc, asyncpg.InterfaceError):
        return InterfaceError(statement, None, exc, connection_invalidated=connection_lost)
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InternalClientError)):
        return DBAPIError(statement, None, exc, connection_invalidated=connection_lost)
    return exc


def caused_by_lost_connection(exc: BaseException) -> bool:
    """Whether an exception (say, a handler's) comes from a lost or unreachable
    database connection, looking through its causes. Only SQLAlchemy's database
    errors count: a handler's own socket errors (an HTTP call) are its failures."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if (
            isinstance(current, DBAPIError)
            and _from_postgres(current)
            and classify(current) is ErrorKind.CONNECTION
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def _from_postgres(exc: DBAPIError) -> bool:
    """Raised by a PostgreSQL driver (another database's errors say nothing of ours)."""
    module = type(exc.orig).__module__
    return module.startswith(("psycopg", "asyncpg", "sqlalchemy.dialects.postgresql"))


@contextmanager
def database_errors(url: str | URL | None, error: type[PgflowSaError]) -> Iterator[None]:
    """Turn driver errors into pgflow-sa errors: connection problems into
    DatabaseUnavailableError, anything else the database refused into ``error``.
    This is the one place where driver errors are translated."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        if classify(exc) is ErrorKind.CONNECTION:
            raise DatabaseUnavailableError(_unavailable(url, exc)) from exc
        if sqlstate(exc) == UNDEFINED_TABLE and "pgflow_sa." in first_line(exc):
            raise error(_our_tables_missing(exc)) from exc
        raise error(first_line(exc)) from exc


#: SQLSTATE of a relation that does not exist
UNDEFINED_TABLE = "42P01"


P = ParamSpec("P")
R = TypeVar("R")


def translated(func: Callable[P, R]) -> Callable[P, R]:
    """Driver errors become pgflow-sa errors (see :func:`database_errors`)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with database_errors(None, PgflowSaError):
            return func(*args, **kwargs)

    return wrapper


def translated_async(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """:func:`translated` for coroutines."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with database_errors(None, PgflowSaError):
            return await func(*args, **kwargs)

    return wrapper


def _our_tables_missing(exc: BaseException) -> str:
    return (
        f"{first_line(exc)}: pgflow-sa's own tables are missing from this database (it "
        "was installed by an older pgflow-sa): run `pgflow-sa install`, or apply an Alembic "
        "migration that installs them; where another tool installed pgflow, create them "
        "from pgflow_sa/schema/sql/schedules.sql and run_control.sql"
    )


def _unavailable(url: str | URL | None, exc: BaseException) -> str:
    where = f"the database at {mask_password(url)}" if url is not None else "the database"
    return f"cannot use {where}: {first_line(exc)}"


#: closes of connections whose user was cancelled (a task is kept until it is done)
_CLOSING: set[asyncio.Future[Any]] = set()


def _close_in_background(conn: AsyncConnection) -> asyncio.Future[None]:
    closing = asyncio.ensure_future(conn.close())
    _CLOSING.add(closing)
    closing.add_done_callback(_CLOSING.discard)
    return closing


def _close_checked_out(checkout: asyncio.Future[AsyncConnection]) -> None:
    if not checkout.cancelled() and checkout.exception() is None:
        _close_in_background(checkout.result())


@asynccontextmanager
async def uncut_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """``engine.connect()`` for reads that a deadline or a stop may cancel: the checkout
    is never cut off half way (a cancellation then, inside the pool or the driver, can
    leave the connection to the garbage collector, which can only terminate it and
    warns); a caller cancelled meanwhile leaves it to finish, and what it got is closed
    at once. The close on the way out is shielded too."""
    checkout = asyncio.ensure_future(engine.connect().start())
    try:
        conn = await asyncio.shield(checkout)
    except asyncio.CancelledError:
        checkout.add_done_callback(_close_checked_out)
        raise
    try:
        yield conn
    finally:
        await asyncio.shield(_close_in_background(conn))
