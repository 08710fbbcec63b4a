"""The context a step handler receives as its second argument."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session


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
    session_factory: Callable[[], Session] | None = field(default=None, repr=False)
    async_session_factory: Callable[[], AsyncSession] | None = field(default=None, repr=False)
    cancel_event: threading.Event | None = field(default=None, repr=False)
    _session: Session | None = field(default=None, init=False, repr=False)
    _async_session: AsyncSession | None = field(default=None, init=False, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once the run has ended while this task runs (cancelled with
        ``cancel_run``, or failed by another task): nothing this handler returns or
        writes through ``ctx.session`` counts any more, so a long sync handler should
        check it and return early. (An async handler is cancelled instead.)"""
        return self.cancel_event is not None and self.cancel_event.is_set()

    @property
    def session(self) -> Session:
        """A sync ``Session`` whose transaction also completes this task: the handler's
        writes and the task's completion commit together, or roll back together when
        the handler raises. For sync handlers; don't commit it yourself."""
        if self._session is None:
            if self.session_factory is None:
                raise RuntimeError(
                    "ctx.session is for sync handlers of a worker with database access; "
                    "async handlers use ctx.async_session"
                )
            self._session = self.session_factory()
        return self._session

    @property
    def async_session(self) -> AsyncSession:
        """The ``AsyncSession`` counterpart of :attr:`session`, for async handlers."""
        if self._async_session is None:
            if self.async_session_factory is None:
                raise RuntimeError(
                    "ctx.async_session is for async handlers of a worker with database "
                    "access; sync handlers use ctx.session"
                )
            self._async_session = self.async_session_factory()
        return self._async_session

    @property
    def used_session(self) -> Session | None:
        return self._session

    @property
    def used_async_session(self) -> AsyncSession | None:
        return self._async_session
