"""Telemetry: the worker emits events; subscribe to count, log or trace them.

::

    from pgflow_sa import events

    def on_event(event: events.Event) -> None:
        if event.name == "task.exception":
            sentry_sdk.capture_message(event.metadata["error"])

    unsubscribe = events.subscribe(on_event)

Events (``measurements`` / ``metadata``):

- ``worker.start`` — / worker_id, flows, settings
- ``worker.stop`` — uptime_s / worker_id, reason
- ``poll`` — messages, duration_s / flow_slug, requested
- ``task.start`` — / flow_slug, step_slug, run_id, task_index, attempt
- ``task.stop`` — duration_s / same as task.start
- ``task.exception`` — duration_s / same as task.start, error, kind ("error", "timeout", "output")
- ``run.completed``, ``run.failed`` — / flow_slug, run_id (from notifications, which are
  hints: any role that can connect can send one, so count them, never act on them)
- ``tasks.recovered`` — count / flow_slugs (started tasks of workers that are gone, failed)
- ``tasks.handed_back`` — count / worker_id (unfinished at shutdown, returned to the queue)
- ``task.lost`` — / same as task.start (a settle found the task no longer this worker's)

A subscriber that raises is logged and otherwise ignored: telemetry never
breaks a worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("pgflow_sa.events")

EVENT_NAMES = (
    "worker.start",
    "worker.stop",
    "poll",
    "task.start",
    "task.stop",
    "task.exception",
    "run.completed",
    "run.failed",
    "tasks.recovered",
    "tasks.handed_back",
    "task.lost",
)


@dataclass(frozen=True)
class Event:
    name: str
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]
_subscribers: list[Subscriber] = []
_lock = threading.Lock()


def subscribe(callback: Subscriber) -> Callable[[], None]:
    """Call ``callback`` with every event; returns a function that unsubscribes."""
    with _lock:
        _subscribers.append(callback)

    def unsubscribe() -> None:
        with _lock:
            if callback in _subscribers:
                _subscribers.remove(callback)

    return unsubscribe


def has_subscribers() -> bool:
    """Whether anyone listens (lets emitters skip building costly events)."""
    return bool(_subscribers)


def emit(name: str, measurements: dict[str, float] | None = None, /, **metadata: Any) -> None:
    """Send an event to every subscriber (cheap when there is none)."""
    if not _subscribers:
        return
    event = Event(name, measurements or {}, metadata)
    for callback in list(_subscribers):
        try:
            callback(event)
        except Exception:
            logger.exception("telemetry subscriber %r failed on %s", callback, name)
