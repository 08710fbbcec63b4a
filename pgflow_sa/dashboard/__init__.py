"""A web dashboard of flows, runs, schedules and workers: ``pgflow-sa dashboard``, or
``dashboard_app(engine)`` mounted in an ASGI (FastAPI, Starlette) or, through an
ASGI-to-WSGI adapter, a WSGI (Flask) application.

It needs the ``dashboard`` extra (Starlette, Jinja2, uvicorn, a2wsgi); importing
this package does not, calling :func:`dashboard_app` does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ..exceptions import DashboardUnavailableError

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["DashboardUnavailableError", "dashboard_app"]


def dashboard_app(
    engine: AsyncEngine | Engine | str | URL,
    *,
    allow_actions: bool = False,
    show_payloads: bool = True,
    auth: Callable[[Any], Any] | None = None,
) -> Starlette:
    """The dashboard as an ASGI app on this database (an async or sync engine, or a
    URL; a sync engine or URL gets an async engine of the dashboard's own).

    Read-only unless ``allow_actions`` (then a run page has Cancel or Retry buttons,
    POST routes refusing cross-site requests). ``show_payloads=False`` shows no run
    or task input or output. ``auth`` is called with each Starlette request; a false
    answer (or awaitable of one) is a 403.
    """
    try:
        from .app import dashboard_app as build
    except ImportError as exc:
        raise DashboardUnavailableError(
            f"the dashboard needs {exc.name or 'its dependencies'}, which is not installed: "
            "pip install 'pgflow-sa[dashboard]'"
        ) from exc
    return build(engine, allow_actions=allow_actions, show_payloads=show_payloads, auth=auth)
