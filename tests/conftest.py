"""Test databases: a server (PGFLOW_SA_TEST_DATABASE_URL or the embedded one), a
template database with pgflow installed once per session, and a fresh clone of
it per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from pgflow_sa import async_engine_from_url
from pgflow_sa.testing.plugin import DatabaseFactory, database_server_for_tests

TEST_URL_ENV = "PGFLOW_SA_TEST_DATABASE_URL"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of the maintenance database of the test server."""
    with database_server_for_tests() as url:
        yield url


@pytest.fixture(scope="session")
def server_kind(server_url: str) -> str:
    """'extension' when the server offers the pgmq extension, else 'sql-only'."""
    with psycopg.connect(server_url) as conn:
        row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'").fetchone()
    return "extension" if row else "sql-only"


@pytest.fixture(scope="session")
def databases(server_url: str) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(server_url)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def template_db(databases: DatabaseFactory) -> str:
    """Name of a session-wide database with the pgflow schema installed."""
    return databases.create_template()


@pytest.fixture
def db_url(databases: DatabaseFactory, template_db: str) -> Iterator[str]:
    """A fresh database with pgflow installed, cloned from the template (libpq URL)."""
    url = databases.create(template=template_db)
    yield url
    databases.drop(url)


@pytest.fixture
def empty_db_url(databases: DatabaseFactory) -> Iterator[str]:
    """A fresh database with nothing installed (libpq URL)."""
    url = databases.create()
    yield url
    databases.drop(url)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An AsyncEngine (asyncpg) on ``db_url``, disposed after the test (modules that
    need another one define their own)."""
    engine = async_engine_from_url(db_url)
    yield engine
    await engine.dispose()
