"""Database URLs: plain libpq URLs and SQLAlchemy URLs, from flags, env or config."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .exceptions import ConfigurationError

DATABASE_URL_ENV = "PGFLOW_SA_DATABASE_URL"
DATA_DIR_ENV = "PGFLOW_SA_DATA_DIR"
PYPROJECT_TABLE = "pgflow-sa"

Driver = Literal["psycopg", "asyncpg"]

_POSTGRES_SCHEMES = {"postgres", "postgresql"}
_EXAMPLE = "postgresql://user:password@host:5432/dbname"


def to_sqlalchemy_url(url: str | URL, driver: Driver = "psycopg") -> URL:
    """Turn a libpq URL (``postgresql://...``) or any PostgreSQL SQLAlchemy URL into
    a SQLAlchemy URL using ``driver``."""
    if isinstance(url, URL):
        parsed = url
    else:
        text = url.strip()
        if "://" not in text:
            raise ConfigurationError(
                f"invalid database URL {text!r}: expected a URL such as {_EXAMPLE}"
            )
        try:
            parsed = make_url(text)
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(
                f"invalid database URL {mask_password(text)!r}: {exc}; expected e.g. {_EXAMPLE}"
            ) from None
    backend = parsed.get_backend_name()
    if backend not in _POSTGRES_SCHEMES:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: pgflow-sa needs "
            f"PostgreSQL, e.g. {_EXAMPLE}"
        )
    query = dict(parsed.query)
    if driver == "asyncpg" and "sslmode" in query:
        # asyncpg spells libpq's sslmode as ssl
        query["ssl"] = query.pop("sslmode")
    elif driver == "psycopg" and "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")
    return parsed.set(drivername=f"postgresql+{driver}", query=query)


def to_libpq_url(url: str | URL) -> str:
    """The same database as a plain libpq URL (for psql, node, ...)."""
    parsed = to_sqlalchemy_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def mask_password(url: str | URL) -> str:
    """A URL fit for printing: the password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable URL>"
    if not parsed.password:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, sep, hostpart = rest.rpartition("@")
    if not sep:
        return parsed.render_as_string(hide_password=True)
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


@dataclass(frozen=True)
class ResolvedUrl:
    """A database URL and where it came from (``flag``, ``env``, ``pyproject``)."""

    url: str
    source: str


def _pyproject_url(start: Path) -> str | None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = tomllib.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"cannot read {candidate}: {exc}") from None
            table = data.get("tool", {}).get(PYPROJECT_TABLE, {})
            value = table.get("database-url")
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    f"{candidate}: [tool.{PYPROJECT_TABLE}] database-url must be a string"
                )
            return value
    return None


def resolve_database_url(
    explicit: str | None = None, cwd: Path | None = None
) -> ResolvedUrl | None:
    """The configured database URL: the explicit value, else ``PGFLOW_SA_DATABASE_URL``,
    else ``database-url`` in ``[tool.pgflow-sa]`` of the nearest pyproject.toml.
    None means nothing is configured (the CLI then uses the embedded server)."""
    if explicit:
        return ResolvedUrl(explicit, "flag")
    from_env = os.environ.get(DATABASE_URL_ENV, "").strip()
    if from_env:
        return ResolvedUrl(from_env, "env")
    from_file = _pyproject_url((cwd or Path.cwd()).resolve())
    if from_file:
        return ResolvedUrl(from_file, "pyproject")
    return None


def default_data_dir(cwd: Path | None = None) -> Path:
    """Where the embedded server keeps its files: ``PGFLOW_SA_DATA_DIR``, else
    ``.pgflow_sa/`` in the current project."""
    configured = os.environ.get(DATA_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    return (cwd or Path.cwd()).resolve() / ".pgflow_sa"


def get_database_url(explicit: str | None = None) -> str:
    """The database to use, as the CLI picks it: ``explicit``, else
    ``PGFLOW_SA_DATABASE_URL``, else ``[tool.pgflow-sa] database-url``, else the
    embedded server (started if it is not running; files in :func:`default_data_dir`)."""
    resolved = resolve_database_url(explicit)
    return resolved.url if resolved is not None else embedded_database_url()


def embedded_database_url() -> str:
    """The URL of the embedded server in :func:`default_data_dir`, starting it if it
    is not running."""
    from .embedded import EmbeddedServer

    return EmbeddedServer(default_data_dir()).start()
