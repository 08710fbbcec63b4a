"""Engines for pgflow-sa's own connections, and translation of driver errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
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
    return create_engine(to_sqlalchemy_url(url, "psycopg"), poolclass=NullPool)


@contextmanager
def database_errors(url: str | URL | None, error: type[PgflowSaError]) -> Iterator[None]:
    """Turn driver errors into pgflow-sa errors: connection problems into
    DatabaseUnavailableError, anything else the database refused into ``error``.
    This is the one place where driver errors are translated."""
    try:
        yield
    except (OperationalError, InterfaceError, OSError) as exc:
        # asyncpg lets socket errors (e.g. connection refused) through as OSError
        raise DatabaseUnavailableError(_unavailable(url, exc)) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:  # SQLAlchemy recognised a lost connection
            raise DatabaseUnavailableError(_unavailable(url, exc)) from exc
        raise error(first_line(exc)) from exc


def _unavailable(url: str | URL | None, exc: BaseException) -> str:
    where = f"the database at {mask_password(url)}" if url is not None else "the database"
    return f"cannot use {where}: {first_line(exc)}"
