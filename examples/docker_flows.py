"""The flows the docker/ images serve by default (replace with your app's)."""

from __future__ import annotations

from typing import Any

from pgflow_sa import Context, Flow, FlowRegistry

hello = Flow("docker_hello")


@hello.step
def greet(input: dict[str, Any], ctx: Context) -> str:
    return f"Hello, {input.get('name', 'world')}!"


registry = FlowRegistry(hello)
