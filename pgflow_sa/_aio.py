"""Two asyncio helpers the long-running loops share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def first_of(*events: asyncio.Event) -> None:
    """Return when any of the events is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def together(*loops: Awaitable[None]) -> None:
    """Run ``loops`` until all have returned; the first that raises cancels the others
    (and its error is raised), so none is left running unsupervised."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
