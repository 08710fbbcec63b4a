"""What every ``pgflow-sa`` command shares: the ``--database-url`` option, one-line
errors, the database URL to use, and plain tables and values."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .config import (
    DATABASE_URL_ENV,
    default_data_dir,
    embedded_database_url,
    refuse_unclaimed_database_url,
    resolve_database_url,
)
from .exceptions import PgflowSaError

if TYPE_CHECKING:
    from .registry import FlowRegistry

F = TypeVar("F", bound=Callable[..., Any])


database_url_option: Callable[[F], F] = click.option(
    "--database-url",
    metavar="URL",
    help=(
        f"PostgreSQL URL (libpq or SQLAlchemy form). Default: ${DATABASE_URL_ENV}, then "
        "[tool.pgflow-sa] database-url in pyproject.toml, then the embedded server."
    ),
)


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def clean_errors(command: F) -> F:
    """Report pgflow-sa errors as one line on stderr with exit code 1, no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PgflowSaError as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def database_url(explicit: str | None, app: FlowRegistry | None = None) -> str:
    """The URL to use (``app``'s own when nothing else names one), starting the
    embedded server when nothing is configured."""
    resolved = resolve_database_url(explicit, app_url=app.database_url if app else None)
    if resolved is not None:
        return resolved.url
    refuse_unclaimed_database_url()
    url = embedded_database_url()
    click.echo(f"using the embedded PostgreSQL at {url} (files in {default_data_dir()})", err=True)
    return url


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def seconds(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{(end - start).total_seconds():.2f}s"


def short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def as_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
