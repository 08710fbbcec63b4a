"""Exceptions raised by pgflow-sa. Each message says what to do about it."""

from __future__ import annotations

import shlex
from collections.abc import Iterable


class PgflowSaError(Exception):
    """Base class of every pgflow-sa error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(PgflowSaError):
    """pgflow-sa is not configured correctly."""


class DatabaseUnavailableError(PgflowSaError):
    """The database could not be reached; check the URL and that the server is running."""


class SchemaFilesMissingError(PgflowSaError):
    """The pgflow SQL files are missing from this installation; reinstall pgflow-sa
    (its build fetches them with npm)."""


class InstallError(PgflowSaError):
    """The pgflow schema could not be installed."""


class EmbeddedServerError(PgflowSaError):
    """The embedded PostgreSQL server could not be started."""


class FlowDefinitionError(PgflowSaError, ValueError):
    """A flow definition breaks a pgflow rule."""


class InvalidInputError(PgflowSaError, ValueError):
    """The input does not fit the flow."""


class FlowNotFoundError(PgflowSaError, LookupError):
    """The flow is not in this database."""


class RunNotFoundError(PgflowSaError, LookupError):
    """There is no such run."""


class RunStateError(PgflowSaError):
    """The run is not in a state that allows this (cancel a run in progress; retry one
    that failed or was cancelled)."""


class RunTimeoutError(PgflowSaError, TimeoutError):
    """The run did not finish in time; ``run`` is its last known state."""

    def __init__(self, message: str | None = None, *, run: object = None) -> None:
        super().__init__(message)
        self.run = run


class DashboardUnavailableError(PgflowSaError, ImportError):
    """The dashboard needs Starlette and Jinja2: pip install 'pgflow-sa[dashboard]'."""


def deploy_advice(flow_slugs: Iterable[str], app: str | None = None) -> str:
    """The one piece of advice for flows missing from a database, wherever they are
    found missing: the command that creates them, each word shell-quoted (a slug is
    user input), with ``APP`` standing for the import path of the flows when unknown."""
    words = ["pgflow-sa", "flows", "deploy", shlex.quote(app) if app else "APP"]
    words += [shlex.quote(slug) for slug in flow_slugs]
    return f"create it with `{' '.join(words)}` (or an Alembic migration)"


class ScheduleNotFoundError(PgflowSaError, LookupError):
    """There is no such schedule in this database."""


class ScheduleConflictError(PgflowSaError):
    """A schedule name the code declares belongs to another flow in this database."""
