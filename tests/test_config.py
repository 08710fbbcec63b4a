"""Database URL handling (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgflow_sa import ConfigurationError, to_libpq_url, to_sqlalchemy_url
from pgflow_sa.config import ResolvedUrl, mask_password, resolve_database_url


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


def test_mask_password_keeps_the_rest_verbatim() -> None:
    assert (
        mask_password("postgresql://u:s3cret@h:5/db?host=/x") == "postgresql://u:***@h:5/db?host=/x"
    )
    assert mask_password("postgresql://u@h/db") == "postgresql://u@h/db"


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
