"""``pgflow-sa schedules list|pause|resume|trigger``."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from .._cli_common import clean_errors, database_url_option
from .._cli_common import database_url as _database_url
from .._cli_common import table as _table
from ..registry import load_registry
from .cron import zone
from .manage import list_schedules, pause_schedule, resume_schedule, trigger_schedule


def _at(value: datetime | None, tz: str | None = None) -> str:
    if value is None:
        return "-"
    local = value.astimezone(zone(tz) if tz else timezone.utc)  # tz: a valid one
    return local.strftime("%Y-%m-%d %H:%M:%S %Z")


@click.group()
def schedules() -> None:
    """List, pause, resume and trigger the schedules stored in the database."""


@schedules.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule.")
@database_url_option
@clean_errors
def schedules_list(as_json: bool, database_url: str | None) -> None:
    """The schedules, with their next fire time in their time zone and in UTC; one
    whose stored definition no worker can fire is shown as invalid, with why."""
    now = datetime.now(timezone.utc)
    found = list_schedules(_database_url(database_url))
    if as_json:
        for item in found:
            upcoming = item.upcoming(now)
            click.echo(
                json.dumps(
                    {
                        "name": item.name,
                        "flow_slug": item.flow_slug,
                        "cron": item.cron,
                        "timezone": item.timezone,
                        "catch_up": item.catch_up,
                        "paused": item.paused,
                        "problem": item.problem,
                        "next_fire_at": upcoming.isoformat() if upcoming else None,
                        "last_fired_tick": (
                            item.last_fired_tick.isoformat() if item.last_fired_tick else None
                        ),
                    }
                )
            )
        return
    rows = []
    problems = []
    for item in found:
        upcoming = item.upcoming(now)
        state = "paused" if item.paused else "active"
        if item.problem is not None:
            state = "invalid"
            problems.append(f"{item.name}: {item.problem} (no worker fires it)")
        rows.append(
            [
                item.name,
                item.flow_slug,
                item.cron,
                state,
                _at(upcoming, None if item.problem else item.timezone),
                _at(upcoming),
                _at(item.last_fired_tick),
                item.catch_up,
            ]
        )
    headers = [
        "NAME",
        "FLOW",
        "CRON",
        "STATE",
        "NEXT (LOCAL)",
        "NEXT (UTC)",
        "LAST TICK",
        "CATCH-UP",
    ]
    for line in _table(headers, rows):
        click.echo(line)
    for line in problems:
        click.echo(line)


@schedules.command("pause")
@click.argument("name")
@database_url_option
@clean_errors
def schedules_pause(name: str, database_url: str | None) -> None:
    """Stop firing schedule NAME (until resume)."""
    pause_schedule(_database_url(database_url), name)
    click.echo(f"paused {name}")


@schedules.command("resume")
@click.argument("name")
@database_url_option
@clean_errors
def schedules_resume(name: str, database_url: str | None) -> None:
    """Fire schedule NAME again, from its next tick on (missed ticks are not caught up);
    nothing changes if it is not paused."""
    resume_schedule(_database_url(database_url), name)
    click.echo(f"resumed {name}")


@schedules.command("trigger")
@click.argument("name")
@click.option(
    "--app",
    metavar="APP",
    help="The flows (package.module:attribute), for a schedule whose input is computed in code.",
)
@database_url_option
@clean_errors
def schedules_trigger(name: str, app: str | None, database_url: str | None) -> None:
    """Start one run of schedule NAME now (also while paused); prints the run id."""
    registry = load_registry(app) if app else None
    flows = list(registry) if registry is not None else []
    run_id = trigger_schedule(_database_url(database_url, registry), name, flows=flows)
    click.echo(str(run_id))
