"""Run actions: cancel a started run, retry a failed one (from scratch, or reusing
the outputs of the steps that completed). A POST each, on
``/runs/<id>/actions/<name>``, taken only when the app is built with
``allow_actions=True``; a read-only app answers any of them 403.

Cross-site requests are refused twice over: a browser that says where a request
comes from (``Sec-Fetch-Site``) must say ``same-origin``, and every form carries a
token that must equal the one in a cookie of the dashboard's own (a site elsewhere
can make a browser send that cookie, not read it). Neither depends on the Host
header, which a mount behind a proxy may not see as the browser did. (A site that
can set cookies for the dashboard's host, such as a sibling subdomain, could plant
a token of its choosing for a browser that sends no ``Sec-Fetch-Site``: put the
dashboard behind the app's authentication hook.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..control import cancel_run, retry_run
from ..exceptions import DatabaseUnavailableError, PgflowSaError, RunNotFoundError, RunStateError
from ..models import Run, RunStatus
from .database import Database
from .views import path_for

#: the cookie holding a browser's form token, and the form field repeating it
TOKEN_COOKIE = "pgflow_sa_csrf"
TOKEN_FIELD = "csrf_token"
#: a form body longer than this is refused (a form has a token and nothing else)
MAX_FORM_BYTES = 4096


def _cancel(conn: Connection, run_id: uuid.UUID) -> Run:
    return cancel_run(conn, run_id, reason="from the dashboard")


def _retry(conn: Connection, run_id: uuid.UUID) -> Run:
    return retry_run(conn, run_id)


def _retry_reusing_outputs(conn: Connection, run_id: uuid.UUID) -> Run:
    return retry_run(conn, run_id, reuse_outputs=True)


@dataclass(frozen=True)
class Action:
    """``name`` in the URL, ``label`` on the button, shown for a run in
    ``offered_for`` statuses; ``perform(conn, run_id)`` does it in the
    connection's transaction and returns the run to show next."""

    name: str
    label: str
    offered_for: frozenset[RunStatus]
    perform: Callable[[Connection, uuid.UUID], Run]

    def offered(self, run: Run) -> bool:
        return run.status in self.offered_for


RUN_ACTIONS: tuple[Action, ...] = (
    Action("cancel", "Cancel", frozenset({RunStatus.STARTED}), _cancel),
    Action("retry", "Retry", frozenset({RunStatus.FAILED, RunStatus.CANCELLED}), _retry),
    Action(
        "retry_reusing_outputs",
        "Retry reusing outputs",
        frozenset({RunStatus.FAILED, RunStatus.CANCELLED}),
        _retry_reusing_outputs,
    ),
)


class Tokens:
    """Form tokens signed with a secret of this app (HMAC-SHA256): a token the app
    never issued (say, a cookie planted by a sibling subdomain) is refused. Several
    processes serving one dashboard behind a load balancer share ``secret``."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        digest = hmac.new(self._secret, nonce.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: str) -> bool:
        nonce, _, signature = token.partition(".")
        return bool(nonce) and secrets.compare_digest(signature, self._sign(nonce))

    def for_request(self, request: Request) -> str:
        """The browser's form token: its cookie's when this app issued it, or a new
        one (set by :func:`remember`)."""
        token = request.cookies.get(TOKEN_COOKIE, "")
        return token if token.isascii() and self.valid(token) else self.issue()


def remember(request: Request, response: Response, token: str) -> None:
    """Set the token's cookie (when the browser has not got it): readable by no
    script, sent by no other site, only under the dashboard's mount."""
    if request.cookies.get(TOKEN_COOKIE) == token:
        return
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        path=(str(request.scope.get("root_path", "")) or "") + "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def _refusal(request: Request, tokens: Tokens) -> str | None:
    """Why this POST is not taken as the dashboard's own form, or None."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return f"a run action must come from the dashboard's own page, not a {site} request"
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return "a run action's form is a token only: this body is too large"
    sent = urllib.parse.parse_qs(body.decode("latin-1")).get(TOKEN_FIELD, [""])[0]
    kept = request.cookies.get(TOKEN_COOKIE, "")
    if (
        not sent
        or not kept
        or not kept.isascii()
        or not secrets.compare_digest(sent.encode(), kept.encode())
        or not tokens.valid(kept)
    ):
        return (
            "this form's token is missing or does not match this browser's: "
            "reload the run page and try again"
        )
    return None


Problem = Callable[[Request, str, int], Response]


def routes(db: Database | None, problem: Problem, tokens: Tokens) -> list[BaseRoute]:
    """The action route: taking actions with ``db``, or, when None (a read-only
    app), refusing every one with a 403."""
    by_name = {action.name: action for action in RUN_ACTIONS}

    async def refuse(request: Request) -> Response:
        return PlainTextResponse(
            "this dashboard is read-only: run actions are enabled by "
            "dashboard_app(..., allow_actions=True)",
            status_code=403,
        )

    async def act(request: Request) -> Response:
        assert db is not None
        refusal = await _refusal(request, tokens)
        if refusal is not None:
            return problem(request, refusal, 403)
        wanted = request.path_params["action"]
        action = by_name.get(wanted)
        if action is None:
            return problem(request, f"no run action {wanted!r} ({', '.join(by_name)})", 404)
        try:
            run_id = uuid.UUID(request.path_params["run_id"])
        except ValueError:
            return problem(request, "a run id is a UUID", 404)

        def perform(conn: Connection) -> Any:
            return action.perform(conn, run_id)

        try:
            async with db.begin() as conn:
                run = await conn.run_sync(perform)
        except RunNotFoundError as exc:
            return problem(request, str(exc), 404)
        except RunStateError as exc:  # e.g. a cancel of a run that has finished
            return problem(request, str(exc), 409)
        except DatabaseUnavailableError:
            raise  # the app's 503
        except PgflowSaError as exc:  # refused by the database (privileges, a table missing)
            return problem(request, str(exc), 500)
        return RedirectResponse(path_for(request.scope, "run", run_id=str(run.run_id)), 303)

    return [
        Route(
            "/runs/{run_id}/actions/{action}",
            refuse if db is None else act,
            methods=["POST"],
            name="run_action",
        )
    ]
