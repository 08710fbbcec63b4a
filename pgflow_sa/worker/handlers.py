"""What a handler receives and returns: input shaping, typed input, JSON output."""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..dsl import StepDefinition
from ..schema import worker_queries
from ..schema.rows import StepTaskRecord
from ..schema.worker_queries import Fence


class OutputError(TypeError):
    """A handler returned something that cannot be stored as JSON."""


def handler_input(step: StepDefinition, task: StepTaskRecord) -> Any:
    """The handler's input from pgflow 0.8.1's task input: the flow input for a root
    step, ``{dependency: output}`` for a dependent step, the element for a map step."""
    if step.is_map:
        return task.input
    if step.is_root:
        return task.input.get("run") if isinstance(task.input, dict) else task.input
    return {k: v for k, v in task.input.items() if k != "run"}


def flow_input_of(step: StepDefinition, task: StepTaskRecord) -> tuple[bool, Any]:
    """(known, flow input) from the task input; map tasks do not carry it."""
    if not step.is_map and isinstance(task.input, dict) and "run" in task.input:
        return True, task.input["run"]
    return False, None


@cache
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def typed_input(step: StepDefinition, value: Any) -> Any:
    """The input converted to the handler's declared first-parameter type, if any."""
    if step.input_type is None or isinstance(step.input_type, str):
        return value
    return _adapter(step.input_type).validate_python(value)


def json_output(step_slug: str, value: Any) -> Any:
    """The output as JSON-ready data (pydantic models and dataclasses become dicts);
    OutputError when it cannot be stored."""
    try:
        data = to_jsonable_python(value)
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OutputError(
            f"step {step_slug!r} returned a value that is not JSON-serialisable: {exc}"
        ) from None
    return data


def storable(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL bytes and lone surrogates escaped."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def error_message(exc: BaseException) -> str:
    """How a failure is stored in pgflow: ``ExceptionType: message``."""
    text = str(exc)
    return storable(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def handler_logger(flow_slug: str, step_slug: str) -> logging.Logger:
    """The logger a handler gets as ``ctx.logger``."""
    return logging.getLogger(f"pgflow_sa.handler.{flow_slug}.{step_slug}")


class SessionSettleError(Exception):
    """Completing the task in the handler's own session failed; ``__cause__`` says why
    (the handler's writes were rolled back with it)."""


def complete_in_session(session: Session, fence: Fence, output: Any) -> bool:
    """Complete the task in the handler's ``ctx.session`` and commit, only if the task
    is still held as ``fence`` says: the handler's writes and the completion land
    together, or neither does. False: the task was lost (everything rolled back)."""
    try:
        held = session.execute(*worker_queries.complete_fenced([fence], [output])).first()
        if held is None:
            session.rollback()
            return False
        session.commit()
    except Exception as exc:
        raise SessionSettleError(str(exc)) from exc
    return True


async def complete_in_async_session(session: AsyncSession, fence: Fence, output: Any) -> bool:
    """:func:`complete_in_session` for ``ctx.async_session``."""
    try:
        held = (await session.execute(*worker_queries.complete_fenced([fence], [output]))).first()
        if held is None:
            await session.rollback()
            return False
        await session.commit()
    except Exception as exc:
        raise SessionSettleError(str(exc)) from exc
    return True
