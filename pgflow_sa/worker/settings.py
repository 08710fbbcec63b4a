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
    #: seconds a read hides a message before start_tasks extends it to the step timeout + 2
    visibility_timeout: int = 2
    #: seconds between reads of an idle queue when woken by notifications
    poll_interval: float = 1.0
    #: seconds between reads of an idle queue when no notifications arrive
    fallback_poll_interval: float = 0.2
    #: threads for sync handlers (0: as many as max_concurrency)
    sync_threads: int = 0
    #: seconds in-flight tasks get to finish after a stop request; the rest are handed back
    shutdown_timeout: float = 30.0
    #: seconds between heartbeats (pgflow.workers.last_heartbeat_at)
    heartbeat_interval: float = 5.0
    #: a started task is stalled (its worker died) after its step timeout plus this many seconds
    stall_margin: int = 30
    #: seconds between checks for stalled tasks
    recovery_interval: float = 15.0
    #: most seconds to back off between attempts while the database is unreachable
    max_backoff: float = 5.0
    #: listen for notifications (pgflow-sa's publisher, pgmq notify-on-insert) to wake up
    use_notifications: bool = True

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
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(
                    f"worker setting {name} must be positive, not {getattr(self, name)}"
                )
        for name in ("sync_threads", "shutdown_timeout", "stall_margin"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"worker setting {name} must not be negative")

    @property
    def thread_count(self) -> int:
        return self.sync_threads or self.max_concurrency

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
