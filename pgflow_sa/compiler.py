"""Compile a flow into the SQL that creates it — the exact text @pgflow/dsl 0.8.1's
``compileFlow`` emits for the same flow, so TypeScript and Python can own the
same flow."""

from __future__ import annotations

from collections.abc import Mapping

from .dsl import Flow, is_safe_slug
from .exceptions import FlowDefinitionError
from .shape import STEP_OPTION_NAMES, FlowShape


def _quoted(slug: str) -> str:
    # Slugs are validated to [a-zA-Z_][a-zA-Z0-9_]* when defined; checked again here
    # because this text becomes SQL.
    if not is_safe_slug(slug):
        raise FlowDefinitionError(f"refusing to compile the invalid slug {slug!r}")
    return f"'{slug}'"


def _options(options: Mapping[str, int | None]) -> str:
    parts = []
    for name in STEP_OPTION_NAMES:
        value = options.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise FlowDefinitionError(f"refusing to compile the non-integer {name} {value!r}")
            parts.append(f"{name} => {value}")
    return "".join(f", {part}" for part in parts)


def compile_flow(flow: Flow) -> list[str]:
    """``SELECT pgflow.create_flow(...)`` then one ``SELECT pgflow.add_step(...)`` per
    step, in definition order. Only options set explicitly are written."""
    flow.shape()  # a flow without steps is refused
    statements = [f"SELECT pgflow.create_flow({_quoted(flow.slug)}{_options(flow.options())});"]
    for step in flow.steps:
        deps = ""
        if step.depends_on:
            deps = ", ARRAY[" + ", ".join(_quoted(d) for d in step.depends_on) + "]"
        step_type = ", step_type => 'map'" if step.is_map else ""
        statements.append(
            f"SELECT pgflow.add_step({_quoted(flow.slug)}, {_quoted(step.slug)}"
            f"{deps}{_options(step.options())}{step_type});"
        )
    return statements


def compile_shape(shape: FlowShape) -> list[str]:
    """The statements that recreate a flow as stored in a database (every stored
    option written out, since the database does not record which were explicit;
    dependencies in slug order)."""
    statements = [f"SELECT pgflow.create_flow({_quoted(shape.slug)}{_options(shape.options())});"]
    for step in shape.steps:
        deps = ""
        if step.deps:
            deps = ", ARRAY[" + ", ".join(_quoted(d) for d in step.deps) + "]"
        step_type = ", step_type => 'map'" if step.step_type == "map" else ""
        statements.append(
            f"SELECT pgflow.add_step({_quoted(shape.slug)}, {_quoted(step.slug)}"
            f"{deps}{_options(step.options())}{step_type});"
        )
    return statements
