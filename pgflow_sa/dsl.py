"""Define pgflow flows in Python.

::

    from pgflow_sa import Context, Flow

    article = Flow("article_flow", max_attempts=3)

    @article.step
    def fetch(input: ArticleInput, ctx: Context) -> dict[str, str]: ...

    @article.step(depends_on=[fetch], timeout=30)
    async def summarize(input: dict[str, Any], ctx: Context) -> str: ...

    @article.map(depends_on=fetch)           # one task per element of fetch's output
    def score(item: str, ctx: Context) -> float: ...

Every rule of @pgflow/dsl 0.8.1 is checked when the flow is defined, so a bad
definition fails at import time with a message naming the flow and step.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .exceptions import FlowDefinitionError, InvalidInputError
from .schedules.definition import DEFAULT_CATCH_UP_LIMIT, CatchUp, Schedule
from .shape import FLOW_DEFAULTS, STEP_OPTION_NAMES, FlowShape, StepShape

H = TypeVar("H", bound=Callable[..., Any])
DependencyRef = str | Callable[..., Any]

SLUG_MAX_LENGTH = 128
#: pgflow uses the flow slug as the pgmq queue name, which pgmq caps at 47 characters.
QUEUE_NAME_MAX_LENGTH = 47
_SLUG_PATTERN = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED_STEP_SLUGS = {"run"}
#: option -> minimum, as @pgflow/dsl 0.8.1 checks them
OPTION_MINIMUMS = {"max_attempts": 1, "base_delay": 1, "timeout": 3, "start_delay": 0}


def slug_problem(slug: object) -> str | None:
    """Why ``slug`` is not a valid pgflow slug, or None when it is."""
    if not isinstance(slug, str):
        return f"must be a string, not {type(slug).__name__}"
    if slug == "":
        return "must not be empty"
    if len(slug) > SLUG_MAX_LENGTH:
        return f"cannot be longer than {SLUG_MAX_LENGTH} characters (it has {len(slug)})"
    if slug[0].isdigit():
        return "cannot start with a number"
    if slug.startswith("_"):
        return "cannot start with an underscore"
    if any(ch.isspace() for ch in slug):
        return "cannot contain spaces"
    if any(ch in "/:#-?" for ch in slug):
        return "cannot contain special characters like /, :, ?, #, -"
    if not _SLUG_PATTERN.fullmatch(slug):
        return "may contain only ASCII letters, digits and underscores"
    return None


def _limit(where: str, name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FlowDefinitionError(
            f"{where}: {name} must be a whole number of at least 1 (or None for no limit), "
            f"not {value!r}"
        )
    return value


@dataclass(frozen=True)
class FlowLimits:
    """A flow's concurrency limits: tasks of the flow started at once, runs in
    progress (runs over it wait before their first task), and tasks of each step
    started at once (``{step_slug: n}``). None: no limit."""

    max_concurrency: int | None = None
    max_running_runs: int | None = None
    step_limits: dict[str, int] = field(default_factory=dict)


def is_safe_slug(slug: str) -> bool:
    """True for slugs that may be written into SQL text (validated pgflow slugs)."""
    return slug_problem(slug) is None


def _check_options(where: str, options: dict[str, int | None]) -> None:
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlowDefinitionError(
                f"{where}: {name} must be an integer number of "
                f"{'attempts' if name == 'max_attempts' else 'seconds'}, not {value!r}"
            )
        minimum = OPTION_MINIMUMS[name]
        if value < minimum:
            raise FlowDefinitionError(
                f"{where}: {name} must be greater than or equal to {minimum} (got {value})"
            )


@dataclass(frozen=True)
class StepDefinition:
    """One step of a flow: its slug, handler, dependencies, type and explicit options."""

    slug: str
    handler: Callable[..., Any]
    depends_on: tuple[str, ...]
    step_type: str  # "single" or "map"
    max_attempts: int | None = None
    base_delay: int | None = None
    timeout: int | None = None
    start_delay: int | None = None
    input_type: Any = None  # the handler's first-parameter annotation, if any
    takes_context: bool = True
    #: at most this many tasks of the step started at once, across all workers (not a
    #: pgflow option: held by pgflow-sa's workers, see Flow.limits)
    max_concurrency: int | None = None

    @property
    def is_map(self) -> bool:
        return self.step_type == "map"

    @property
    def is_root(self) -> bool:
        return not self.depends_on

    def options(self) -> dict[str, int | None]:
        """The options set explicitly (None when left to the flow's)."""
        return {name: getattr(self, name) for name in STEP_OPTION_NAMES}


def _handler_signature(where: str, handler: Callable[..., Any]) -> tuple[Any, bool]:
    """(first-parameter annotation, whether it takes the context) of a handler."""
    if not callable(handler):
        raise FlowDefinitionError(f"{where}: the handler must be a function, not {handler!r}")
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return None, True
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    has_varargs = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
    required_kw = [
        p.name
        for p in signature.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    required_pos = [p for p in positional if p.default is p.empty]
    if required_kw or len(required_pos) > 2 or (not positional and not has_varargs):
        raise FlowDefinitionError(
            f"{where}: the handler must take (input, ctx) or (input); "
            f"{getattr(handler, '__name__', 'it')}{signature} does not"
        )
    takes_context = has_varargs or len(positional) >= 2
    annotation: Any = None
    if positional:
        first = positional[0]
        annotation = first.annotation if first.annotation is not first.empty else None
        if annotation is Any or annotation == "Any":
            annotation = None
        if isinstance(annotation, str):
            try:
                hints = typing.get_type_hints(handler)
            except Exception:  # forward references that do not resolve: keep the text
                hints = {}
            annotation = hints.get(first.name, annotation)
    return annotation, takes_context


class Flow:
    """A pgflow flow: a DAG of steps, defined with the :meth:`step` and :meth:`map`
    decorators in dependency order.

    ``max_attempts``, ``base_delay`` and ``timeout`` left unset take pgflow's
    defaults (3 attempts, 5 s, 60 s) and are not written into the compiled SQL.
    ``input_type`` declares the flow input type; without it the first root
    step's input annotation is used.
    """

    def __init__(
        self,
        slug: str,
        *,
        max_attempts: int | None = None,
        base_delay: int | None = None,
        timeout: int | None = None,
        input_type: Any = None,
        max_concurrency: int | None = None,
        max_running_runs: int | None = None,
    ) -> None:
        problem = slug_problem(slug)
        if problem is not None:
            raise FlowDefinitionError(f"Flow {slug!r}: the flow slug {problem}")
        if len(slug) > QUEUE_NAME_MAX_LENGTH:
            raise FlowDefinitionError(
                f"Flow {slug!r}: the flow slug is also its pgmq queue name, which can be at most "
                f"{QUEUE_NAME_MAX_LENGTH} characters (it has {len(slug)}); choose a shorter slug"
            )
        self.slug = slug
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.timeout = timeout
        _check_options(f"Flow {slug!r}", self.options())
        self.max_concurrency = _limit(f"Flow {slug!r}", "max_concurrency", max_concurrency)
        self.max_running_runs = _limit(f"Flow {slug!r}", "max_running_runs", max_running_runs)
        self._input_type = input_type
        self._steps: dict[str, StepDefinition] = {}
        self._slug_by_handler: dict[int, str] = {}
        self._schedules: dict[str, Schedule] = {}

    def __repr__(self) -> str:
        return f"Flow({self.slug!r}, steps={list(self._steps)})"

    # --- definition ---------------------------------------------------------

    def schedule(
        self,
        cron: str,
        *,
        name: str | None = None,
        input: Any = None,
        timezone: str = "UTC",
        catch_up: CatchUp = "latest",
        catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT,
    ) -> Schedule:
        """Start this flow at every tick of ``cron`` (see :class:`Schedule`). ``name``
        (default: the flow slug) identifies the schedule in the database; ``input`` is
        the run input (default ``{}``) or a plain (not async) function of the tick's
        time returning it, which workers call in a thread."""
        schedule = Schedule(
            name=self.slug if name is None else name,
            flow_slug=self.slug,
            cron=cron,
            timezone=timezone,
            input={} if input is None else input,
            catch_up=catch_up,
            catch_up_limit=catch_up_limit,
            flow=self,
        )
        if schedule.name in self._schedules:
            raise FlowDefinitionError(
                f"Flow {self.slug!r} already has a schedule named {schedule.name!r}: give each "
                "schedule of a flow its own name="
            )
        self._schedules[schedule.name] = schedule
        return schedule

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        return tuple(self._schedules.values())

    @overload
    def step(self, handler: H, /) -> H: ...

    @overload
    def step(
        self,
        /,
        *,
        slug: str | None = None,
        depends_on: Sequence[DependencyRef] | DependencyRef = (),
        max_attempts: int | None = None,
        base_delay: int | None = None,
        timeout: int | None = None,
        start_delay: int | None = None,
        max_concurrency: int | None = None,
    ) -> Callable[[H], H]: ...

    def step(self, handler: H | None = None, /, **options: Any) -> H | Callable[[H], H]:
        """Add a step; usable bare (``@flow.step``) or with options. Its input is the
        flow input for a root step, else ``{dependency_slug: output, ...}``."""
        return self._decorator("single", handler, options)

    @overload
    def map(self, handler: H, /) -> H: ...

    @overload
    def map(
        self,
        /,
        *,
        slug: str | None = None,
        depends_on: Sequence[DependencyRef] | DependencyRef = (),
        max_attempts: int | None = None,
        base_delay: int | None = None,
        timeout: int | None = None,
        start_delay: int | None = None,
        max_concurrency: int | None = None,
    ) -> Callable[[H], H]: ...

    def map(self, handler: H | None = None, /, **options: Any) -> H | Callable[[H], H]:
        """Add a map step: one task per element of the flow input (no dependency; the
        input must be an array) or of its single dependency's array output. Its
        output is the list of task outputs, in element order."""
        return self._decorator("map", handler, options)

    def _decorator(
        self, step_type: str, handler: H | None, options: dict[str, Any]
    ) -> H | Callable[[H], H]:
        unknown = set(options) - {"slug", "depends_on", "max_concurrency", *OPTION_MINIMUMS}
        if unknown:
            raise FlowDefinitionError(
                f"Flow {self.slug!r}: unknown step option(s) {sorted(unknown)}; "
                f"use slug, depends_on, {', '.join(OPTION_MINIMUMS)}, max_concurrency"
            )

        def register(func: H) -> H:
            self._add(
                func,
                step_type,
                options.get("slug"),
                options.get("depends_on", ()),
                {name: options.get(name) for name in OPTION_MINIMUMS},
                options.get("max_concurrency"),
            )
            return func

        return register(handler) if handler is not None else register

    def _resolve(self, where: str, ref: DependencyRef) -> str:
        if isinstance(ref, str):
            if ref not in self._steps:
                raise FlowDefinitionError(
                    f"{where} depends on undefined step {ref!r}; define that step first"
                )
            return ref
        if callable(ref):
            found = self._slug_by_handler.get(id(ref))
            if found is None or self._steps[found].handler is not ref:
                name = getattr(ref, "__name__", repr(ref))
                raise FlowDefinitionError(
                    f"{where} depends on {name}(), which is not a step of flow {self.slug!r}; "
                    "define it with this flow's @step or @map first"
                )
            return found
        raise FlowDefinitionError(
            f"{where}: depends_on takes step slugs or step functions, not {ref!r}"
        )

    def _add(
        self,
        handler: Callable[..., Any],
        step_type: str,
        slug: str | None,
        depends_on: Sequence[DependencyRef] | DependencyRef,
        options: dict[str, int | None],
        max_concurrency: int | None = None,
    ) -> None:
        step_slug = slug if slug is not None else getattr(handler, "__name__", None)
        where = f"Flow {self.slug!r}, step {step_slug!r}"
        problem = slug_problem(step_slug)
        if problem is not None:
            hint = "" if slug is not None else "; name the function differently or pass slug=..."
            raise FlowDefinitionError(f"{where}: the step slug {problem}{hint}")
        assert isinstance(step_slug, str)
        if step_slug in _RESERVED_STEP_SLUGS:
            raise FlowDefinitionError(
                f"{where}: {step_slug!r} is reserved (task inputs use it for the flow input); "
                "choose another slug"
            )
        if step_slug in self._steps:
            raise FlowDefinitionError(f"{where}: a step with this slug already exists in the flow")
        refs: Iterable[DependencyRef]
        if isinstance(depends_on, str) or callable(depends_on):
            refs = [depends_on]
        else:
            refs = list(depends_on)
        deps: list[str] = []
        for ref in refs:
            dep = self._resolve(where, ref)
            if dep in deps:
                raise FlowDefinitionError(f"{where} lists dependency {dep!r} twice")
            deps.append(dep)
        if step_type == "map" and len(deps) > 1:
            raise FlowDefinitionError(
                f"{where}: a map step can depend on at most one step (the one whose array it "
                f"maps over), got {deps}; add a step that combines them first"
            )
        _check_options(where, options)
        limit = _limit(where, "max_concurrency", max_concurrency)
        annotation, takes_context = _handler_signature(where, handler)
        definition = StepDefinition(
            slug=step_slug,
            handler=handler,
            depends_on=tuple(deps),
            step_type=step_type,
            input_type=annotation,
            takes_context=takes_context,
            max_concurrency=limit,
            **options,
        )
        self._steps[step_slug] = definition
        self._slug_by_handler.setdefault(id(handler), step_slug)

    # --- reading -------------------------------------------------------------

    def options(self) -> dict[str, int | None]:
        """The flow options set explicitly (None when left to pgflow's defaults)."""
        return {
            "max_attempts": self.max_attempts,
            "base_delay": self.base_delay,
            "timeout": self.timeout,
        }

    def limits(self) -> FlowLimits | None:
        """The concurrency limits the workers hold for this flow across all processes
        (None: none). They are not part of pgflow's flow definition: each worker
        writes them to ``pgflow_sa.flow_limits`` when it starts."""
        steps = {s.slug: s.max_concurrency for s in self.steps if s.max_concurrency is not None}
        if self.max_concurrency is None and self.max_running_runs is None and not steps:
            return None
        return FlowLimits(self.max_concurrency, self.max_running_runs, steps)

    @property
    def steps(self) -> tuple[StepDefinition, ...]:
        """The steps in definition order (pgflow's step_index order)."""
        return tuple(self._steps.values())

    def get_step(self, slug: str) -> StepDefinition:
        try:
            return self._steps[slug]
        except KeyError:
            raise KeyError(
                f"flow {self.slug!r} has no step {slug!r} (steps: {list(self._steps)})"
            ) from None

    def handler(self, slug: str) -> Callable[..., Any]:
        """The handler of a step, e.g. to call it in a unit test."""
        return self.get_step(slug).handler

    @property
    def leaf_steps(self) -> tuple[StepDefinition, ...]:
        """Steps nothing depends on: their outputs make the run output."""
        used = {dep for step in self._steps.values() for dep in step.depends_on}
        return tuple(s for s in self._steps.values() if s.slug not in used)

    @property
    def input_type(self) -> Any:
        """The declared flow input type: ``input_type=`` or the first annotated root
        step's input (``list[T]`` for a root map over T); None when undeclared."""
        if self._input_type is not None:
            return self._input_type
        for step in self._steps.values():
            if step.is_root and step.input_type is not None:
                return list[step.input_type] if step.is_map else step.input_type  # type: ignore[name-defined]
        return None

    def validate_input(self, value: Any) -> Any:
        """Check a flow input before starting a run; returns it as JSON-ready data
        (a pydantic model becomes a dict). Raises InvalidInputError saying what is wrong."""
        from pydantic import PydanticUserError, TypeAdapter, ValidationError
        from pydantic_core import PydanticSerializationError

        where = f"invalid input for flow {self.slug!r}"
        if self.has_root_map and not isinstance(value, (list, tuple)):
            root = next(s.slug for s in self._steps.values() if s.is_root and s.is_map)
            raise InvalidInputError(
                f"{where}: its root map step {root!r} maps over the flow input, so the input "
                f"must be a JSON array, not {type(value).__name__}"
            )
        input_type = self.input_type
        if input_type is not None:
            try:
                adapter: TypeAdapter[Any] = TypeAdapter(input_type)
            except PydanticUserError as exc:
                first = str(exc).splitlines()[0]
                raise FlowDefinitionError(
                    f"Flow {self.slug!r}: its input type {input_type!r} cannot be validated: {first}"
                ) from None
            try:
                value = adapter.dump_python(adapter.validate_python(value), mode="json")
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}"
                    for err in exc.errors()
                )
                raise InvalidInputError(f"{where}: {problems}") from None
            except PydanticSerializationError as exc:
                raise InvalidInputError(f"{where}: it is not JSON-serialisable ({exc})") from None
        return Flow.check_json(self.slug, value)

    @staticmethod
    def check_json(flow_slug: str, value: Any) -> Any:
        """``value`` if it can be stored as JSON (tuples become lists), else InvalidInputError."""
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"invalid input for flow {flow_slug!r}: it is not JSON-serialisable ({exc})"
            ) from None
        return list(value) if isinstance(value, tuple) else value

    @property
    def has_root_map(self) -> bool:
        return any(s.is_root and s.is_map for s in self._steps.values())

    def shape(self) -> FlowShape:
        """The flow as pgflow stores it (flow options resolved to pgflow's defaults)."""
        if not self._steps:
            raise FlowDefinitionError(
                f"Flow {self.slug!r} has no steps; add at least one with @flow.step"
            )
        flow_options = {
            name: FLOW_DEFAULTS[name] if value is None else value
            for name, value in self.options().items()
        }
        return FlowShape(
            slug=self.slug,
            max_attempts=flow_options["max_attempts"],
            base_delay=flow_options["base_delay"],
            timeout=flow_options["timeout"],
            steps=tuple(
                StepShape(
                    slug=s.slug,
                    step_type=s.step_type,
                    deps=tuple(sorted(s.depends_on)),
                    **s.options(),
                )
                for s in self._steps.values()
            ),
        )
