"""The ``pgflow-sa`` command line."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import sys
import uuid
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

import click
from sqlalchemy.pool import NullPool

from . import __version__, events
from ._cli_common import as_json as _json
from ._cli_common import clean_errors, database_url_option
from ._cli_common import database_url as _database_url
from ._cli_common import fail as _fail
from ._cli_common import table as _table
from ._cli_common import when as _when
from ._db import database_errors, sync_engine
from .client import (
    flow_status,
    get_run_async,
    parse_run_id,
    start_flow_async,
)
from .compiler import compile_flow
from .config import (
    async_engine_from_url,
    default_data_dir,
    embedded_database_url,
    mask_password,
)
from .dsl import Flow
from .embedded import EmbeddedServer
from .exceptions import (
    DashboardUnavailableError,
    FlowNotFoundError,
    InvalidInputError,
    PgflowSaError,
    RunTimeoutError,
    deploy_advice,
)
from .models import RunStatus
from .registry import FlowRegistry, load_registry
from .schema.deploy import deploy_flows
from .schema.installer import SchemaState, check_schema, install_schema
from .schema.roles import (
    DEFAULT_CLIENT_ROLE,
    DEFAULT_WORKER_ROLE,
    grant_roles,
    grant_statements,
)
from .waiting import watch_run


def _target(url: str) -> str:
    """Where a URL really leads (libpq fills in what it leaves out: host, port, user,
    database), read from the connection itself."""
    with database_errors(url, PgflowSaError), sync_engine(url).connect() as conn:
        info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
        return f"host {info.host}, port {info.port}, database {info.dbname}, user {info.user}"


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
    click.echo(f"database: {mask_password(url)} ({_target(url)})")
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


@cli.command()
@click.option(
    "--worker-role",
    default=DEFAULT_WORKER_ROLE,
    show_default=True,
    metavar="NAME",
    help="The role for pgflow-sa workers.",
)
@click.option(
    "--client-role",
    default=DEFAULT_CLIENT_ROLE,
    show_default=True,
    metavar="NAME",
    help="The role for apps that start and read runs.",
)
@click.option("--no-create", is_flag=True, help="Fail if a role is missing instead of creating it.")
@click.option(
    "--sql",
    "print_sql",
    is_flag=True,
    help="Print the SQL statements instead of running them (needs no database).",
)
@database_url_option
@clean_errors
def roles(
    worker_role: str,
    client_role: str,
    no_create: bool,
    print_sql: bool,
    database_url: str | None,
) -> None:
    """Create (NOLOGIN, when missing) and grant a worker role and a client role.

    The worker role may claim, complete and fail tasks and heartbeat; the client role
    may start runs and read them. Run it as the role that deploys flows: queue tables
    of flows deployed later are then granted by its default privileges. Idempotent.
    """
    statements = grant_statements(worker_role, client_role, create=not no_create)  # checks names
    if print_sql:
        for statement in statements:
            click.echo(f"{statement};")
        return
    url = _database_url(database_url)
    click.echo(f"database: {mask_password(url)}")
    report = grant_roles(url, worker_role, client_role, create=not no_create)
    for line in report.describe():
        click.echo(line)


@cli.group("dev-db")
def dev_db() -> None:
    """The embedded PostgreSQL used when no database URL is configured."""


@dev_db.command("start")
@clean_errors
def dev_db_start() -> None:
    """Start the embedded server (or find it running) and print its URL."""
    click.echo(embedded_database_url())


@dev_db.command("url")
@clean_errors
def dev_db_url() -> None:
    """Print the URL of the embedded server, starting it if needed."""
    click.echo(embedded_database_url())


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


#: exit codes of `start --wait`
EXIT_RUN_FAILED = 3
EXIT_WAIT_TIMEOUT = 4


async def _start_and_follow(
    url: str, flow: Flow | str, value: Any, run_id: uuid.UUID | None, wait: bool, timeout: float
) -> int:
    engine = async_engine_from_url(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            run = await start_flow_async(conn, flow, value, run_id=run_id)
        verb = "started" if run.created else "already existed"
        click.echo(f"run {run.run_id} {verb} (flow {run.flow_slug})", err=True)
        if not wait:
            click.echo(str(run.run_id))
            return 0
        async with engine.connect() as conn:
            current = await get_run_async(conn, run.run_id)
        assert current is not None and current.steps is not None
        total = len(current.steps)
        shown = -1
        try:
            async for event in watch_run(engine, run.run_id, timeout=timeout):
                if event.step_slug is not None and event.status != "completed":
                    continue
                async with engine.connect() as conn:
                    now = await get_run_async(conn, run.run_id, steps=False)
                if now is not None and total - now.remaining_steps != shown:
                    shown = total - now.remaining_steps
                    click.echo(f"{shown}/{total} steps done", err=True)
        except RunTimeoutError as exc:
            _fail(str(exc), EXIT_WAIT_TIMEOUT)
        async with engine.connect() as conn:
            final = await get_run_async(conn, run.run_id)
        assert final is not None
        if final.status in (RunStatus.FAILED, RunStatus.CANCELLED):
            _fail(f"run {final.run_id} {final.status.value}: {final.error}", EXIT_RUN_FAILED)
        click.echo(_json(final.output))
        return 0
    finally:
        await engine.dispose()


def _input_value(text: str) -> tuple[Any, str]:
    """The ``--input`` value and where it came from: JSON itself, ``@FILE`` (read from a
    file, as curl's ``-d @file``) or ``-`` (read from stdin); large inputs need no
    argument of their own size."""
    if text == "-":
        source = "--input (stdin)"
        raw = sys.stdin.read()
    elif text.startswith("@"):
        path = text[1:]
        source = f"--input file {path!r}"
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InvalidInputError(f"cannot read {source}: {reason}") from None
    else:
        source, raw = "--input", text
    try:
        return json.loads(raw), source
    except ValueError as exc:
        raise InvalidInputError(f"{source} is not valid JSON: {exc}") from None


@cli.command()
@click.argument("flow")
@click.option(
    "--app",
    metavar="APP",
    help="The flows (package.module:attribute): FLOW's input is checked against its "
    "declared input type before anything is started.",
)
@click.option(
    "--input",
    "input_text",
    default="{}",
    show_default=True,
    metavar="JSON|@FILE|-",
    help="The flow input: JSON, @FILE to read it from a file, - to read it from stdin.",
)
@click.option("--run-id", metavar="UUID", help="Run id to use (starting it twice starts one run).")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the run, show progress, print its output. Exit code 3 if the run "
    "fails, 4 on timeout.",
)
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait with --wait.")
@database_url_option
@clean_errors
def start(
    flow: str,
    app: str | None,
    input_text: str,
    run_id: str | None,
    wait: bool,
    timeout: float,
    database_url: str | None,
) -> None:
    """Start a run of FLOW (a flow slug) and print its id.

    With --app, the input is checked against the flow's declared input type (and
    converted as the flow's type dumps it) before anything is started; without it,
    only that it is JSON.
    """
    value, source = _input_value(input_text)
    target: Flow | str = flow
    registry: FlowRegistry | None = None
    if app is not None:
        registry = load_registry(app)
        declared = _selected(registry, (flow,))[0]
        try:
            value = declared.validate_input(value)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{source}: {exc}") from None
        target = declared
    rid = parse_run_id(run_id) if run_id is not None else None
    url = _database_url(database_url, registry)
    try:
        with database_errors(url, PgflowSaError):
            code = asyncio.run(_start_and_follow(url, target, value, rid, wait, timeout))
    except FlowNotFoundError:
        if app is None:
            raise
        raise FlowNotFoundError(
            f"flow {flow!r} is not in this database: {deploy_advice([flow], app)}"
        ) from None
    sys.exit(code)


@cli.command()
@click.option(
    "--window",
    default=3600,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds back to count completed and failed runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per flow).")
@database_url_option
@clean_errors
def status(window: int, as_json: bool, database_url: str | None) -> None:
    """Show each flow's queue, runs (cancelled and retried too), tasks waiting on a
    concurrency limit and live workers."""
    url = _database_url(database_url)
    schema = check_schema(url)
    if schema.state is SchemaState.MISSING:
        raise PgflowSaError(
            f"pgflow is not installed in the database at {mask_password(url)}: "
            "run pgflow-sa install"
        )
    engine = sync_engine(url)
    with database_errors(url, PgflowSaError), engine.connect() as conn:
        flows = flow_status(conn, window_seconds=window)
    if as_json:
        click.echo(json.dumps([f.model_dump(mode="json") for f in flows], indent=2))
        return
    span = f"{window // 3600}h" if window % 3600 == 0 else f"{window}s"
    rows = [
        [
            f.flow_slug,
            str(f.queued),
            str(f.running),
            str(f.completed),
            str(f.failed),
            str(f.cancelled),
            str(f.retried),
            str(f.waiting_on_limit),
            str(f.live_workers),
            _when(f.last_heartbeat_at),
        ]
        for f in flows
    ]
    headers = ["FLOW", "QUEUED", "RUNNING", f"COMPLETED ({span})", f"FAILED ({span})"]
    headers += [f"CANCELLED ({span})", f"RETRIED ({span})", "ON LIMIT"]
    for line in _table([*headers, "LIVE WORKERS", "LAST HEARTBEAT (UTC)"], rows):
        click.echo(line)
    if not flows:
        click.echo("(no flows: pgflow-sa flows deploy APP creates them)")


class _JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        _JsonLogFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("pgflow_sa")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


@flows.command("deploy")
@click.argument("app")
@click.argument("flow_slugs", nargs=-1, metavar="[FLOW]...")
@database_url_option
@clean_errors
def flows_deploy(app: str, flow_slugs: tuple[str, ...], database_url: str | None) -> None:
    """Create the flows of APP that are missing from the database (one transaction).

    Flows already there and identical are left alone; a flow that differs is an
    error (pgflow flows cannot change shape in place).
    """
    registry = load_registry(app)
    report = deploy_flows(_database_url(database_url, registry), _selected(registry, flow_slugs))
    for slug in report.created:
        click.echo(f"created {slug}")
    for slug in report.unchanged:
        click.echo(f"unchanged {slug}")
    for what, names in (
        ("added", report.schedules_added),
        ("updated", report.schedules_updated),
        ("removed", report.schedules_removed),
    ):
        for name in names:
            click.echo(f"schedule {what} {name}")


@cli.command()
@click.argument("app")
@click.option(
    "--flow",
    "flow_slugs",
    multiple=True,
    metavar="SLUG",
    help="Serve only this flow (repeatable). Default: every flow of APP.",
)
@click.option("--concurrency", type=int, help="Tasks run at once (max_concurrency).")
@click.option("--batch-size", type=int, help="Most messages claimed per read.")
@click.option("--shutdown-timeout", type=float, help="Seconds to finish in-flight tasks on stop.")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format", default="text", show_default=True, type=click.Choice(["text", "json"])
)
@database_url_option
@clean_errors
def worker(
    app: str,
    flow_slugs: tuple[str, ...],
    concurrency: int | None,
    batch_size: int | None,
    shutdown_timeout: float | None,
    log_level: str,
    log_format: str,
    database_url: str | None,
) -> None:
    """Run the flows of APP (package.module:attribute) until SIGTERM or SIGINT.

    Settings not given as options come from PGFLOW_SA_WORKER_* variables, then the
    defaults. On a stop signal it stops claiming, lets in-flight tasks finish
    within the shutdown timeout, hands the rest back and exits 0.
    """
    from .worker import Worker, WorkerSettings, WorkerStartupError

    _configure_logging(log_level, log_format)
    registry = load_registry(app)
    chosen = _selected(registry, flow_slugs)
    settings = WorkerSettings.from_env(
        max_concurrency=concurrency, batch_size=batch_size, shutdown_timeout=shutdown_timeout
    )
    url = _database_url(database_url, registry)
    runner = Worker(chosen, url, settings=settings, name=f"pgflow-sa:{app}")

    def banner(event: events.Event) -> None:
        # once the start-up checks passed: a worker that cannot start says only why
        if event.name != "worker.start":
            return
        click.echo(f"pgflow-sa {__version__} worker for {app}", err=True)
        click.echo(f"  database: {mask_password(url)}", err=True)
        for flow in chosen:
            click.echo(
                f"  flow {flow.slug}: queue {flow.slug}, {len(flow.steps)} step(s), "
                f"worker id {runner.worker_ids[flow.slug]}",
                err=True,
            )
        click.echo(f"  settings: {settings.describe()}", err=True)

    unsubscribe = events.subscribe(banner)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, runner.stop)
        await runner.run()

    try:
        _run_to_the_end(serve())
    except WorkerStartupError as exc:
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)
        for line in exc.details:
            click.echo(f"  {line}", err=True)
        sys.exit(1)
    finally:
        unsubscribe()
    click.echo("worker stopped", err=True)


def _run_to_the_end(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` without its unbounded wait for leftover tasks at the end: a
    worker stopping while the database does not answer may leave a connection's
    cleanup waiting forever, and the process must still exit."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover, timeout=0.5))
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 0.5))
        asyncio.set_event_loop(None)
        loop.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, help="Port to listen on.")
@click.option("--hide-payloads", is_flag=True, help="Show no run or task input and output.")
@database_url_option
@clean_errors
def dashboard(host: str, port: int, hide_payloads: bool, database_url: str | None) -> None:
    """Serve the web dashboard (flows, runs, schedules, workers; read-only). Needs the
    dashboard extra: pip install 'pgflow-sa[dashboard]'."""
    from .dashboard import dashboard_app

    try:
        import uvicorn  # installed with the dashboard extra, like Starlette
    except ImportError as exc:
        raise DashboardUnavailableError(
            "pgflow-sa dashboard needs uvicorn: pip install 'pgflow-sa[dashboard]'"
        ) from exc
    url = _database_url(database_url)

    async def serve() -> None:
        # an engine of our own with a pool, closed in the loop that opened its connections
        engine = async_engine_from_url(url, pool_size=2, max_overflow=8)
        app = dashboard_app(engine, show_payloads=not hide_payloads)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        # uvicorn re-raises the signal that stopped it once it has shut down: with
        # these handlers in place that ends nothing, and the engine is closed (exit 0)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        try:
            await server.serve()
        finally:
            await engine.dispose()

    if not _is_loopback(host):
        click.echo(
            f"pgflow-sa dashboard: warning: listening on {host}, and the dashboard has no "
            "authentication of its own: anyone who reaches it sees every run (mount "
            "dashboard_app in an app of yours with an auth hook for that)",
            err=True,
        )
    click.echo(f"pgflow-sa dashboard of {mask_password(url)} at http://{host}:{port}/", err=True)
    _run_to_the_end(serve())


def main() -> None:
    cli(prog_name="pgflow-sa")


# the `runs` and `schedules` groups live in modules of their own
from .runs_cli import runs as _runs  # noqa: E402
from .schedules.cli import schedules as _schedules  # noqa: E402

cli.add_command(_runs)
cli.add_command(_schedules)
