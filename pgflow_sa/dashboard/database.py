"""The dashboard's database: the async engine it reads with."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from .._db import database_errors
from ..config import async_engine_from_url
from ..exceptions import PgflowSaError


class Database:
    """The dashboard's async engine: the one given, or one made (on first use, in the
    serving event loop) from a sync engine's URL or a URL. A made engine pools no
    connections: behind a WSGI adapter no lifespan event would ever close them."""

    def __init__(self, target: AsyncEngine | Engine | str | URL) -> None:
        self._target = target
        self._engine: AsyncEngine | None = target if isinstance(target, AsyncEngine) else None
        self.owned = self._engine is None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            target = self._target
            url = target.url if isinstance(target, Engine) else target
            assert not isinstance(url, AsyncEngine)
            self._engine = async_engine_from_url(url, poolclass=NullPool)
        return self._engine

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection; database errors become pgflow-sa errors (a 503 page)."""
        with database_errors(None, PgflowSaError):
            async with self.engine.connect() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction committed at the end (for actions)."""
        with database_errors(None, PgflowSaError):
            async with self.engine.begin() as conn:
                yield conn

    async def dispose(self) -> None:
        if self.owned and self._engine is not None:
            await self._engine.dispose()
