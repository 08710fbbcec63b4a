"""The shape of a flow (steps, types, dependencies, options) and differences between shapes.

A shape is read from code (:meth:`pgflow_sa.Flow.shape`) or from a database
(:func:`pgflow_sa.schema.shapes.read_flow_shape`); :func:`diff_shapes` says what
differs, split into structural changes (pgflow flows cannot change structure in
place) and option changes (which can be updated in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: pgflow.create_flow's defaults (0.8.1): what a flow gets for options it leaves unset.
FLOW_DEFAULTS = {"max_attempts": 3, "base_delay": 5, "timeout": 60}
#: Step options, in the order pgflow.add_step (and the compiled SQL) takes them.
STEP_OPTION_NAMES = ("max_attempts", "base_delay", "timeout", "start_delay")


@dataclass(frozen=True)
class StepShape:
    slug: str
    step_type: str  # "single" or "map"
    deps: tuple[str, ...]  # sorted: pgflow keeps no order between dependencies
    max_attempts: int | None = None
    base_delay: int | None = None
    timeout: int | None = None
    start_delay: int | None = None

    def options(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in STEP_OPTION_NAMES}


@dataclass(frozen=True)
class FlowShape:
    slug: str
    max_attempts: int
    base_delay: int
    timeout: int
    steps: tuple[StepShape, ...]  # in step_index order

    def options(self) -> dict[str, int]:
        return {
            "max_attempts": self.max_attempts,
            "base_delay": self.base_delay,
            "timeout": self.timeout,
        }

    def step(self, slug: str) -> StepShape | None:
        for step in self.steps:
            if step.slug == slug:
                return step
        return None


@dataclass(frozen=True)
class OptionChange:
    """One option that differs; ``step`` is None for a flow option."""

    step: str | None
    option: str
    code: int | None
    database: int | None

    def describe(self) -> str:
        where = f"step {self.step!r}" if self.step else "flow"
        return f"{where} option {self.option}: database has {self.database}, code has {self.code}"


@dataclass(frozen=True)
class ShapeDiff:
    flow_slug: str
    structural: tuple[str, ...] = field(default=())
    options: tuple[OptionChange, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.structural or self.options)

    def describe(self) -> list[str]:
        lines = [f"structure: {line}" for line in self.structural]
        lines += [f"options: {change.describe()}" for change in self.options]
        return lines


def diff_shapes(code: FlowShape, database: FlowShape) -> ShapeDiff:
    """What differs between the flow in code and the flow in the database."""
    structural: list[str] = []
    code_slugs = [s.slug for s in code.steps]
    db_slugs = [s.slug for s in database.steps]
    for slug in code_slugs:
        if slug not in db_slugs:
            structural.append(f"step {slug!r} is in code but not in the database")
    for slug in db_slugs:
        if slug not in code_slugs:
            structural.append(f"step {slug!r} is in the database but not in code")
    common = [s for s in code_slugs if s in db_slugs]
    if common != [s for s in db_slugs if s in code_slugs]:
        structural.append(f"steps are in a different order: database {db_slugs}, code {code_slugs}")
    changes: list[OptionChange] = []
    for name, value in code.options().items():
        if database.options()[name] != value:
            changes.append(OptionChange(None, name, value, database.options()[name]))
    for slug in common:
        ours, theirs = code.step(slug), database.step(slug)
        assert ours is not None and theirs is not None
        if ours.step_type != theirs.step_type:
            structural.append(
                f"step {slug!r} is a {theirs.step_type} step in the database, "
                f"a {ours.step_type} step in code"
            )
        if ours.deps != theirs.deps:
            structural.append(
                f"step {slug!r} depends on {list(theirs.deps)} in the database, "
                f"on {list(ours.deps)} in code"
            )
        for name, step_value in ours.options().items():
            if theirs.options()[name] != step_value:
                changes.append(OptionChange(slug, name, step_value, theirs.options()[name]))
    return ShapeDiff(code.slug, tuple(structural), tuple(changes))
