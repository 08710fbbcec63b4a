"""The "show all" routes: a run's or a task's input or output whole, as pretty JSON
(a page shows the first characters of a long one). Mounted only when the app shows
payloads."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ..client import _steps as client_steps
from ..client import get_run_async
from ..schema import queries as client_queries
from . import views
from .database import Database
from .queries import flow_infos, flow_structure, task_with_deps

Endpoint = Callable[[Request], Awaitable[Response]]


def _json(value: Any) -> Response:
    return PlainTextResponse(views.pretty(value).text, media_type="application/json; charset=utf-8")


def routes(db: Database) -> list[BaseRoute]:
    def run_value(which: str) -> Endpoint:
        async def whole(request: Request) -> Response:
            run_id: uuid.UUID = request.path_params["run_id"]
            async with db.connect() as conn:
                run = await get_run_async(conn, run_id, steps=False)
            if run is None:
                return PlainTextResponse(f"no run {run_id}", status_code=404)
            return _json(run.input if which == "input" else run.output)

        return whole

    def task_value(which: str) -> Endpoint:
        async def whole(request: Request) -> Response:
            run_id: uuid.UUID = request.path_params["run_id"]
            slug: str = request.path_params["step"]
            index: int = request.path_params["index"]
            async with db.connect() as conn:
                run = await get_run_async(conn, run_id, steps=False)
                if run is None:
                    return PlainTextResponse(f"no run {run_id}", status_code=404)
                structure = flow_infos((await conn.execute(flow_structure(run.flow_slug))).all())
                node = next((n for n in structure[0].nodes if n.slug == slug), None)
                if node is None:
                    return PlainTextResponse(f"no step {slug!r} in this run", status_code=404)
                states = (await conn.execute(client_queries.run_step_states(run_id))).all()
                rows = (await conn.execute(task_with_deps(run_id, slug, index, node.deps))).all()
            read = {state.step_slug: state for state in client_steps(states, rows)}
            own = read[slug].tasks if slug in read else ()
            task = next((t for t in own if t.task_index == index), None)
            if task is None:
                return PlainTextResponse(f"no task {index} of step {slug!r}", status_code=404)
            if which == "output":
                return _json(task.output)
            totals = {s.step_slug: len(s.tasks) for s in read.values()}  # every dep task read
            return _json(views.task_input(run, read[slug], node, task, read, totals))

        return whole

    task_path = "/runs/{run_id:uuid}/tasks/{step}/{index:int}"
    return [
        *(
            Route(f"/runs/{{run_id:uuid}}/{w}", run_value(w), name=f"run_{w}")
            for w in ("input", "output")
        ),
        *(Route(f"{task_path}/{w}", task_value(w), name=f"task_{w}") for w in ("input", "output")),
    ]
