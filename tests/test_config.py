"""Database URL handling (pure functions)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from pgflow_sa import ConfigurationError, Flow, to_libpq_url, to_sqlalchemy_url
from pgflow_sa.config import (
    ResolvedUrl,
    async_engine_from_url,
    mask_password,
    resolve_database_url,
)
from pgflow_sa.worker import Worker, WorkerSettings


@pytest.mark.parametrize(
    ("given", "driver", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "psycopg", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgres://u@h/db", "asyncpg", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "psycopg", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "asyncpg", "postgresql+asyncpg://u@h/db"),
        (
            "postgresql://u@h/db?sslmode=require",
            "asyncpg",
            "postgresql+asyncpg://u@h/db?ssl=require",
        ),
        (
            "postgresql+asyncpg://u@h/db?ssl=require",
            "psycopg",
            "postgresql+psycopg://u@h/db?sslmode=require",
        ),
    ],
)
def test_urls_in_both_forms(given: str, driver: str, expected: str) -> None:
    url = to_sqlalchemy_url(given, driver)  # type: ignore[arg-type]
    assert url.render_as_string(hide_password=False) == expected


def test_socket_url_round_trips_to_libpq() -> None:
    url = "postgresql://postgres:@/postgres?host=/tmp/x/pgdata"
    assert to_libpq_url(url) == "postgresql://postgres:@/postgres?host=%2Ftmp%2Fx%2Fpgdata"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "",
            "invalid database URL '': expected a URL such as postgresql://user:password@host:5432/dbname",
        ),
        ("localhost:5432", "invalid database URL 'localhost:5432': expected a URL such as"),
        ("sqlite:///x.db", "unsupported database URL scheme 'sqlite': pgflow-sa needs PostgreSQL"),
    ],
)
def test_bad_urls(given: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        to_sqlalchemy_url(given)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:s3cret@h:5/db?host=/x", "postgresql://u:***@h:5/db?host=/x"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u:s3cret@h/db?sslmode=require&password=s3cret&port=5",
            "postgresql://u:***@h/db?sslmode=require&password=***&port=5",
        ),
        ("postgresql://u@h/db?sslpassword=s3cret", "postgresql://u@h/db?sslpassword=***"),
        ("postgresql://u@h/db?pass%77ord=s3cret", "postgresql://u@h/db?pass%77ord=***"),
        ("postgresql://:s3cret@h/db", "postgresql://:***@h/db"),
        ("postgresql://u:@/db?host=/tmp/x", "postgresql://u:@/db?host=/tmp/x"),
        # '@', '/' or '?' in an unescaped password: everything up to the host is hidden
        ("postgresql://u:s3@cret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:s3/c?ret@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u:s3cret@h/db?application_name=me@box",
            "postgresql://u:***@h/db?application_name=me@box",
        ),
    ],
)
def test_mask_password_keeps_the_rest_verbatim(given: str, expected: str) -> None:
    assert mask_password(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        make_url("postgresql+asyncpg://u:s3cret@h/db"),
        make_url("postgresql://u@h/db?password=s3cret"),
        make_url("postgresql://u:s3cret@h/db?password=s3cret&sslpassword=s3cret"),
        URL.create("postgresql", "u", "s3cret", "h", query={"password": "s3cret"}),
    ],
)
def test_mask_password_of_url_objects(given: URL) -> None:
    masked = mask_password(given)
    assert "s3cret" not in masked
    assert "***" in masked
    assert masked.startswith("postgresql")


@pytest.mark.parametrize(
    "given",
    [
        "postgresql://u:s3cret@h:notaport/db",
        "postgresql://u@h:notaport/db?password=s3cret",
        "u:s3cret@h:5432/db",
        "postgresql//u:s3cret@h/db",
        "host=h user=u password=s3cret dbname=db",
        "host=h password = 's3 cret' dbname=db",
    ],
)
def test_mask_password_of_unparseable_urls(given: str) -> None:
    masked = mask_password(given)
    assert "s3" not in masked and "cret" not in masked
    assert "***" in masked


@pytest.mark.parametrize(
    "given",
    [
        "host=h user=u password=s3cret",
        "u:s3cret@h:5432/db",
        "postgresql://u:s3cret@h:notaport/db",
        "postgresql://u@h:notaport/db?password=s3cret",
    ],
)
def test_bad_url_errors_hide_the_password(given: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        to_sqlalchemy_url(given)
    assert "invalid database URL" in str(info.value)
    assert "s3cret" not in str(info.value)


# --- libpq parameters and asyncpg -----------------------------------------------------------


@pytest.mark.parametrize(
    "param",
    [
        "application_name=x",
        "fallback_application_name=x",
        "options=-c%20statement_timeout%3D5",
        "connect_timeout=5",
        "sslrootcert=/x/root.crt",
    ],
)
def test_asyncpg_url_refuses_what_needs_connect_args(param: str) -> None:
    name = param.split("=")[0]
    with pytest.raises(ConfigurationError) as info:
        to_sqlalchemy_url(f"postgresql://u:s3cret@h/db?{param}", "asyncpg")
    message = str(info.value)
    assert repr(name) in message
    assert "async_engine_from_url" in message
    assert "s3cret" not in message
    # psycopg (libpq) takes them all as they are
    assert to_sqlalchemy_url(f"postgresql://u@h/db?{param}").query


@pytest.mark.parametrize(
    ("param", "name"),
    [
        ("keepalives_idle=5", "'keepalives_idle'"),
        ("hostaddr=127.0.0.1", "'hostaddr'"),
        ("client_encoding=LATIN1", "'client_encoding'"),
        ("search_path=app", "'search_path'"),
        ("application_name=x&keepalives=1&gssencmode=disable", "'gssencmode', 'keepalives'"),
    ],
)
def test_asyncpg_refuses_what_it_cannot_take(param: str, name: str) -> None:
    for make in (
        lambda url: to_sqlalchemy_url(url, "asyncpg"),
        async_engine_from_url,
    ):
        with pytest.raises(ConfigurationError) as info:
            make(f"postgresql://u@h/db?{param}")
        assert name in str(info.value)


def test_asyncpg_url_keeps_what_asyncpg_takes() -> None:
    url = to_sqlalchemy_url(
        "postgresql://u@h/db?dbname=other&client_encoding=UTF8&sslmode=require"
        "&target_session_attrs=primary&passfile=/p",
        "asyncpg",
    )
    assert url.database == "other"
    assert dict(url.query) == {
        "ssl": "require",
        "target_session_attrs": "primary",
        "passfile": "/p",
    }
    asyncpg_own = "postgresql+asyncpg://u@h/db?command_timeout=5&prepared_statement_cache_size=0"
    assert to_sqlalchemy_url(asyncpg_own, "asyncpg").render_as_string() == asyncpg_own


def test_connect_timeout_must_be_a_number() -> None:
    with pytest.raises(ConfigurationError, match="connect_timeout"):
        async_engine_from_url("postgresql://u@h/db?connect_timeout=soon")


def _with(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _capture_connect_args(engine: AsyncEngine) -> list[dict[str, Any]]:
    """The keyword arguments asyncpg.connect gets, one dict a connection."""
    seen: list[dict[str, Any]] = []

    @sa.event.listens_for(engine.sync_engine, "do_connect")
    def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(dict(cparams))

    return seen


async def _show(engine: AsyncEngine, *settings: str) -> list[str]:
    async with engine.connect() as conn:
        return [(await conn.execute(sa.text(f"SHOW {name}"))).scalar_one() for name in settings]


async def test_application_name_and_options_reach_the_server(server_url: str) -> None:
    url = _with(
        server_url, "application_name=pgflow-sa-test-xyz&options=-c%20statement_timeout%3D1234"
    )
    engine = async_engine_from_url(url)
    try:
        assert await _show(engine, "application_name", "statement_timeout") == [
            "pgflow-sa-test-xyz",
            "1234ms",
        ]
        # the engine's URL keeps them: engines made from it get them too
        assert engine.url.query["application_name"] == "pgflow-sa-test-xyz"
    finally:
        await engine.dispose()


async def test_libpq_parameters_become_asyncpg_arguments(server_url: str) -> None:
    url = _with(
        server_url,
        "fallback_application_name=fallback&connect_timeout=7"
        "&sslmode=disable&sslrootcert=/nonexistent/root.crt",
    )
    engine = async_engine_from_url(
        url, connect_args={"server_settings": {"search_path": "public"}, "timeout": 3}
    )
    seen = _capture_connect_args(engine)
    try:
        assert await _show(engine, "application_name", "search_path") == ["fallback", "public"]
    finally:
        await engine.dispose()
    (args,) = seen
    assert args["timeout"] == 7  # the URL's libpq parameter wins over connect_args
    assert args["server_settings"] == {"search_path": "public", "application_name": "fallback"}
    assert args["dsn"] == "postgresql://?sslrootcert=%2Fnonexistent%2Froot.crt"
    assert args["ssl"] == "disable"
    for libpq_only in ("fallback_application_name", "connect_timeout", "sslrootcert"):
        assert libpq_only not in args


def test_worker_engines_keep_their_settings(server_url: str) -> None:
    flow = Flow("cfg_probe")

    @flow.step
    def only(input: Any) -> None:
        return None

    settings = WorkerSettings(plan_cache_mode="force_custom_plan")
    # the URL's own plan_cache_mode (in options) yields to the worker setting
    options = "options=-c%20plan_cache_mode%3Dforce_generic_plan%20-c%20statement_timeout%3D1234"
    named = Worker(flow, _with(server_url, f"application_name=mine&{options}"), settings=settings)
    unnamed = Worker(flow, server_url, settings=settings)

    async def protocol_pool(worker: Worker) -> list[str]:
        try:
            return await _show(
                worker.engine, "plan_cache_mode", "application_name", "statement_timeout"
            )
        finally:
            await worker.engine.dispose()

    assert asyncio.run(protocol_pool(named)) == ["force_custom_plan", "mine", "1234ms"]
    assert asyncio.run(protocol_pool(unnamed))[:2] == ["force_custom_plan", "pgflow-sa worker"]
    for worker, name in ((named, "mine"), (unnamed, "pgflow-sa worker")):
        with worker.sync_engine.connect() as conn:
            assert conn.execute(sa.text("SHOW application_name")).scalar_one() == name
        worker.sync_engine.dispose()


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pgflow-sa]\ndatabase-url = "postgresql://file/db"\n'
    )
    nested = tmp_path / "pkg"
    nested.mkdir()
    monkeypatch.delenv("PGFLOW_SA_DATABASE_URL", raising=False)
    assert resolve_database_url(None, nested) == ResolvedUrl("postgresql://file/db", "pyproject")
    monkeypatch.setenv("PGFLOW_SA_DATABASE_URL", "postgresql://env/db")
    resolved = resolve_database_url(None, nested)
    assert resolved is not None
    assert (resolved.url, resolved.source) == ("postgresql://env/db", "env")
    flag = resolve_database_url("postgresql://flag/db", nested)
    assert flag is not None
    assert flag.source == "flag"
    monkeypatch.delenv("PGFLOW_SA_DATABASE_URL")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert resolve_database_url(None, nested) is None
