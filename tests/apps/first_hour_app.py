"""Flows for tests/test_first_hour.py: a typed input; and a registry that hands the app's
own database (its DATABASE_URL) to the commands."""

from __future__ import annotations

import os

from pydantic import BaseModel

from pgflow_sa import Flow, FlowRegistry


class Greeting(BaseModel):
    name: str
    times: int = 1


greet = Flow("greet")


@greet.step
def hello(input: Greeting) -> str:
    return ", ".join([f"Hello, {input.name}!"] * input.times)


registry = FlowRegistry(greet)
#: as an app whose settings read DATABASE_URL hands its database over
own_database = FlowRegistry(greet, database_url=os.environ.get("DATABASE_URL"))
