"""Database errors are classified by SQLSTATE in one place (pgflow_sa._db.classify),
including through SQLAlchemy's wrappers of asyncpg and psycopg errors."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from pgflow_sa._db import ErrorKind, caused_by_lost_connection, classify


class _DriverError(Exception):
    """Stands for a PostgreSQL driver's error (psycopg's and asyncpg's carry sqlstate)."""

    __module__ = "psycopg.errors"

    def __init__(self, sqlstate: str | None, message: str = "boom") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _wrapped(sqlstate: str | None, message: str = "boom") -> DBAPIError:
    return DBAPIError("SELECT 1", None, _DriverError(sqlstate, message))


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("08006", ErrorKind.CONNECTION),
        ("08001", ErrorKind.CONNECTION),
        ("57P01", ErrorKind.CONNECTION),  # admin shutdown (pg_terminate_backend)
        ("57P02", ErrorKind.CONNECTION),
        ("57P03", ErrorKind.CONNECTION),  # cannot connect now (starting or stopping)
        ("40001", ErrorKind.CONFLICT),
        ("40P01", ErrorKind.CONFLICT),
        ("55P03", ErrorKind.CONFLICT),
        ("57014", ErrorKind.CONFLICT),
        ("53300", ErrorKind.CONFLICT),
        ("53200", ErrorKind.CONFLICT),
        ("23505", ErrorKind.REFUSED),
        ("22P05", ErrorKind.REFUSED),
        ("42P01", ErrorKind.REFUSED),
        ("P0001", ErrorKind.REFUSED),
    ],
)
def test_sqlstates(code: str, kind: ErrorKind) -> None:
    assert classify(_wrapped(code)) is kind
    assert classify(_wrapped(code)).transient is (kind is not ErrorKind.REFUSED)


def test_start_tasks_timestamp_race_is_retried_at_once() -> None:
    race = _wrapped(
        "23514",
        'new row for relation "step_tasks" violates check constraint '
        '"started_at_is_after_queued_at"',
    )
    assert classify(race) is ErrorKind.RACE
    assert classify(_wrapped("23514", 'violates check constraint "other"')) is ErrorKind.REFUSED


def test_errors_without_sqlstate() -> None:
    assert classify(OSError("connection refused")) is ErrorKind.CONNECTION
    assert classify(ConnectionResetError()) is ErrorKind.CONNECTION
    assert classify(OperationalError("x", None, _DriverError(None))) is ErrorKind.CONNECTION
    assert classify(InterfaceError("x", None, _DriverError(None))) is ErrorKind.CONNECTION
    invalidated = DBAPIError("x", None, _DriverError(None), connection_invalidated=True)
    assert classify(invalidated) is ErrorKind.CONNECTION
    assert classify(DBAPIError("x", None, _DriverError(None))) is ErrorKind.REFUSED
    assert classify(ValueError("not a database error")) is ErrorKind.REFUSED


def test_lost_connection_through_causes() -> None:
    outer = RuntimeError("the handler's own wrapper")
    outer.__cause__ = _wrapped("57P01")
    assert caused_by_lost_connection(outer)
    implicit = RuntimeError("raised while handling it")
    implicit.__context__ = _wrapped("08006")
    assert caused_by_lost_connection(implicit)
    # a handler's own socket error (say, an HTTP call) is its failure, not ours, and
    # so is another database's error
    assert not caused_by_lost_connection(ConnectionError("upstream hiccup"))
    sqlite = OperationalError("SELECT 1", None, sqlite3.OperationalError("no such table: x"))
    assert not caused_by_lost_connection(sqlite)
    assert not caused_by_lost_connection(_wrapped("55P03"))


async def test_real_driver_errors_carry_their_sqlstate(db_url: str) -> None:
    """A statement timeout raised by the server, through both drivers."""
    sync_engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with sync_engine.connect() as conn:
            conn.execute(text("SET statement_timeout = '50ms'"))
            with pytest.raises(DBAPIError) as caught:
                conn.execute(text("SELECT pg_sleep(1)"))
        assert isinstance(caught.value.orig, psycopg.Error)
        assert classify(caught.value) is ErrorKind.CONFLICT
    finally:
        sync_engine.dispose()
    async_engine = create_async_engine(db_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with async_engine.connect() as aconn:
            await aconn.execute(text("SET statement_timeout = '50ms'"))
            with pytest.raises(DBAPIError) as caught_async:
                await aconn.execute(text("SELECT pg_sleep(1)"))
        assert classify(caught_async.value) is ErrorKind.CONFLICT
        async with async_engine.connect() as aconn:
            pid = (await aconn.execute(text("SELECT pg_backend_pid()"))).scalar()
            async with async_engine.connect() as killer:
                await killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            with pytest.raises(DBAPIError) as lost:
                await aconn.execute(text("SELECT 1"))
            await aconn.invalidate()
        assert classify(lost.value) is ErrorKind.CONNECTION
    finally:
        await async_engine.dispose()


def test_every_error_is_exported_from_the_package() -> None:
    """``from pgflow_sa import XError`` works for every error a pgflow_sa function
    raises (the dashboard's own is exported by pgflow_sa.dashboard)."""
    import inspect

    import pgflow_sa
    from pgflow_sa import exceptions

    errors = {
        name
        for name, value in vars(exceptions).items()
        if inspect.isclass(value) and issubclass(value, exceptions.PgflowSaError)
    }
    missing = sorted(errors - set(pgflow_sa.__all__) - {"DashboardUnavailableError"})
    assert missing == []
    assert all(
        getattr(pgflow_sa, name) is getattr(exceptions, name)
        for name in errors - {"DashboardUnavailableError"}
    )
