"""OpenTelemetry spans for worker tasks (``pip install 'pgflow-sa[otel]'``).

::

    from pgflow_sa.contrib.opentelemetry import instrument

    uninstrument = instrument()  # uses the global tracer provider

Each task becomes a span ``pgflow.task <flow>.<step>`` with the attributes
``pgflow.flow_slug``, ``pgflow.step_slug``, ``pgflow.run_id``,
``pgflow.task_index`` and ``pgflow.attempt``; a failed or timed-out task sets
the span's status to error with the stored error message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import events
from ..exceptions import ConfigurationError


def instrument(tracer_provider: Any = None) -> Callable[[], None]:
    """Start tracing tasks; returns a function that stops it."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode
    except ImportError:
        raise ConfigurationError(
            "OpenTelemetry is not installed: pip install 'pgflow-sa[otel]'"
        ) from None
    tracer = trace.get_tracer("pgflow_sa", tracer_provider=tracer_provider)
    spans: dict[tuple[Any, ...], Any] = {}

    def on_event(event: events.Event) -> None:
        meta = event.metadata
        if not event.name.startswith("task."):
            return
        key = (meta.get("run_id"), meta.get("step_slug"), meta.get("task_index"))
        if event.name == "task.start":
            spans[key] = tracer.start_span(
                f"pgflow.task {meta.get('flow_slug')}.{meta.get('step_slug')}",
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    f"pgflow.{name}": meta[name]
                    for name in ("flow_slug", "step_slug", "run_id", "task_index", "attempt")
                    if meta.get(name) is not None
                },
            )
            return
        span = spans.pop(key, None)
        if span is None:
            return
        if event.name == "task.exception":
            span.set_status(Status(StatusCode.ERROR, str(meta.get("error"))))
            span.set_attribute("pgflow.error_kind", str(meta.get("kind")))
        span.end()

    return events.subscribe(on_event)
