"""A schedule as declared in code: ``flow.schedule("*/5 * * * *", input={...})``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from ..exceptions import FlowDefinitionError
from .cron import cron_problem, zone, zone_problem

if TYPE_CHECKING:
    from ..dsl import Flow

CatchUp = Literal["latest", "skip", "all"]
CATCH_UP_POLICIES: tuple[CatchUp, ...] = ("latest", "skip", "all")
#: catch_up="skip" still fires a tick this many seconds late (a worker busy or a
#: database hiccup is not "missed"); later than that, the tick is skipped
SKIP_GRACE_SECONDS = 10
DEFAULT_CATCH_UP_LIMIT = 10
#: the schedule's input, computed when a tick fires from the tick's time (UTC)
InputFunction = Callable[[datetime], Any]


def column_problem(column: str, value: Any) -> str | None:
    """Why ``value`` cannot be the stored ``column`` of a schedule (``cron``,
    ``timezone``, ``catch_up``, ``catch_up_limit``), or None (also for other columns)."""
    if column == "cron":
        problem = cron_problem(value)
        return None if problem is None else f"{value!r} {problem}"
    if column == "timezone":
        return zone_problem(value)
    if column == "catch_up" and value not in CATCH_UP_POLICIES:
        return f"catch_up must be one of {', '.join(CATCH_UP_POLICIES)}, not {value!r}"
    if column == "catch_up_limit" and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        return f"catch_up_limit must be an integer >= 1, not {value!r}"
    return None


def definition_problem(columns: Mapping[str, Any]) -> str | None:
    """The first problem of a stored definition (or of changes to one), or None."""
    for column, value in columns.items():
        problem = column_problem(column, value)
        if problem is not None:
            return problem
    return None


def _is_async(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - an object with async __call__
    )


@dataclass(frozen=True)
class Schedule:
    """Start ``flow_slug`` at every tick of ``cron`` (5 fields, or 6 with seconds
    first) in ``timezone``. ``catch_up`` says what a worker does with ticks that fell
    due while no worker ran: ``"latest"`` fires the latest of them once, ``"skip"``
    fires none (only a tick at most SKIP_GRACE_SECONDS late), ``"all"`` fires each of
    them, at most the latest ``catch_up_limit``. The policy applies whenever a worker
    finds ticks overdue, also a worker that fell behind while running."""

    name: str
    flow_slug: str
    cron: str
    timezone: str = "UTC"
    input: Any = field(default_factory=dict)
    catch_up: CatchUp = "latest"
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT
    flow: Flow | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        from ..dsl import slug_problem

        where = f"schedule {self.name!r} of flow {self.flow_slug!r}"
        problem = slug_problem(self.name)
        if problem is not None:
            raise FlowDefinitionError(f"{where}: the schedule name {problem}")
        problem = cron_problem(self.cron)
        if problem is not None:
            raise FlowDefinitionError(f"{where}: {self.cron!r} {problem}")
        zone(self.timezone)
        if self.catch_up not in CATCH_UP_POLICIES:
            raise FlowDefinitionError(
                f"{where}: catch_up must be one of {', '.join(CATCH_UP_POLICIES)}, "
                f"not {self.catch_up!r}"
            )
        limit = self.catch_up_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise FlowDefinitionError(f"{where}: catch_up_limit must be an integer >= 1")
        if _is_async(self.input):
            raise FlowDefinitionError(
                f"{where}: the input function is async; give a plain function of the tick's "
                "time (workers call it in a thread, outside their event loop; an async one "
                "would return a coroutine, not the input)"
            )
        if callable(self.input) and not (
            inspect.isfunction(self.input) or inspect.ismethod(self.input)
        ):
            raise FlowDefinitionError(
                f"{where}: the input is a {type(self.input).__name__}, not a function: give a "
                "function defined with def (at module level, e.g. one calling it with its "
                "arguments); the schedule's stored input_function is the function's "
                "module:qualname, and this one's would change at every deploy"
            )
        if not callable(self.input):
            try:
                json.dumps(self.input, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise FlowDefinitionError(
                    f"{where}: the input is not JSON-serialisable ({exc}); give JSON data, or "
                    "a function of the tick's time that returns it"
                ) from None

    @property
    def input_function(self) -> str | None:
        """``module:qualname`` of an input computed at tick time, None for fixed input
        (the same at every deploy: only functions and methods are accepted)."""
        if not callable(self.input):
            return None
        return f"{self.input.__module__}:{self.input.__qualname__}"

    def stored_input(self) -> Any:
        """The input as stored (None when a function computes it), checked against
        the flow's input type when the flow is known."""
        if callable(self.input):
            return None
        if self.flow is not None:
            return self.flow.validate_input(self.input)
        return self.input

    def input_at(self, tick: datetime) -> Any:
        """The input of the run started for ``tick``."""
        return self.input(tick) if callable(self.input) else self.input

    def stored(self) -> dict[str, Any]:
        """The definition's columns in ``pgflow_sa.schedules``."""
        return {
            "name": self.name,
            "flow_slug": self.flow_slug,
            "cron": self.cron,
            "timezone": self.timezone,
            "input": self.stored_input(),
            "input_function": self.input_function,
            "catch_up": self.catch_up,
            "catch_up_limit": self.catch_up_limit,
        }
