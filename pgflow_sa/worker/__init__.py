"""The pgflow-sa worker: ``Worker(flows, url).run()`` or ``pgflow-sa worker APP``."""

from .runtime import Worker, WorkerStartupError
from .settings import WorkerSettings

__all__ = ["Worker", "WorkerSettings", "WorkerStartupError"]
