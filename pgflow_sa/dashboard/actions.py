"""Run actions: POST routes that change a run, mounted only when the app is built
with ``allow_actions=True`` (read-only apps have no route that accepts a POST).

pgflow-sa has no run control yet, so :data:`RUN_ACTIONS` is empty; cancel and
retry become an :class:`Action` each once it exists, and the run page shows a
button for each."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from .views import path_for


@dataclass(frozen=True)
class Action:
    """``name`` in the URL (``POST /runs/<id>/actions/<name>``), ``label`` on the
    button, ``perform(engine, run_id)`` does it."""

    name: str
    label: str
    perform: Callable[[AsyncEngine, uuid.UUID], Awaitable[None]]


#: the actions a run page offers when actions are enabled
RUN_ACTIONS: tuple[Action, ...] = ()


def routes(engine: Callable[[], AsyncEngine]) -> list[BaseRoute]:
    by_name = {action.name: action for action in RUN_ACTIONS}

    async def act(request: Request) -> Response:
        action = by_name.get(request.path_params["name"])
        if action is None:
            return PlainTextResponse("no such action", status_code=404)
        try:
            run_id = uuid.UUID(request.path_params["run_id"])
        except ValueError:
            return PlainTextResponse("a run id is a UUID", status_code=404)
        await action.perform(engine(), run_id)
        return RedirectResponse(path_for(request.scope, "run", run_id=str(run_id)), 303)

    return [Route("/runs/{run_id}/actions/{name}", act, methods=["POST"], name="run_action")]
