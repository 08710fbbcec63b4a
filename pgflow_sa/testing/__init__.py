"""Testing kit: run flows in-process and unit-test handlers.

``run_flow`` / ``run_flow_async`` drive a run to its end with the real pgflow SQL;
``Context`` builds a handler context for unit tests without a database. The
pytest plugin (``pgflow_sa.testing.plugin``) provides database fixtures.
"""

from ..context import Context
from .runner import InjectedFailure, RunStuckError, run_flow, run_flow_async

__all__ = ["Context", "InjectedFailure", "RunStuckError", "run_flow", "run_flow_async"]
