"""Flows for tests/test_first_hour.py: a typed input, and a slug that needs quoting."""

from __future__ import annotations

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
