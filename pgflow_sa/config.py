"""Database URLs: plain libpq URLs and SQLAlchemy URLs, from flags, env or config."""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlencode

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .exceptions import ConfigurationError

DATABASE_URL_ENV = "PGFLOW_SA_DATABASE_URL"
DATA_DIR_ENV = "PGFLOW_SA_DATA_DIR"
PYPROJECT_TABLE = "pgflow-sa"

Driver = Literal["psycopg", "asyncpg"]

_POSTGRES_SCHEMES = {"postgres", "postgresql"}
_EXAMPLE = "postgresql://user:password@host:5432/dbname"

#: libpq parameters asyncpg takes under another name or in another form: asyncpg
#: engines from :func:`async_engine_from_url` pass them on as it wants them
_SERVER_SETTINGS = ("application_name", "options")
_SSL_FILES = (
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
)
_TRANSLATED = frozenset(
    {*_SERVER_SETTINGS, "fallback_application_name", "connect_timeout", *_SSL_FILES}
)
#: where each goes, for the message of a URL that cannot carry them
_CONNECT_ARGS_HINT = {
    "application_name": "connect_args={'server_settings': {'application_name': ...}}",
    "fallback_application_name": "connect_args={'server_settings': {'application_name': ...}}",
    "options": "connect_args={'server_settings': {'statement_timeout': ...}}",
    "connect_timeout": "connect_args={'timeout': seconds}",
}
_SSL_HINT = "connect_args={'ssl': ssl.SSLContext(...)} or the PGSSL* environment variables"
_UTF8 = {"utf8", "unicode"}


def to_sqlalchemy_url(url: str | URL, driver: Driver = "psycopg") -> URL:
    """Turn a libpq URL (``postgresql://...``) or any PostgreSQL SQLAlchemy URL into
    a SQLAlchemy URL using ``driver``.

    For asyncpg, libpq's ``sslmode`` becomes ``ssl`` and ``dbname`` the database.
    Parameters asyncpg takes only in ``connect_args`` (``application_name``,
    ``options``, ``connect_timeout``, the SSL files) raise ConfigurationError: make
    such engines with :func:`async_engine_from_url`."""
    return _driver_url(url, driver, translate=False)


def async_engine_from_url(url: str | URL, /, **kwargs: Any) -> AsyncEngine:
    """An asyncpg ``AsyncEngine`` for a libpq URL or a PostgreSQL SQLAlchemy URL;
    ``kwargs`` go to SQLAlchemy's ``create_async_engine``.

    libpq parameters that asyncpg spells otherwise reach it in its own terms:
    ``application_name`` and ``options`` as ``server_settings`` (and
    ``fallback_application_name`` when nothing names the application),
    ``connect_timeout`` as ``timeout``, the SSL files (``sslrootcert``, ``sslcert``,
    ``sslkey``, ...) as asyncpg reads them from a DSN. The URL's parameters win over
    the same settings in ``connect_args``. The engine's ``url`` keeps them, so
    engines made from it (psycopg ones too) get them as well. Parameters asyncpg has
    no equivalent for raise ConfigurationError. With ``PGFLOW_SA_POOLER=transaction``
    the engine keeps no prepared statements (see :mod:`pgflow_sa.pooler`)."""
    from .pooler import asyncpg_connect_args, transaction_pooling

    parsed = _driver_url(url, "asyncpg", translate=True)
    libpq = {key: _last(value) for key, value in parsed.query.items() if key in _TRANSLATED}
    connect_args = dict(kwargs.pop("connect_args", None) or {})
    if transaction_pooling():
        connect_args = {**asyncpg_connect_args(), **connect_args}
    settings = dict(connect_args.get("server_settings") or {})
    for key in _SERVER_SETTINGS:
        if key in libpq:
            settings[key] = libpq[key]
    if "fallback_application_name" in libpq:
        settings.setdefault("application_name", libpq["fallback_application_name"])
    if settings:
        connect_args["server_settings"] = settings
    if "connect_timeout" in libpq:
        connect_args["timeout"] = _connect_timeout(libpq["connect_timeout"])
    ssl_files = {key: libpq[key] for key in _SSL_FILES if key in libpq}
    if ssl_files:
        # asyncpg reads these only from a DSN; its keyword arguments (host, ssl, ...)
        # win over the DSN, so this one carries nothing else
        connect_args["dsn"] = "postgresql://?" + urlencode(ssl_files)
    engine = create_async_engine(parsed, connect_args=connect_args, **kwargs)
    if libpq:
        event.listen(engine.sync_engine, "do_connect", functools.partial(_drop, tuple(libpq)))
    return engine


