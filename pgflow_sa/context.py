"""The context a step handler receives as its second argument."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What a handler knows about the task it runs.

    Workers build one per task. For unit tests, build one directly::

        ctx = Context(flow_slug="article", step_slug="fetch", flow_input={"url": "x"})
        result = article.handler("fetch")({"url": "x"}, ctx)
    """

    flow_slug: str
    step_slug: str
    flow_input: Any = None
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)
    task_index: int = 0
    attempt: int = 1
    worker_id: uuid.UUID | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("pgflow_sa.handler"))
