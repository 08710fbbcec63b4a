"""Worker settings: documented defaults, each overridable by an environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from ..exceptions import ConfigurationError

ENV_PREFIX = "PGFLOW_SA_WORKER_"


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker polls, runs and stops. Environment: ``PGFLOW_SA_WORKER_<NAME>``
    (e.g. ``PGFLOW_SA_WORKER_MAX_CONCURRENCY=20``)."""

    #: tasks run at once by this process, over all its flows
    max_concurrency: int = 10
    #: most messages claimed per read (never more than the free slots)
    batch_size: int = 10
    #: a claimed message stays hidden for the flow's longest step timeout (as it is when
    #: claimed) plus this many seconds
    visibility_timeout: int = 2
    #: most seconds between reads of an idle queue when notifications wake the worker
    #: (it also reads when the next hidden message, a retry or a start delay, is due)
    poll_interval: float = 5.0
    #: seconds between reads of an idle queue when no notifications arrive
    fallback_poll_interval: float = 0.2
    #: seconds in-flight tasks get to finish after a stop request; the rest are handed back
    shutdown_timeout: float = 30.0
    #: seconds between heartbeats (pgflow.workers.last_heartbeat_at)
    heartbeat_interval: float = 5.0
    #: a worker that has not heartbeaten for this many seconds is gone: its started tasks
    #: are failed so that pgflow retries them (a live worker's tasks are never taken)
    stall_margin: int = 30
    #: seconds between checks for stalled tasks
    recovery_interval: float = 15.0
    #: most seconds to back off between attempts while the database is unreachable
    max_backoff: float = 5.0
    #: listen for notifications (pgflow-sa's publisher, pgmq notify-on-insert) to wake up
    use_notifications: bool = True
    #: fire the cron schedules its flows declare when they are due (the pytest plugin's
    #: worker does not, unless a test is marked ``pgflow_schedules``)
    fire_schedules: bool = True
    #: plan_cache_mode of the worker's own connections. pgflow's PL/pgSQL functions cache
    #: plans per session; "auto" (PostgreSQL's default) may settle on a generic plan,
    #: which connection_lifetime bounds; "force_custom_plan" plans every call for the
    #: table sizes at hand, at two to three times the cost of each complete_task.
    plan_cache_mode: str = "auto"
    #: enable_bitmapscan of the worker's protocol connections (not its handlers'
    #: sessions). pgflow's start_tasks finds a claim's tasks by message id; without
    #: fresh statistics (autovacuum off, or behind a fast-growing backlog) PostgreSQL
    #: may instead AND two bitmap indexes that match every queued task, and each claim
    #: then costs O(backlog) (56 ms instead of 4 with 200,000 runs waiting)
    enable_bitmapscan: bool = False
    #: seconds after which the worker's own connections are replaced (0: never)
    connection_lifetime: float = 3600.0

    def __post_init__(self) -> None:
        positive = (
            "max_concurrency",
            "batch_size",
            "visibility_timeout",
            "poll_interval",
            "fallback_poll_interval",
            "heartbeat_interval",
            "recovery_interval",
            "max_backoff",
            "stall_margin",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(
                    f"worker setting {name} must be positive, not {getattr(self, name)}"
                )
        if self.plan_cache_mode not in ("auto", "force_custom_plan", "force_generic_plan"):
            raise ConfigurationError(
                "worker setting plan_cache_mode must be auto, force_custom_plan or "
                f"force_generic_plan, not {self.plan_cache_mode!r}"
            )
        if self.stall_margin <= self.heartbeat_interval:
            raise ConfigurationError(
                f"worker setting stall_margin ({self.stall_margin} s) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval} s), or live workers would "
                "look gone"
            )
        for name in ("shutdown_timeout", "connection_lifetime"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"worker setting {name} must not be negative")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Defaults, then ``PGFLOW_SA_WORKER_*`` variables, then ``overrides`` (not None)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            kind = type(getattr(cls(), f.name))
            try:
                if kind is bool:
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    values[f.name] = kind(raw)
            except ValueError:
                raise ConfigurationError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
