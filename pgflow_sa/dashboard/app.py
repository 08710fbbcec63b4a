"""The dashboard's ASGI app (Starlette + Jinja2, pages rendered on the server; the
run page's live colours come from server-sent events and a few lines of inline JS)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jinja2
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from ..client import _steps as client_steps
from ..client import get_run_async, list_runs_async
from ..exceptions import InvalidInputError, PgflowSaError
from ..models import RunStatus
from ..schema import queries as client_queries
from ..schema import tables
from . import actions, payloads, schedules, views
from .dag import render_dag
from .database import Database
from .live import state_stream
from .queries import (
    FlowCounts,
    flow_counts,
    flow_infos,
    flow_structure,
    queue_lengths,
    recent_workers,
    run_counts,
    task_counts,
    task_window,
    worker_counts,
)

logger = logging.getLogger("pgflow_sa.dashboard")

#: runs per page of the runs list
PAGE_SIZE = 50
#: tasks shown per step on a run page (and timeline bars per step); the rest by
#: ``?tasks_after=<task_index>``
TASKS_SHOWN = 100
#: the flows page counts the runs started in this window (seconds) by status
WINDOW_SECONDS = 3600
#: a worker whose last heartbeat is younger than this (seconds) is live
LIVE_SECONDS = 30

Auth = Callable[[Request], "bool | Awaitable[bool]"]


class _Guard:
    """Runs the ``auth`` hook before every request: a false answer is a 403."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            allowed = self.auth(Request(scope, receive))
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                await PlainTextResponse("Forbidden", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
        moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)  # out of range (year 10000 in UTC): refused
    except (ValueError, OverflowError):
        raise InvalidInputError(
            f"{name} must be a date and time between years 1 and 9999, not {value!r}"
        ) from None


def _text(value: str | None, name: str) -> str | None:
    if value and "\x00" in value:
        raise InvalidInputError(f"{name} must not contain a NUL character")
    return value or None


