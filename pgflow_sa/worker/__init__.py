"""The pgflow-sa worker: ``Worker(flows, url).run()`` or ``pgflow-sa worker APP``."""

from .lifecycle import WorkerStartupError
from .runtime import Worker
from .settings import WorkerSettings

__all__ = ["Worker", "WorkerSettings", "WorkerStartupError"]
