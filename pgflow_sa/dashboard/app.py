"""The dashboard's ASGI app (Starlette + Jinja2, pages rendered on the server; the
run page's live colours come from server-sent events and a few lines of inline JS)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jinja2
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from .._db import database_errors
from ..client import _steps as client_steps
from ..client import get_run_async, list_runs_async
from ..config import async_engine_from_url
from ..exceptions import InvalidInputError, PgflowSaError
from ..models import RunStatus
from ..schema import queries as client_queries
from ..schema import tables
from ..waiting import watcher_for
from . import actions, views
from .dag import render_dag
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
#: a run page's event stream re-reads the run at least this often (seconds), even
#: when no notification comes (notifications are hints and can be lost)
SAFETY_INTERVAL = 2.0
#: the flows page counts the runs started in this window (seconds) by status
WINDOW_SECONDS = 3600
#: a worker whose last heartbeat is younger than this (seconds) is live
LIVE_SECONDS = 30

Auth = Callable[[Request], "bool | Awaitable[bool]"]


class _Database:
    """The dashboard's async engine: the one given, or one made (on first use, in the
    serving event loop) from a sync engine's URL or a URL. A made engine pools no
    connections: behind a WSGI adapter no lifespan event would ever close them."""

    def __init__(self, target: AsyncEngine | Engine | str | URL) -> None:
        self._target = target
        self._engine: AsyncEngine | None = target if isinstance(target, AsyncEngine) else None
        self.owned = self._engine is None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            target = self._target
            url = target.url if isinstance(target, Engine) else target
            assert not isinstance(url, AsyncEngine)
            self._engine = async_engine_from_url(url, poolclass=NullPool)
        return self._engine

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection; database errors become pgflow-sa errors (a 503 page)."""
        with database_errors(None, PgflowSaError):
            async with self.engine.connect() as conn:
                yield conn

    async def dispose(self) -> None:
        if self.owned and self._engine is not None:
            await self._engine.dispose()


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
) -> Starlette:
    """The dashboard as an ASGI app: serve it (``pgflow-sa dashboard``), mount it in
    FastAPI (``app.mount("/pgflow", dashboard_app(engine))``) or in Flask through an
    ASGI-to-WSGI adapter. Read-only unless ``allow_actions``; ``show_payloads=False``
    shows no run or task input and output; ``auth(request)`` returning false (or an
    awaitable of false) answers 403."""
    db = _Database(engine)
    templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
    templates.env.globals.update(
        when=views.when,
        seconds=views.seconds,
        pretty=views.pretty,
        show_payloads=show_payloads,
        error_text=lambda message: views.error_text(message, show_payloads),
        allow_actions=allow_actions,
        run_actions=actions.RUN_ACTIONS if allow_actions else (),
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
        return page(
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
        )

    async def run_events(request: Request) -> Response:
        try:
            run_id = uuid.UUID(request.path_params["run_id"])
        except ValueError:
            return PlainTextResponse("a run id is a UUID", status_code=404)
        async with db.connect() as conn:
            if await get_run_async(conn, run_id, steps=False) is None:
                return PlainTextResponse(f"no run {run_id}", status_code=404)
        return StreamingResponse(
            _state_stream(db.engine, run_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

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
        Route("/workers", workers_page, name="workers"),
    ]
    if allow_actions:
        routes.extend(actions.routes(lambda: db.engine))

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


async def _read_state(engine: AsyncEngine, run_id: uuid.UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        run = await get_run_async(conn, run_id, steps=False)
        rows = (await conn.execute(client_queries.step_statuses([run_id]))).all()
    return {
        "run": run.status.value if run else None,
        "steps": {row.step_slug: row.status for row in rows},
    }


async def _state_stream(engine: AsyncEngine, run_id: uuid.UUID) -> AsyncIterator[str]:
    """Server-sent events: the run's status and its steps' statuses, whenever they
    change, until the run finishes. The waiting machinery's hints (one LISTEN
    connection per engine, polling when notifications are off) only wake this loop,
    which reads no more than the statuses: on each wake-up, and every
    SAFETY_INTERVAL (then writing a comment when nothing changed)."""
    wake = asyncio.Event()

    async def listen() -> None:
        try:
            async for _ in watcher_for(engine).hints(run_id):
                wake.set()
        except Exception as exc:  # the timed reads carry on
            logger.debug("dashboard: watching run %s stopped: %s", run_id, exc)

    watcher = asyncio.create_task(listen())
    last: dict[str, Any] | None = None
    try:
        while True:
            wake.clear()
            state = await _read_state(engine, run_id)
            if state != last:
                yield f"data: {json.dumps(state)}\n\n"
                last = state
            else:
                # a comment: a WSGI server learns only by writing that the client is
                # gone (a stream left silent would read the run for ever), and
                # proxies with idle timeouts keep the stream open
                yield ": keep-alive\n\n"
            if state["run"] != RunStatus.STARTED.value:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), SAFETY_INTERVAL)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
