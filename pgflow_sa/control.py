"""Run control in the caller's transaction: cancel a run in progress, retry a run
that failed (or was cancelled).

::

    with engine.begin() as conn:
        cancel_run(conn, run_id, reason="customer asked")
    with engine.begin() as conn:
        again = retry_run(conn, run_id, reuse_outputs=True)

Nothing here commits or rolls back on the caller's behalf: a transaction that rolls
back cancels or retries nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from . import events
from ._db import translated, translated_async
from .client import (
    get_run,
    get_run_async,
    parse_run_id,
    start_flow,
    start_flow_async,
)
from .exceptions import RunNotFoundError, RunStateError
from .models import Run
from .schema import control
from .schema.functions import AsyncExecutor, SyncExecutor


def _cancellable(rid: uuid.UUID, row: Any) -> str:
    """The run's flow slug, when the run is in progress; else a specific error."""
    if row is None:
        raise RunNotFoundError(f"there is no run {rid} in this database")
    if row.status != "started":
        raise RunStateError(
            f"run {rid} has already {row.status}: only a run in progress can be cancelled "
            "(retry_run starts a failed run again)"
        )
    return str(row.flow_slug)


def _reason(reason: str | None) -> str | None:
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"reason must be a string, not {reason!r}")
    return reason or None


@translated
def cancel_run(conn: SyncExecutor, run_id: uuid.UUID | str, *, reason: str | None = None) -> Run:
    """Cancel a run in progress in the transaction of ``conn`` (a Connection or
    Session); returns it as it is now (status ``cancelled``).

    Its queued messages are archived, so no new task starts; its unfinished tasks and
    steps are failed with "Cancelled: <reason>", and a ``run:failed`` event is sent, so
    that workers cancel the handlers still running (async handlers are cancelled, sync
    handlers see ``ctx.cancelled``) and nothing they settle later counts. A finished
    run raises :class:`RunStateError`; an unknown one :class:`RunNotFoundError`."""
    rid, why = parse_run_id(run_id), _reason(reason)
    slug = _cancellable(rid, conn.execute(control.lock_run(rid)).first())
    conn.execute(*control.archive(rid, slug))
    conn.execute(*control.cancel(rid, slug, why))
    events.emit("run.cancel", flow_slug=slug, run_id=str(rid), reason=why)
    run = get_run(conn, rid)
    assert run is not None
    return run


@translated_async
async def cancel_run_async(
    conn: AsyncExecutor, run_id: uuid.UUID | str, *, reason: str | None = None
) -> Run:
    """:func:`cancel_run` for an AsyncConnection or AsyncSession."""
    rid, why = parse_run_id(run_id), _reason(reason)
    slug = _cancellable(rid, (await conn.execute(control.lock_run(rid))).first())
    await conn.execute(*control.archive(rid, slug))
    await conn.execute(*control.cancel(rid, slug, why))
    events.emit("run.cancel", flow_slug=slug, run_id=str(rid), reason=why)
    run = await get_run_async(conn, rid)
    assert run is not None
    return run


def _retryable(rid: uuid.UUID, run: Run | None) -> Run:
    if run is None:
        raise RunNotFoundError(f"there is no run {rid} in this database")
    if run.status.value == "started":
        raise RunStateError(
            f"run {rid} is still in progress: cancel it first (cancel_run), or wait for it"
        )
    if run.status.value == "completed":
        raise RunStateError(
            f"run {rid} completed: there is nothing to retry (start_flow starts a new run)"
        )
    return run


@translated
def retry_run(conn: SyncExecutor, run_id: uuid.UUID | str, *, reuse_outputs: bool = False) -> Run:
    """Start a new run of a failed or cancelled run's flow with the same input, in the
    transaction of ``conn``; the new run's ``retry_of`` names the original (and
    ``list_runs(retry_of=...)`` finds the retries of a run).

    With ``reuse_outputs`` every task that completed in the original run is completed
    in the new one with the same output instead of running again (pgflow-sa workers
    do this when they claim it), so only the part that failed runs again. Its inputs
    are the same: a task completes only after every step it depends on did."""
    rid = parse_run_id(run_id)
    conn.execute(control.lock_run(rid)).first()
    original = _retryable(rid, get_run(conn, rid, steps=False))
    run = start_flow(conn, original.flow_slug, original.input)
    conn.execute(control.record_retry(run.run_id, rid, bool(reuse_outputs)))
    events.emit("run.retry", flow_slug=run.flow_slug, run_id=str(run.run_id), retry_of=str(rid))
    return run.model_copy(update={"retry_of": rid})


@translated_async
async def retry_run_async(
    conn: AsyncExecutor, run_id: uuid.UUID | str, *, reuse_outputs: bool = False
) -> Run:
    """:func:`retry_run` for an AsyncConnection or AsyncSession."""
    rid = parse_run_id(run_id)
    (await conn.execute(control.lock_run(rid))).first()
    original = _retryable(rid, await get_run_async(conn, rid, steps=False))
    run = await start_flow_async(conn, original.flow_slug, original.input)
    await conn.execute(control.record_retry(run.run_id, rid, bool(reuse_outputs)))
    events.emit("run.retry", flow_slug=run.flow_slug, run_id=str(run.run_id), retry_of=str(rid))
    return run.model_copy(update={"retry_of": rid})
