"""``pgflow-sa runs list|show|cancel|retry``."""

from __future__ import annotations

import click

from ._cli_common import as_json, clean_errors, database_url_option, seconds, short, table, when
from ._cli_common import database_url as _database_url
from ._db import database_errors, sync_engine
from .client import get_run, list_runs, parse_run_id
from .control import cancel_run, retry_run
from .exceptions import PgflowSaError, RunNotFoundError
from .models import Run, RunStatus


@click.group()
def runs() -> None:
    """Inspect, cancel and retry runs."""


@runs.command("list")
@click.option("--flow", help="Only runs of this flow.")
@click.option(
    "--status", type=click.Choice([s.value for s in RunStatus]), help="Only runs in this status."
)
@click.option("--retry-of", metavar="RUN_ID", help="Only the retries of this run.")
@click.option("--limit", default=20, show_default=True, help="How many runs (newest first).")
@database_url_option
@clean_errors
def runs_list(
    flow: str | None, status: str | None, retry_of: str | None, limit: int, database_url: str | None
) -> None:
    """List runs, newest first."""
    url = _database_url(database_url)
    engine = sync_engine(url)
    with database_errors(url, PgflowSaError), engine.connect() as conn:
        page = list_runs(conn, flow=flow, status=status, retry_of=retry_of, limit=limit)
    rows = [
        [
            str(r.run_id),
            r.flow_slug,
            r.status.value,
            when(r.started_at),
            seconds(r.started_at, r.completed_at or r.failed_at),
            str(r.remaining_steps),
            short(r.error, 40),
        ]
        for r in page.runs
    ]
    for line in table(
        ["RUN", "FLOW", "STATUS", "STARTED (UTC)", "DURATION", "REMAINING", "ERROR"], rows
    ):
        click.echo(line)
    if page.next_cursor:
        click.echo(f"(more runs: raise --limit above {limit})")


@runs.command("show")
@click.argument("run_id")
@database_url_option
@clean_errors
def runs_show(run_id: str, database_url: str | None) -> None:
    """Show a run and a table of its steps."""
    rid = parse_run_id(run_id)
    url = _database_url(database_url)
    engine = sync_engine(url)
    with database_errors(url, PgflowSaError), engine.connect() as conn:
        run = get_run(conn, rid)
        retries = list_runs(conn, retry_of=rid, limit=10).runs
    if run is None:
        raise RunNotFoundError(f"there is no run {rid}")
    click.echo(f"run       {run.run_id}")
    click.echo(f"flow      {run.flow_slug}")
    click.echo(f"status    {run.status.value}")
    if run.retry_of is not None:
        click.echo(f"retry of  {run.retry_of}")
    if retries:
        click.echo(f"retried   {', '.join(str(r.run_id) for r in retries)}")
    click.echo(f"started   {when(run.started_at)} UTC")
    finished = run.completed_at or run.failed_at
    click.echo(f"finished  {when(finished)}{' UTC' if finished else ''}")
    click.echo(f"duration  {seconds(run.started_at, finished)}")
    click.echo(f"input     {short(as_json(run.input), 200)}")
    if run.status is RunStatus.COMPLETED:
        click.echo(f"output    {short(as_json(run.output), 200)}")
    if run.error:
        click.echo(f"error     {run.error}")
    click.echo("")
    rows = []
    for step in run.steps or ():
        done = sum(1 for t in step.tasks if t.status.value == "completed")
        tasks = f"{done}/{step.initial_tasks}" if step.initial_tasks is not None else "-"
        rows.append(
            [
                step.step_slug,
                step.step_type,
                step.status.value,
                tasks,
                str(step.attempts),
                seconds(step.started_at, step.completed_at or step.failed_at),
                short(step.error_message),
            ]
        )
    for line in table(["STEP", "TYPE", "STATUS", "TASKS", "ATTEMPTS", "DURATION", "ERROR"], rows):
        click.echo(line)


@runs.command("cancel")
@click.argument("run_id")
@click.option("--reason", help="Why (recorded, and shown as the run's error).")
@database_url_option
@clean_errors
def runs_cancel(run_id: str, reason: str | None, database_url: str | None) -> None:
    """Cancel a run in progress: no new task starts, workers cancel the handlers that
    run, and nothing they settle afterwards counts."""
    rid = parse_run_id(run_id)
    url = _database_url(database_url)
    engine = sync_engine(url)
    with database_errors(url, PgflowSaError), engine.begin() as conn:
        run = cancel_run(conn, rid, reason=reason)
    click.echo(f"cancelled run {run.run_id} of {run.flow_slug}: {run.error}")


@runs.command("retry")
@click.argument("run_id")
@click.option(
    "--reuse-outputs",
    is_flag=True,
    help="Complete the tasks that completed in the original run with the same output "
    "instead of running them again.",
)
@database_url_option
@clean_errors
def runs_retry(run_id: str, reuse_outputs: bool, database_url: str | None) -> None:
    """Start a failed or cancelled run again (same flow, same input), linked to it;
    prints the new run's id."""
    rid = parse_run_id(run_id)
    url = _database_url(database_url)
    engine = sync_engine(url)
    with database_errors(url, PgflowSaError), engine.begin() as conn:
        run: Run = retry_run(conn, rid, reuse_outputs=reuse_outputs)
    click.echo(str(run.run_id))
