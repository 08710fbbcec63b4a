"""The worker's protocol statements (claims and settles), run straight on the asyncpg
connection of a pooled SQLAlchemy connection.

Each statement of :mod:`~pgflow_sa.schema.worker_queries` is compiled once, by
SQLAlchemy's asyncpg dialect: the SQL text, and the conversions SQLAlchemy applies to
its parameters and result columns. asyncpg's statement cache then prepares it once
per connection. What this spares is SQLAlchemy's work around each execution (a
Connection, its transaction, the execution context, the result): about a millisecond
of the worker's CPU per statement, on a path that runs twice per task. Everything
else the worker does goes through SQLAlchemy.

Connections come from the worker's SQLAlchemy pool, so its size, recycling and
closing of idle connections hold as for any other. Behind a pooler in transaction
mode (no statement cache: asyncpg prepares and executes in two exchanges) each
statement runs in a transaction, which keeps both on one server connection. asyncpg's
own errors come out as SQLAlchemy would raise them (:func:`pgflow_sa._db.from_driver`),
so they are classified alike; a connection that broke or that a cancellation left
mid-statement is discarded, not returned to the pool.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.util import greenlet_spawn

from .._db import from_driver
from ..pooler import transaction_pooling
from ..schema.worker_queries import Query


@dataclass(frozen=True)
class _Compiled:
    sql: str
    #: parameter names in $1, $2, ... order, with SQLAlchemy's conversion of each value
    params: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    #: result columns, with SQLAlchemy's conversion of each value
    results: tuple[Callable[[Any], Any] | None, ...]
    row: Callable[..., Any]


class DirectStatements:
    """Runs constant worker statements (``conn.execute(*query)`` in SQLAlchemy terms)
    over ``engine``'s pool, each returning its rows (attributes named as its columns)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pooled = transaction_pooling()
        self._compiled: dict[int, tuple[Executable, _Compiled]] = {}

    async def rows(self, query: Query, *, after: Query | None = None) -> list[Any]:
        """The rows of ``query``; with ``after``, that statement runs first, in one
        transaction with it (e.g. a transaction-level lock)."""
        statement, _ = query
        compiled = self._compile(statement)
        first = None if after is None else self._arguments(after)
        records = await self._fetch(compiled.sql, self._arguments(query)[1], first)
        converts = compiled.results
        if not any(converts):
            return [compiled.row(*record) for record in records]
        return [
            compiled.row(*(v if c is None else c(v) for v, c in zip(record, converts, strict=True)))
            for record in records
        ]

    def _arguments(self, query: Query) -> tuple[str, list[Any]]:
        statement, values = query
        compiled = self._compile(statement)
        args = [
            values[name] if convert is None else convert(values[name])
            for name, convert in compiled.params
        ]
        return compiled.sql, args

    def _compile(self, statement: Executable) -> _Compiled:
        # worker statements are constants (module level, or one per flow): by identity
        cached = self._compiled.get(id(statement))
        if cached is not None and cached[0] is statement:
            return cached[1]
        dialect = self._engine.dialect
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        params = tuple(
            (
                name,
                compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name in compiled.positiontup or ()
        )
        columns: Sequence[Any] = getattr(statement, "selected_columns", ())
        results = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        )
        row = collections.namedtuple("Row", [column.name for column in columns])  # type: ignore[misc]
        made = _Compiled(compiled.string, params, results, row)
        self._compiled[id(statement)] = (statement, made)
        return made

    async def _fetch(
        self, sql: str, args: list[Any], first: tuple[str, list[Any]] | None = None
    ) -> list[Any]:
        pooled = await self._engine.raw_connection()
        driver = pooled.driver_connection
        assert driver is not None
        try:
            if self._pooled or first is not None:
                async with driver.transaction():
                    if first is not None:
                        await driver.fetch(first[0], *first[1])
                    return list(await driver.fetch(sql, *args))
            return list(await driver.fetch(sql, *args))
        except Exception as exc:
            lost = bool(driver.is_closed())
            if lost:
                pooled.invalidate(exc)
            translated = from_driver(exc, sql, connection_lost=lost)
            if translated is exc:
                raise
            raise translated from exc
        except BaseException:
            # cancelled mid-statement: what the connection is in the middle of is
            # unknown, so it is closed (at once, without a round trip)
            pooled.invalidate()
            raise
        finally:
            if pooled.is_valid:
                # returning it may close it (beyond the pool's size): that awaits
                await greenlet_spawn(pooled.close)