def _drop(keys: tuple[str, ...], dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
    """SQLAlchemy passes every URL parameter to asyncpg.connect, which refuses libpq's
    spellings: connect_args carries them in asyncpg's terms."""
    for key in keys:
        cparams.pop(key, None)


def _driver_url(url: str | URL, driver: Driver, *, translate: bool) -> URL:
    if isinstance(url, URL):
        parsed = url
    else:
        text = url.strip()
        if "://" not in text:
            raise ConfigurationError(
                f"invalid database URL {mask_password(text)!r}: expected a URL such as {_EXAMPLE}"
            )
        try:
            parsed = make_url(text)
        except (ArgumentError, ValueError) as exc:
            raise ConfigurationError(
                f"invalid database URL {mask_password(text)!r}: {exc}; expected e.g. {_EXAMPLE}"
            ) from None
    if parsed.username == "":
        # libpq would connect as its default user to its default database on its default
        # host: nothing of what was typed says where, so refuse rather than guess
        raise ConfigurationError(
            f"invalid database URL {mask_password(parsed)!r}: it has no user name before "
            f"'@'; write the user (e.g. {_EXAMPLE}), or leave out 'user:password@' to "
            "connect as libpq's default user"
        )
    backend = parsed.get_backend_name()
    if backend not in _POSTGRES_SCHEMES:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: pgflow-sa needs "
            f"PostgreSQL, e.g. {_EXAMPLE}"
        )
    if driver == "asyncpg":
        return _asyncpg_url(parsed, translate=translate)
    query = dict(parsed.query)
    if "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")
    return parsed.set(drivername=f"postgresql+{driver}", query=query)


def _asyncpg_url(parsed: URL, *, translate: bool) -> URL:
    """``parsed`` for asyncpg: what SQLAlchemy passes on as asyncpg.connect's keyword
    arguments, plus (with ``translate``) what :func:`async_engine_from_url` moves."""
    query = dict(parsed.query)
    if "sslmode" in query:
        query["ssl"] = query.pop("sslmode")
    if "dbname" in query:
        parsed = parsed.set(database=_last(query.pop("dbname")))
    encoding = query.pop("client_encoding", None)
    if encoding is not None and re.sub(r"[-_]", "", _last(encoding).lower()) not in _UTF8:
        raise ConfigurationError(
            "asyncpg always uses UTF8: remove 'client_encoding' from the database URL"
        )
    taken = _asyncpg_keywords()
    needs_connect_args = sorted(key for key in query if key in _TRANSLATED)
    unknown = sorted(key for key in query if key not in taken and key not in _TRANSLATED)
    if unknown:
        raise ConfigurationError(
            f"asyncpg has no connection parameter {_names(unknown)} (libpq has several it "
            "lacks): remove it from the database URL, or use psycopg"
        )
    if needs_connect_args and not translate:
        hints = sorted({_CONNECT_ARGS_HINT.get(key, _SSL_HINT) for key in needs_connect_args})
        raise ConfigurationError(
            f"asyncpg takes libpq's {_names(needs_connect_args)} only in connect_args, not "
            "in a SQLAlchemy URL: make the engine with "
            "pgflow_sa.async_engine_from_url(url), which passes them on, or remove "
            f"them from the URL and pass {' or '.join(hints)}"
        )
    if "connect_timeout" in query:
        _connect_timeout(_last(query["connect_timeout"]))
    return parsed.set(drivername="postgresql+asyncpg", query=query)


@functools.cache
def _asyncpg_keywords() -> frozenset[str]:
    """The URL parameters SQLAlchemy's asyncpg dialect can pass on: asyncpg.connect's
    keyword arguments that take a string, and the dialect's own."""
    import asyncpg  # type: ignore[import-untyped]

    not_strings = {"dsn", "loop", "connection_class", "record_class", "server_settings"}
    keywords = set(inspect.signature(asyncpg.connect).parameters) - not_strings
    return frozenset({*keywords, "prepared_statement_cache_size"})


def _connect_timeout(value: str) -> int | None:
    try:
        seconds = int(value.strip())
    except ValueError:
        raise ConfigurationError(
            f"connect_timeout must be a whole number of seconds, not {value!r}"
        ) from None
    return seconds if seconds > 0 else None  # libpq: zero or less waits for ever


def _last(value: str | tuple[str, ...]) -> str:
    """A URL parameter's value (libpq, like SQLAlchemy, lets the last one win)."""
    return value if isinstance(value, str) else value[-1]


