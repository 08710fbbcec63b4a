"""Test databases: a server (PGFLOW_SA_TEST_DATABASE_URL or the embedded one), a
template database with pgflow installed once per session, and a fresh clone of
it per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from pgflow_sa.config import to_sqlalchemy_url
from pgflow_sa.embedded import EmbeddedServer
from pgflow_sa.schema import install_schema

TEST_URL_ENV = "PGFLOW_SA_TEST_DATABASE_URL"
ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database, in libpq form."""
    parsed = make_url(url).set(database=database, drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _libpq(url: str) -> str:
    return to_sqlalchemy_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the maintenance database of the test server."""
    configured = os.environ.get(TEST_URL_ENV, "").strip()
    if configured:
        yield _libpq(configured)
        return
    server = EmbeddedServer(tmp_path_factory.mktemp("embedded-pg"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def server_kind(server_url: str) -> str:
    """'extension' when the server offers the pgmq extension, else 'sql-only'."""
    with psycopg.connect(server_url) as conn:
        row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'").fetchone()
    return "extension" if row else "sql-only"


class DatabaseFactory:
    """Creates databases on the test server and drops them at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    def create(self, template: str | None = None, prefix: str = "pgflow_sa_t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(query)
        self.created.append(name)
        return with_database(self.server_url, name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in reversed(self.created):
            self.drop(with_database(self.server_url, name))


@pytest.fixture(scope="session")
def databases(server_url: str) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(server_url)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def template_db(databases: DatabaseFactory) -> str:
    """Name of a session-wide database with the pgflow schema installed."""
    url = databases.create(prefix="pgflow_sa_tpl")
    install_schema(url)
    name = make_url(url).database
    assert name is not None
    return name


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
