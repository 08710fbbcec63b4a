"""The ``pgflow-sa`` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any, TypeVar

import click

from . import __version__
from .compiler import compile_flow
from .config import DATABASE_URL_ENV, default_data_dir, mask_password, resolve_database_url
from .dsl import Flow
from .embedded import EmbeddedServer
from .exceptions import PgflowSaError
from .registry import FlowRegistry, load_registry
from .schema.installer import check_schema, install_schema

F = TypeVar("F", bound=Callable[..., Any])

database_url_option = click.option(
    "--database-url",
    metavar="URL",
    help=(
        f"PostgreSQL URL (libpq or SQLAlchemy form). Default: ${DATABASE_URL_ENV}, then "
        "[tool.pgflow-sa] database-url in pyproject.toml, then the embedded server."
    ),
)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def clean_errors(command: F) -> F:
    """Report pgflow-sa errors as one line on stderr with exit code 1, no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PgflowSaError as exc:
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _database_url(explicit: str | None) -> str:
    """The URL to use, starting the embedded server when nothing is configured."""
    resolved = resolve_database_url(explicit)
    if resolved is not None:
        return resolved.url
    server = EmbeddedServer(default_data_dir())
    url = server.start()
    click.echo(f"using the embedded PostgreSQL at {url} (files in {server.data_dir})", err=True)
    return url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgflow-sa")
def cli() -> None:
    """pgflow-sa: pgflow workflows on PostgreSQL, for SQLAlchemy and Alembic."""


@cli.command()
@database_url_option
@click.option(
    "--check",
    is_flag=True,
    help="Report the status without changing anything; exit code 0 installed, "
    "3 missing, 4 outdated.",
)
@clean_errors
def install(database_url: str | None, check: bool) -> None:
    """Install (or upgrade) pgmq, realtime.send and the pinned pgflow schema.

    Idempotent and safe to run concurrently; one transaction. A pgflow schema
    installed by another tool is left as it is.
    """
    url = _database_url(database_url)
    click.echo(f"database: {mask_password(url)}")
    if check:
        status = check_schema(url)
        for line in status.describe():
            click.echo(line)
        sys.exit(status.state.exit_code)
    report = install_schema(url)
    for action in report.actions or ["nothing to do"]:
        click.echo(action)
    for line in report.status_after.describe():
        click.echo(line)


@cli.group("dev-db")
def dev_db() -> None:
    """The embedded PostgreSQL used when no database URL is configured."""


@dev_db.command("start")
@clean_errors
def dev_db_start() -> None:
    """Start the embedded server (or find it running) and print its URL."""
    click.echo(EmbeddedServer(default_data_dir()).start())


@dev_db.command("url")
@clean_errors
def dev_db_url() -> None:
    """Print the URL of the embedded server, starting it if needed."""
    click.echo(EmbeddedServer(default_data_dir()).start())


@dev_db.command("status")
@clean_errors
def dev_db_status() -> None:
    """Say whether the embedded server runs (exit code 0 running, 3 stopped)."""
    status = EmbeddedServer(default_data_dir()).status()
    if status.running:
        click.echo(f"running: {status.url} (files in {status.data_dir})")
        return
    click.echo(f"stopped (files in {status.data_dir})")
    sys.exit(3)


@dev_db.command("stop")
@clean_errors
def dev_db_stop() -> None:
    """Stop the embedded server."""
    server = EmbeddedServer(default_data_dir())
    click.echo("stopped" if server.stop() else "not running")


def _selected(registry: FlowRegistry, slugs: tuple[str, ...]) -> list[Flow]:
    for slug in slugs:
        if slug not in registry:
            known = ", ".join(f.slug for f in registry) or "none"
            raise PgflowSaError(f"no flow {slug!r} in this APP (its flows: {known})")
    return [registry.get(s) for s in slugs] if slugs else list(registry)


def _describe_options(options: Mapping[str, int | None]) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items() if v is not None)


@cli.group()
def flows() -> None:
    """Inspect the flows of an APP (an import path such as myapp.flows:registry)."""


@flows.command("list")
@click.argument("app")
@clean_errors
def flows_list(app: str) -> None:
    """List the flows of APP with their steps, dependencies and options."""
    registry = load_registry(app)
    for flow in registry:
        shape = flow.shape()
        click.echo(f"{flow.slug}  ({_describe_options(shape.options())})")
        width = max(len(s.slug) for s in flow.steps)
        for index, step in enumerate(flow.steps):
            deps = f"<- {', '.join(step.depends_on)}" if step.depends_on else "(root)"
            options = _describe_options(step.options())
            line = f"  {index:>2} {step.slug:<{width}}  {step.step_type:<6}  {deps}"
            click.echo(f"{line}  {options}".rstrip())


@cli.command("compile")
@click.argument("app")
@click.argument("flow_slugs", nargs=-1, metavar="[FLOW]...")
@clean_errors
def compile_command(app: str, flow_slugs: tuple[str, ...]) -> None:
    """Print the SQL that creates the flows of APP (all, or the FLOWs named)."""
    chosen = _selected(load_registry(app), flow_slugs)
    for number, flow in enumerate(chosen):
        if number:
            click.echo("")
        for statement in compile_flow(flow):
            click.echo(statement)


def main() -> None:
    cli(prog_name="pgflow-sa")
