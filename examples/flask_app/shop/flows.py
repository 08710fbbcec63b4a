"""A signup flow with sync handlers; the welcome step writes through ctx.session, so
its row and the task's completion commit together."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pgflow_sa import Context, Flow, FlowRegistry

from .models import Welcome

signup = Flow("signup", max_attempts=3)


@signup.step
def normalize(input: dict[str, Any], ctx: Context) -> str:
    return input["email"].strip().lower()


@signup.step(depends_on=[normalize])
def welcome(input: dict[str, Any], ctx: Context) -> str:
    message = f"Welcome, {input['normalize']}!"
    ctx.session.execute(sa.insert(Welcome).values(email=input["normalize"], message=message))
    return message


registry = FlowRegistry(signup)
