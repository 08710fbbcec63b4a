"""The event loop behind the blocking wait API.

``wait_for_run(engine_or_url, ...)`` in sync code (Flask views, scripts, threads)
runs its coroutine on one daemon thread per process with an asyncio loop of its
own, and uses one async engine per database URL for the life of the process:
the LISTEN connection and the pool are shared by every blocking call, however
many threads make them, and nothing is built per call. At exit the engines are
disposed and the thread stopped; a forked child starts afresh (it never touches
its parent's connections).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import selectors
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import async_engine_from_url, to_sqlalchemy_url

T = TypeVar("T")

#: connections each engine keeps open between calls (the LISTEN connection is
#: closed when no wait is left)
POOL_SIZE = 2
MAX_OVERFLOW = 20
SHUTDOWN_TIMEOUT = 5.0


class _Background:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._engines: dict[str, AsyncEngine] = {}

    def _ready(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            thread = self._thread
            if (
                self._loop is None
                or self._pid != os.getpid()
                or not thread
                or not thread.is_alive()
            ):
                # first use, or a forked child: the parent's loop and engines are not ours
                self._engines = {}
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="pgflow-sa waits", daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            return self._loop

    def _engine(self, target: Engine | str | URL) -> AsyncEngine:
        url = target.url if isinstance(target, Engine) else target
        key = to_sqlalchemy_url(url).render_as_string(hide_password=False)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = async_engine_from_url(
                    url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_pre_ping=True
                )
            return engine

    def call(self, target: Engine | str | URL, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        """Run ``work(engine)`` on the background loop and block until it is done
        (interrupting the caller, e.g. with Ctrl-C, cancels it)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "this is the blocking API and an event loop is running here: "
                "use the *_async function instead"
            )
        loop = self._ready()
        engine = self._engine(target)

        async def run() -> T:
            return await work(engine)

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Dispose of the engines and stop the thread (at exit)."""
        with self._lock:
            loop, thread, engines = self._loop, self._thread, list(self._engines.values())
            self._loop, self._thread, self._engines = None, None, {}
            if self._pid != os.getpid():
                return
        if loop is None or thread is None or not thread.is_alive():
            return
        for engine in engines:
            done = asyncio.run_coroutine_threadsafe(engine.dispose(), loop)
            try:
                done.result(SHUTDOWN_TIMEOUT)
            except Exception:  # at exit: a database that is gone is no reason to fail
                done.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SHUTDOWN_TIMEOUT)


_background = _Background()
call = _background.call
close = _background.close
atexit.register(close)

#: what a forked child inherited from its parent: kept, never closed, in the child
_INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    """A forked child shares its parent's epoll instance and sockets: closing the
    inherited loop or its connections here (at exit, or when they are collected)
    would unregister the parent's sockets and self-pipe from that shared epoll and
    leave the parent's waits hanging. So the child keeps them for ever, gives the
    loop a selector of its own for whatever its finalizers do, and starts afresh."""
    background = _background
    loop = background._loop
    if loop is not None:
        _INHERITED.append((loop, background._thread, dict(background._engines)))
        own = getattr(loop, "_selector", None)
        if own is not None:
            loop._selector = selectors.DefaultSelector()  # type: ignore[attr-defined]
    background._lock = threading.Lock()
    background._loop, background._thread, background._engines = None, None, {}


os.register_at_fork(after_in_child=_after_fork_in_child)
