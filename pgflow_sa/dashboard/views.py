"""What the pages show, computed from the client's typed results: durations, a
run's timeline, each task's input as its handler saw it, pretty JSON. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..models import Run, StepState, StepTask
from .dag import StepNode


def path_for(scope: Mapping[str, Any], name: str, **params: Any) -> str:
    """A route's root-relative path: the mount's ASGI ``root_path`` and the route's
    path. Never built from the Host header (a forged one was reflected in the links,
    and behind a TLS-terminating proxy they came out http://)."""
    return str(scope.get("root_path", "")) + str(scope["app"].router.url_path_for(name, **params))


#: characters of pretty JSON shown before "show all"
PREVIEW_CHARS = 600


@dataclass(frozen=True)
class Pretty:
    """Pretty JSON, and its first PREVIEW_CHARS characters when it is longer."""

    text: str
    preview: str | None


def pretty(value: Any) -> Pretty:
    text = json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return Pretty(text, text[:PREVIEW_CHARS] if len(text) > PREVIEW_CHARS else None)


def when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def seconds(start: datetime | None, end: datetime | None) -> str:
    """A duration; while ``end`` is None, the time elapsed so far (with a '+')."""
    if start is None:
        return ""
    finished = end is not None
    span = ((end or datetime.now(timezone.utc)) - start).total_seconds()
    text = (
        f"{span * 1000:.0f} ms"
        if span < 1
        else f"{span:.1f} s"
        if span < 120
        else f"{span / 60:.1f} min"
    )
    return text if finished else text + "+"


def run_end(run: Run) -> datetime | None:
    return run.completed_at or run.failed_at


def task_end(task: StepTask) -> datetime | None:
    return task.completed_at or task.failed_at


def task_input(
    run: Run,
    step: StepState,
    node: StepNode | None,
    task: StepTask,
    read: dict[str, StepState],
    totals: dict[str, int],
) -> Any:
    """The task's input as its handler received it: a root step the flow input, a
    dependent step ``{dep: output}``, a map task its element. pgflow 0.8.1 keeps no
    task input, so it is rebuilt from the run input and the dependencies' tasks in
    ``read`` (the page's window of tasks, and every step's task 0); a map step's
    whole output only when all its ``totals[slug]`` tasks were read."""
    deps = node.deps if node is not None else ()
    if step.step_type == "map":
        dep = read.get(deps[0]) if deps else None
        if deps and dep is not None and dep.step_type == "map":
            return next((t.output for t in dep.tasks if t.task_index == task.task_index), None)
        source = run.input if not deps else _output(dep, totals)
        if isinstance(source, list) and 0 <= task.task_index < len(source):
            return source[task.task_index]
        return None
    if not deps:
        return run.input
    return {slug: _output(read.get(slug), totals) for slug in deps}


def _output(state: StepState | None, totals: dict[str, int]) -> Any:
    if state is None or state.status.value != "completed":
        return None
    if state.step_type != "map":
        return next((t.output for t in state.tasks if t.task_index == 0), None)
    total = totals.get(state.step_slug, 0)
    if len(state.tasks) < total:
        return f"({total} outputs of step {state.step_slug}: see its tasks)"
    return [t.output for t in state.tasks]


@dataclass(frozen=True)
class Bar:
    label: str
    status: str
    left: float  # percent of the run's span
    width: float
    queued_width: float  # waiting before it started, drawn lighter, left of ``left``
    title: str


def timeline(run: Run) -> list[Bar]:
    """One bar per task, from its start to its end (or now), on the run's span; the
    time it waited in the queue is the lighter part before it."""
    start = run.started_at
    end = run_end(run) or datetime.now(timezone.utc)
    span = max((end - start).total_seconds(), 1e-3)

    def pct(moment: datetime) -> float:
        return min(100.0, max(0.0, (moment - start).total_seconds() / span * 100))

    bars = []
    for step in run.steps or ():
        for task in step.tasks:
            label = step.step_slug + (f"[{task.task_index}]" if step.step_type == "map" else "")
            queued = pct(task.queued_at)
            began = pct(task.started_at) if task.started_at else pct(task_end(task) or end)
            finished = pct(task_end(task) or end)
            bars.append(
                Bar(
                    label=label,
                    status=task.status.value,
                    left=began,
                    width=max(finished - began, 0.5),
                    queued_width=max(began - queued, 0.0),
                    title=f"{label}: {task.status.value}, "
                    f"{seconds(task.started_at, task_end(task))} (attempts {task.attempts_count})",
                )
            )
    return bars


def error_text(message: str | None, show_payloads: bool) -> str:
    """An error as the dashboard shows it: whole, or without payloads only what names
    its kind (the text before the first colon): the rest may quote inputs — a
    validation error repeats the value it refused."""
    if not message:
        return ""
    if show_payloads:
        return message
    kind = message.split(":", 1)[0].strip()
    if kind and len(kind) <= 80 and kind != message.strip():
        return f"{kind}: (details hidden with the payloads)"
    return "(hidden with the payloads)"
