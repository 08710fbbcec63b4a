"""pytest plugin (loaded automatically where pgflow-sa is installed).

Override ``pgflow_flows`` in your conftest.py to return your flows::

    @pytest.fixture(scope="session")
    def pgflow_flows():
        return myapp.flows.registry

Fixtures:

- ``pgflow_database_url`` — a fresh database per test with pgmq, pgflow and your
  flows, cloned from a template built once per session, on
  ``PGFLOW_SA_TEST_DATABASE_URL`` or else an embedded PostgreSQL;
- ``pgflow_engine`` — an AsyncEngine (asyncpg) on that database;
- ``pgflow_worker`` — a :class:`~pgflow_sa.worker.Worker` for your flows running on
  the test's event loop (needs pytest-asyncio). It fires no cron schedule, unless the
  test is marked ``@pytest.mark.pgflow_schedules``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from ..config import async_engine_from_url, to_sqlalchemy_url
from ..embedded import EmbeddedServer
from ..registry import FlowRegistry
from ..schema import install_schema
from ..schema.deploy import deploy_flows

TEST_URL_ENV = "PGFLOW_SA_TEST_DATABASE_URL"


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Make the project importable before conftest.py files are, as ``python -m pytest``
    (the folder it runs in) and pytest's ``pythonpath`` option (the rootdir) do: a
    ``tests/conftest.py`` that imports the project's flows then works with plain
    ``pytest``. Appended, so nothing installed is shadowed."""
    for folder in (early_config.invocation_params.dir, early_config.rootpath):
        path = str(folder)
        if path not in sys.path:
            sys.path.append(path)


SCHEDULES_MARKER = "pgflow_schedules"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{SCHEDULES_MARKER}: the pgflow_worker fixture fires the flows' cron schedules "
        "(without it, it fires none)",
    )


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database, in libpq form."""
    return (
        make_url(url)
        .set(database=database, drivername="postgresql")
        .render_as_string(hide_password=False)
    )


class DatabaseFactory:
    """Creates databases on a test server and drops them again."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    def _admin(self, statement: Any) -> None:
        import psycopg

        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(statement)

    def create(self, template: str | None = None, prefix: str = "pgflow_sa_t") -> str:
        from psycopg import sql

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        self._admin(statement)
        self.created.append(name)
        return with_database(self.server_url, name)

    def create_template(self, flows: Any = ()) -> str:
        """A database with pgmq, pgflow and ``flows`` installed, to clone with
        ``create(template=name)``; returns its name."""
        url = self.create(prefix="pgflow_sa_tpl")
        install_schema(url)
        deploy_flows(url, flows)
        name = make_url(url).database
        assert name is not None
        return name

    def drop(self, url: str) -> None:
        from psycopg import sql

        name = make_url(url).database
        assert name is not None
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in reversed(list(self.created)):
            self.drop(with_database(self.server_url, name))


@contextmanager
def database_server_for_tests() -> Iterator[str]:
    """The maintenance URL of the server tests use: ``PGFLOW_SA_TEST_DATABASE_URL``
    (libpq form), else an embedded server started for the duration.

    The embedded server lives in a temporary folder of its own, not under pytest's
    basetemp: every pytest run makes ``/tmp/pytest-of-<user>`` private again, which
    would cut a server started as root (it runs as another user) off from its files
    as soon as another pytest process starts."""
    configured = os.environ.get(TEST_URL_ENV, "").strip()
    if configured:
        libpq = to_sqlalchemy_url(configured).set(drivername="postgresql")
        yield libpq.render_as_string(hide_password=False)
        return
    folder = Path(tempfile.mkdtemp(prefix="pgflow-sa-test-server-"))
    server = EmbeddedServer(folder)
    try:
        yield server.start()
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pgflow_flows() -> FlowRegistry:
    """Your flows: override this fixture in conftest.py."""
    raise pytest.UsageError(
        "override the pgflow_flows fixture in your conftest.py to return your flows "
        "(a FlowRegistry, a Flow or a list of Flows)"
    )


@pytest.fixture(scope="session")
def pgflow_databases() -> Iterator[DatabaseFactory]:
    with database_server_for_tests() as url:
        factory = DatabaseFactory(url)
        yield factory
        factory.drop_all()


@pytest.fixture(scope="session")
def pgflow_template(pgflow_databases: DatabaseFactory, pgflow_flows: Any) -> str:
    """Name of the session's template database: pgflow installed, your flows created."""
    return pgflow_databases.create_template(pgflow_flows)


@pytest.fixture
def pgflow_database_url(pgflow_databases: DatabaseFactory, pgflow_template: str) -> Iterator[str]:
    url = pgflow_databases.create(template=pgflow_template)
    yield url
    pgflow_databases.drop(url)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixtures need pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def pgflow_engine(pgflow_database_url: str) -> AsyncIterator[Any]:
        engine = async_engine_from_url(pgflow_database_url)
        yield engine
        await engine.dispose()

    @pytest_asyncio.fixture
    async def pgflow_worker(
        request: pytest.FixtureRequest, pgflow_engine: Any, pgflow_flows: Any
    ) -> AsyncIterator[Any]:
        import asyncio

        from ..worker import Worker, WorkerSettings

        # a schedule firing in the middle of a test would start runs it did not ask for
        fire_schedules = request.node.get_closest_marker(SCHEDULES_MARKER) is not None
        worker = Worker(
            pgflow_flows,
            engine=pgflow_engine,
            settings=WorkerSettings(
                poll_interval=0.2,
                fallback_poll_interval=0.02,
                shutdown_timeout=5,
                fire_schedules=fire_schedules,
            ),
        )
        task = asyncio.create_task(worker.run())
        while worker.ready is None or not worker.ready.is_set():
            if task.done():
                await task
            await asyncio.sleep(0.01)
        yield worker
        worker.stop()
        await asyncio.wait_for(task, 30)
