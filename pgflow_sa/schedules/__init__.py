"""Schedules: flows started at cron ticks by the workers already running.

Declared in code with :meth:`pgflow_sa.Flow.schedule` (``definition``), stored in
``pgflow_sa.schedules`` by ``pgflow-sa flows deploy`` or Alembic (``manage``), fired
by every worker that serves the flow, each tick once (``firing``, run by
``pgflow_sa.worker.scheduler``). This package imports only the definition, so that
the DSL can use it; the functions are in ``manage`` and ``firing`` (and at the top
level of ``pgflow_sa``)."""

from .cron import due_ticks, next_tick
from .definition import CATCH_UP_POLICIES, SKIP_GRACE_SECONDS, CatchUp, Schedule

__all__ = [
    "CATCH_UP_POLICIES",
    "SKIP_GRACE_SECONDS",
    "CatchUp",
    "Schedule",
    "due_ticks",
    "next_tick",
]