def _names(keys: list[str]) -> str:
    return ", ".join(repr(key) for key in keys)


def to_libpq_url(url: str | URL) -> str:
    """The same database as a plain libpq URL (for psql, node, ...)."""
    parsed = to_sqlalchemy_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


#: ``user:password@`` of a URL. A password may hold ``@``, ``/`` or ``?`` unescaped, so
#: it runs to the last ``@`` before a host part free of ``@`` (more hidden, never less)
_USERINFO = re.compile(r"(?P<user>[^:/?#@\s]*):(?P<password>.+?)@(?=[^@/?#]*(?:[/?#]|$))", re.S)
#: ``key=value`` of a URL's query
_QUERY_PARAM = re.compile(r"(?<=[?&])(?P<key>[^=&]*)=(?P<value>[^&]*)")
#: ``key=value`` of a libpq keyword/value string (or of something like a URL), the
#: value maybe quoted
_KEYWORD_PARAM = re.compile(
    r"(?<![^\s?&])(?P<key>[^\s=?&]+)\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'?|\S*)"
)
_SECRET_KEYS = {"password", "sslpassword"}


def mask_password(url: str | URL) -> str:
    """A URL fit for printing: passwords replaced by ``***``, in the user info
    (``user:password@``) and in ``password`` (or ``sslpassword``) parameters. Text
    that is no URL gets the same treatment, so a password never shows."""
    if isinstance(url, URL):
        return _mask_parameters(url.render_as_string(hide_password=True))
    head, sep, rest = url.partition("://")
    match = _USERINFO.match(rest) if sep else _USERINFO.search(url)
    if match is not None:
        text = match.string
        text = text[: match.start("password")] + "***" + text[match.end("password") :]
        url = head + sep + text if sep else text
    return _mask_parameters(url)


def _mask_parameters(text: str) -> str:
    def hide(match: re.Match[str]) -> str:
        if unquote(match["key"]).strip().lower() not in _SECRET_KEYS:
            return match[0]
        return match[0][: match.start("value") - match.start()] + "***"

    pattern = _QUERY_PARAM if "://" in text else _KEYWORD_PARAM
    return pattern.sub(hide, text)


@dataclass(frozen=True)
class ResolvedUrl:
    """A database URL and where it came from (``flag``, ``env``, ``app``, ``pyproject``)."""

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
    explicit: str | None = None, cwd: Path | None = None, app_url: str | None = None
) -> ResolvedUrl | None:
    """The configured database URL: the explicit value, else ``PGFLOW_SA_DATABASE_URL``,
    else ``app_url`` (the one an APP's ``FlowRegistry(database_url=...)`` hands over),
    else ``database-url`` in ``[tool.pgflow-sa]`` of the nearest pyproject.toml.
    None means nothing is configured (the CLI then uses the embedded server)."""
    if explicit:
        return ResolvedUrl(explicit, "flag")
    from_env = os.environ.get(DATABASE_URL_ENV, "").strip()
    if from_env:
        return ResolvedUrl(from_env, "env")
    if app_url:
        return ResolvedUrl(app_url, "app")
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
    embedded server (started if it is not running; files in :func:`default_data_dir`).
    With nothing configured but ``DATABASE_URL`` set, raises ConfigurationError
    rather than start an embedded server beside the database that was meant."""
    resolved = resolve_database_url(explicit)
    if resolved is not None:
        return resolved.url
    refuse_unclaimed_database_url()
    return embedded_database_url()


#: the variable many apps (Heroku, Django, Rails, ...) read their database from
FOREIGN_DATABASE_URL_ENV = "DATABASE_URL"


def refuse_unclaimed_database_url() -> None:
    """Nothing configures pgflow-sa's database, yet ``DATABASE_URL`` names one: the
    user surely meant it, so say how to use it instead of starting the embedded server."""
    if os.environ.get(FOREIGN_DATABASE_URL_ENV, "").strip():
        raise ConfigurationError(
            f"{FOREIGN_DATABASE_URL_ENV} is set but pgflow-sa reads {DATABASE_URL_ENV} "
            f'(or --database-url): export {DATABASE_URL_ENV}="${FOREIGN_DATABASE_URL_ENV}" '
            f"to use that database, or unset {FOREIGN_DATABASE_URL_ENV} to use the "
            "embedded server"
        )


def embedded_database_url() -> str:
    """The URL of the embedded server in :func:`default_data_dir`, starting it if it
    is not running."""
    from .embedded import EmbeddedServer

    return EmbeddedServer(default_data_dir()).start()
