"""Flask app: a sync Session starts the flow in the request's transaction."""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, request
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from pgflow_sa import (
    RunTimeoutError,
    get_database_url,
    get_run,
    start_flow,
    to_sqlalchemy_url,
    wait_for_run,
)

from .flows import signup
from .models import User

# the database every pgflow-sa command uses: PGFLOW_SA_DATABASE_URL, else the embedded
# server in the current folder (so the app, its migrations and its worker agree)
engine = create_engine(to_sqlalchemy_url(get_database_url(), "psycopg"))
app = Flask(__name__)


@app.post("/users")
def create_user() -> tuple[dict[str, Any], int]:
    email = (request.get_json() or {}).get("email", "")
    with Session(engine, expire_on_commit=False) as session, session.begin():
        user = User(email=email)
        session.add(user)
        session.flush()
        run = start_flow(session, signup, {"email": email, "user_id": user.id})
        user.signup_run = str(run.run_id)
    return {"user_id": user.id, "run_id": str(run.run_id)}, 201


@app.get("/runs/<run_id>")
def show_run(run_id: str) -> dict[str, Any]:
    wait = float(request.args.get("wait", 0))
    try:
        if wait:
            run = wait_for_run(engine, run_id, timeout=wait)
        else:
            with engine.connect() as conn:
                found = get_run(conn, run_id)
            if found is None:
                abort(404)
            run = found
    except RunTimeoutError:
        abort(504)
    return {"status": run.status.value, "output": run.output, "error": run.error}
