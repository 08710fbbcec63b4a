"""The one retry rhythm (worker, listeners, waits): exponential backoff with jitter, capped."""

from __future__ import annotations

import asyncio
import contextlib
import random


class Backoff:
    """Delays of ``first``, about twice as long each time, at most ``cap`` seconds
    (each drawn between half and all of the nominal delay, so that many workers
    retrying together spread out). :meth:`reset` after a success."""

    def __init__(self, cap: float, first: float = 0.1) -> None:
        self.first = min(first, cap)
        self.cap = cap
        self._nominal = self.first

    def next_delay(self) -> float:
        delay = self._nominal * random.uniform(0.5, 1.0)
        self._nominal = min(self._nominal * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._nominal = self.first

    async def sleep(self, stopping: asyncio.Event | None = None) -> float:
        """Wait the next delay (cut short when ``stopping`` is set); returns it."""
        delay = self.next_delay()
        if stopping is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
        return delay