def dashboard_app(
    engine: AsyncEngine | Engine | str | URL,
    *,
    allow_actions: bool = False,
    show_payloads: bool = True,
    auth: Auth | None = None,
    secret: bytes | None = None,
) -> Starlette:
    """The dashboard as an ASGI app: serve it (``pgflow-sa dashboard``), mount it in
    FastAPI (``app.mount("/pgflow", dashboard_app(engine))``) or in Flask through an
    ASGI-to-WSGI adapter. Read-only unless ``allow_actions``; ``show_payloads=False``
    shows no run or task input and output; ``auth(request)`` returning false (or an
    awaitable of false) answers 403. ``secret`` signs the actions' form tokens (by
    default a random one per app: give processes serving one dashboard the same)."""
    db = Database(engine)
    tokens = actions.Tokens(secret)
    templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
    templates.env.globals.update(
        when=views.when,
        seconds=views.seconds,
        pretty=views.pretty,
        show_payloads=show_payloads,
        error_text=lambda message: views.error_text(message, show_payloads),
        allow_actions=allow_actions,
        run_actions=actions.RUN_ACTIONS if allow_actions else (),
        token_field=actions.TOKEN_FIELD,
    )

    @jinja2.pass_context
    def url_for(context: dict[str, Any], name: str, /, **params: Any) -> str:
        return views.path_for(context["request"].scope, name, **params)

    templates.env.globals["url_for"] = url_for

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def problem(request: Request, message: str, status_code: int) -> Response:
        return page(request, "problem.html", status_code, message=message)

    async def flows_page(request: Request) -> Response:
        async with db.connect() as conn:
            structure = flow_infos((await conn.execute(flow_structure())).all())
            counts = flow_counts(
                (await conn.execute(run_counts(timedelta(seconds=WINDOW_SECONDS)))).all(),
                (await conn.execute(queue_lengths())).all(),
                (await conn.execute(worker_counts(timedelta(seconds=LIVE_SECONDS)))).all(),
            )
        flows = [
            {
                "info": info,
                "dag": render_dag(info.nodes),
                "counts": counts.get(info.flow_slug, FlowCounts()),
            }
            for info in structure
        ]
        return page(
            request, "flows.html", here="flows", flows=flows, window_minutes=WINDOW_SECONDS // 60
        )

    async def runs_page(request: Request) -> Response:
        params = request.query_params
        try:
            flow = _text(params.get("flow"), "flow")
            status = _text(params.get("status"), "status")
            since = _parse_time(params.get("since"), "since")
            until = _parse_time(params.get("until"), "until")
            async with db.connect() as conn:
                result = await list_runs_async(
                    conn,
                    flow=flow,
                    status=status,
                    started_after=since,
                    started_before=until,
                    after=params.get("after") or None,
                    limit=PAGE_SIZE,
                )
                slugs = (await conn.execute(select(tables.flows.c.flow_slug))).scalars().all()
        except InvalidInputError as exc:
            return problem(request, str(exc), 400)
        keep = {k: v for k, v in params.items() if k != "after" and v}
        return page(
            request,
            "runs.html",
            here="runs",
            runs=result.runs,
            next_cursor=result.next_cursor,
            keep=keep,
            flows=sorted(slugs),
            statuses=[s.value for s in RunStatus],
            filters={"flow": flow, "status": status, **keep},
            first_page=params.get("after") is None,
        )

    async def run_page(request: Request) -> Response:
        try:
            run_id = uuid.UUID(request.path_params["run_id"])
        except ValueError:
            return problem(request, "a run id is a UUID", 404)
        try:
            after = int(request.query_params.get("tasks_after") or -1)
        except ValueError:
            after = -2
        if after < -1:
            return problem(request, "tasks_after must be a task index (0 or more)", 400)
        size = TASKS_SHOWN
        async with db.connect() as conn:
            run = await get_run_async(conn, run_id, steps=False)
            if run is None:
                return problem(request, f"no run {run_id}", 404)
            states = (await conn.execute(client_queries.run_step_states(run_id))).all()
            window = (await conn.execute(task_window(run_id, after, size))).all()
            counted = (await conn.execute(task_counts(run_id))).all()
            structure = flow_infos((await conn.execute(flow_structure(run.flow_slug))).all())
        counts: dict[str, dict[str, int]] = {}
        for row in counted:
            counts.setdefault(row.step_slug, {})[row.status] = row.n
        totals = {slug: sum(by_status.values()) for slug, by_status in counts.items()}
        read = {state.step_slug: state for state in client_steps(states, window)}
        nodes = structure[0].nodes if structure else []
        by_slug = {node.slug: node for node in nodes}
        # shown: the window only (task 0 was read for its output)
        shown = tuple(
            state.model_copy(
                update={"tasks": tuple(t for t in state.tasks if after < t.task_index)}
            )
            for state in read.values()
        )
        steps = [
            {
                "state": s,
                "counts": counts.get(s.step_slug, {}),
                "total": totals.get(s.step_slug, 0),
                "tasks": [
                    {
                        "task": t,
                        "input": views.task_input(
                            run, s, by_slug.get(s.step_slug), t, read, totals
                        ),
                    }
                    for t in s.tasks
                ],
            }
            for s in shown
        ]
        more = max(totals.values(), default=0) > after + 1 + size
        token = tokens.for_request(request) if allow_actions else None
        response = page(
            request,
            "run.html",
            here="runs",
            run=run,
            dag=render_dag(nodes, {s.step_slug: s.status.value for s in shown}),
            steps=steps,
            timeline=views.timeline(run.model_copy(update={"steps": shown})),
            end=views.run_end(run),
            tasks_after=after,
            next_after=after + size if more else None,
            tasks_shown=size,
            form_token=token,
        )
        if token is not None:
            actions.remember(request, response, token)
        return response

    async def run_events(request: Request) -> Response:
        try:
            run_id = uuid.UUID(request.path_params["run_id"])
        except ValueError:
            return PlainTextResponse("a run id is a UUID", status_code=404)
        async with db.connect() as conn:
            if await get_run_async(conn, run_id, steps=False) is None:
                return PlainTextResponse(f"no run {run_id}", status_code=404)
        return StreamingResponse(
            state_stream(db.engine, run_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def schedules_page(request: Request) -> Response:
        async with db.connect() as conn:
            view = await schedules.read_schedules(conn)
        return page(request, "schedules.html", here="schedules", view=view)

    async def workers_page(request: Request) -> Response:
        async with db.connect() as conn:
            rows = (await conn.execute(recent_workers())).all()
            now = (await conn.execute(select(func.now()))).scalar_one()
        workers = []
        for row in rows:
            age = (now - row.last_heartbeat_at).total_seconds()
            state = (
                "stopping"
                if row.deprecated_at is not None and age < LIVE_SECONDS
                else "live"
                if age < LIVE_SECONDS
                else "stopped"
            )
            workers.append({"row": row, "age": age, "state": state})
        return page(
            request, "workers.html", here="workers", workers=workers, live_seconds=LIVE_SECONDS
        )

    routes: list[BaseRoute] = [
        Route("/", flows_page, name="flows"),
        Route("/runs", runs_page, name="runs"),
        Route("/runs/{run_id}", run_page, name="run"),
        Route("/runs/{run_id}/events", run_events, name="run_events"),
        Route("/schedules", schedules_page, name="schedules"),
        Route("/workers", workers_page, name="workers"),
        *actions.routes(db if allow_actions else None, problem, tokens),
    ]
    if show_payloads:  # else the pages show none, and no route serves them
        routes.extend(payloads.routes(db))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await db.dispose()

    async def failed(request: Request, exc: Exception) -> Response:
        logger.warning("dashboard: %s", exc)
        return problem(request, str(exc), 503)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={PgflowSaError: failed})
    if auth is not None:
        app.add_middleware(_Guard, auth=auth)
    return app
