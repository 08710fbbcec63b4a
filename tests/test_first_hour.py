"""What a newcomer meets in the first hour: the CLI checks what it can, says where it
went, and gives one piece of advice; workers leave no ghosts; a failed run's leftover
tasks end with a reason."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from pgflow_sa import Context, Flow, RunStatus, to_sqlalchemy_url

from .helpers import CLI, assert_one_line_error, run_cli
from .worker_harness import FAST, deploy, running_worker

APPS = Path(__file__).parent / "apps"
APP = "first_hour_app:registry"


def _cli(db_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
    env.update(PGFLOW_SA_DATABASE_URL=db_url, PYTHONPATH=str(APPS))
    return subprocess.run(
        [CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _runs(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM pgflow.runs").fetchone()
    assert row is not None
    return int(row[0])


# --- 3. start checks the input against the flow's declared type ---------------------------


def test_start_with_app_validates_the_input(db_url: str) -> None:
    from tests.apps.first_hour_app import greet

    deploy(db_url, greet)
    bad = _cli(db_url, "start", "--app", APP, "greet", "--input", '{"times": "x"}')
    line = assert_one_line_error(bad, "invalid input for flow 'greet'", "name", "times")
    assert "--input" in line
    assert _runs(db_url) == 0  # nothing was started
    unknown = _cli(db_url, "start", "--app", APP, "nope", "--input", "{}")
    assert_one_line_error(unknown, "no flow 'nope' in this APP", "greet")
    good = _cli(db_url, "start", "--app", APP, "greet", "--input", '{"name": "Ada"}')
    assert good.returncode == 0, good.stderr
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT input FROM pgflow.runs").fetchone()
    assert row == ({"name": "Ada", "times": 1},)  # as the flow's type dumps it


def test_start_reads_the_input_from_a_file_or_stdin(db_url: str, tmp_path: Path) -> None:
    from tests.apps.first_hour_app import greet

    deploy(db_url, greet)
    big = {"name": "x" * 300_000}  # above what one argument may carry (128 kB on Linux)
    path = tmp_path / "input.json"
    path.write_text(json.dumps(big))
    from_file = _cli(db_url, "start", "--app", APP, "greet", "--input", f"@{path}")
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = _cli(db_url, "start", "greet", "--input", "-", stdin=json.dumps(big))
    assert from_stdin.returncode == 0, from_stdin.stderr
    with psycopg.connect(db_url) as conn:
        sizes = conn.execute("SELECT length(input->>'name') FROM pgflow.runs").fetchall()
    assert sizes == [(300_000,), (300_000,)]
    missing = _cli(db_url, "start", "greet", "--input", f"@{tmp_path / 'nope.json'}")
    assert_one_line_error(missing, "cannot read --input file", "nope.json")
    not_json = _cli(db_url, "start", "greet", "--input", "-", stdin="{oops")
    assert_one_line_error(not_json, "--input (stdin) is not valid JSON")


# --- 5. one piece of advice for a missing flow, quoted safely ----------------------------


def test_missing_flow_advice_is_the_same_everywhere_and_quoted(db_url: str) -> None:
    slug = "bad slug;drop"
    start = _cli(db_url, "start", slug)
    line = assert_one_line_error(start)
    advice = f"pgflow-sa flows deploy APP {shlex.quote(slug)}"
    assert advice in line, line
    assert "compile" not in line and "$DATABASE_URL" not in line
    with_app = _cli(db_url, "start", "--app", APP, "greet", "--input", '{"name": "Ada"}')
    assert_one_line_error(with_app, f"pgflow-sa flows deploy {APP} greet")
    worker = _cli(db_url, "worker", APP)
    assert worker.returncode == 1
    assert f"pgflow-sa flows deploy {APP} greet" in worker.stderr, worker.stderr


# --- start-up errors: a one-line summary, indented details, no banner before them ---------


def test_worker_startup_error_is_a_summary_and_details_without_a_banner(db_url: str) -> None:
    proc = _cli(db_url, "worker", APP)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert all(line.startswith("  ") for line in lines[errors[0] + 1 :]), proc.stderr
    summary, details = lines[errors[0]], lines[errors[0] + 1 :]
    assert summary.startswith("error: flow(s) 'greet' are not in the database at "), summary
    assert "deploy" not in summary  # the way out is a detail line of its own
    assert any("pgflow-sa flows deploy" in line for line in details), details
    assert "worker id" not in proc.stderr  # the banner comes after the checks pass
    assert "Traceback" not in proc.stderr


# --- 4. a worker stopped cleanly is not counted live ---------------------------------------


def test_status_stops_counting_a_worker_after_sigterm(db_url: str) -> None:
    from tests.apps.first_hour_app import greet

    deploy(db_url, greet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
    env.update(PGFLOW_SA_DATABASE_URL=db_url, PYTHONPATH=str(APPS))
    proc = subprocess.Popen(
        [CLI, "worker", APP], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while _live(db_url) == 0:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert _live(db_url) == 0
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT deprecated_at IS NOT NULL FROM pgflow.workers").fetchall()
    assert rows == [(True,)]


def _live(db_url: str) -> int:
    status = _cli(db_url, "status", "--json")
    assert status.returncode == 0, status.stderr
    return int(json.loads(status.stdout)[0]["live_workers"])


# --- 9. URLs that say nothing specific ------------------------------------------------------


def test_url_without_a_user_but_with_a_password_is_refused() -> None:
    proc = run_cli("install", "--check", "--database-url", "postgresql://:::@/")
    assert_one_line_error(proc, "no user name")
    assert ":::" not in proc.stderr  # the password stays hidden


def test_install_says_where_it_went(db_url: str) -> None:
    proc = run_cli("install", "--check", "--database-url", db_url)
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(db_url) as conn:  # where libpq really goes (a socket, on embedded)
        info = conn.info
        where = f"(host {info.host}, port {info.port}, database {info.dbname}, user {info.user})"
        assert info.dbname == db_url.rsplit("/", 1)[1].split("?")[0]
    first = proc.stdout.splitlines()[0]
    assert first.endswith(where), first


# --- 1. one URL convention: DATABASE_URL alone does not start the embedded server ---------


def test_database_url_alone_is_not_ignored(tmp_path: Path) -> None:
    proc = run_cli(
        "install",
        "--check",
        env={
            "DATABASE_URL": "postgresql://app@db.invalid/app",
            "PGFLOW_SA_DATA_DIR": str(tmp_path),
        },
        cwd=tmp_path,
    )
    line = assert_one_line_error(proc, "PGFLOW_SA_DATABASE_URL", "DATABASE_URL")
    assert 'export PGFLOW_SA_DATABASE_URL="$DATABASE_URL"' in line
    assert not any(tmp_path.iterdir())  # no embedded server was started


def test_an_app_hands_its_own_database_to_the_commands(db_url: str, tmp_path: Path) -> None:
    """FlowRegistry(..., database_url=...) in APP: no PGFLOW_SA_DATABASE_URL needed, and
    no embedded server started beside it."""
    env = {"DATABASE_URL": db_url, "PYTHONPATH": str(APPS), "PGFLOW_SA_DATA_DIR": str(tmp_path)}
    app = "first_hour_app:own_database"
    deployed = run_cli("flows", "deploy", app, env=env, cwd=tmp_path)
    assert deployed.returncode == 0, deployed.stderr
    assert deployed.stdout.splitlines() == ["created greet"]
    started = run_cli("start", "--app", app, "greet", "--input", '{"name": "Ada"}', env=env)
    assert started.returncode == 0, started.stderr
    assert _runs(db_url) == 1
    assert not any(tmp_path.iterdir())  # no embedded server was started
    # PGFLOW_SA_DATABASE_URL still wins, as it does over pyproject.toml
    other = run_cli(
        "start",
        "--app",
        app,
        "greet",
        "--input",
        '{"name": "Ada"}',
        env={**env, "PGFLOW_SA_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert_one_line_error(other, "127.0.0.1:1")


# --- 8. a failed run's other in-flight tasks end with a reason ------------------------------

doomed = Flow("doomed", max_attempts=1)


@doomed.step
async def breaks(input: Any) -> None:
    await asyncio.sleep(1.0)  # both tasks are claimed before the run fails
    raise RuntimeError("broken on purpose")


@doomed.step
async def slow(input: Any, ctx: Context) -> str:
    await asyncio.sleep(2.0)
    return "too late"


async def test_failed_runs_leftover_tasks_end_saying_the_run_failed(db_url: str) -> None:
    from pgflow_sa import start_flow_async

    deploy(db_url, doomed)
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    settings = dataclasses.replace(FAST, stall_margin=1.0)
    try:
        async with running_worker(doomed, engine=engine, settings=settings) as worker:
            async with engine.begin() as conn:
                run = await start_flow_async(conn, doomed, {})
            deadline = time.monotonic() + 20
            while True:
                with psycopg.connect(db_url) as conn:
                    tasks = dict(
                        conn.execute(
                            "SELECT step_slug, status FROM pgflow.step_tasks WHERE run_id = %s",
                            (run.run_id,),
                        ).fetchall()
                    )
                if tasks.get("slow") not in (None, "queued", "started"):
                    break
                assert time.monotonic() < deadline, tasks
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # recovery (stall margin 1 s) would have struck by now
            assert worker.lifecycle.recovered == 0
    finally:
        await engine.dispose()
    with psycopg.connect(db_url) as conn:
        status = conn.execute(
            "SELECT status FROM pgflow.runs WHERE run_id = %s", (run.run_id,)
        ).fetchone()
        rows = conn.execute(
            "SELECT step_slug, status, error_message FROM pgflow.step_tasks WHERE run_id = %s "
            "ORDER BY step_slug",
            (run.run_id,),
        ).fetchall()
    assert status == (RunStatus.FAILED.value,)
    assert rows[0][:2] == ("breaks", "failed")
    assert rows[1][:2] == ("slow", "failed")
    assert "run failed" in rows[1][2] and "Stalled" not in rows[1][2], rows[1][2]
    assert "RuntimeError: broken on purpose" in rows[1][2]


@pytest.fixture(autouse=True)
def _importable_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


# --- 6. outputs: the conversions the README lists are the ones made ------------------------


def _conversion_rows() -> list[tuple[str, str]]:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("#### What a handler may return\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `(.+?)`(?: \(.*?\))? \| `(.+?)` \|$", section, flags=re.M)


def test_readme_lists_the_output_conversions_the_worker_makes() -> None:
    import enum
    from datetime import date, datetime, timedelta, timezone
    from decimal import Decimal
    from uuid import UUID

    from pgflow_sa.worker.handlers import OutputError, json_output

    class Color(enum.Enum):
        RED = "red"

    names = {
        "Color": Color,
        "Decimal": Decimal,
        "UUID": UUID,
        "date": date,
        "datetime": datetime,
        "timedelta": timedelta,
        "timezone": timezone,
    }
    rows = _conversion_rows()
    assert len(rows) >= 12, rows
    for returned, stored in rows:
        value = eval(returned, names)  # the README's own Python
        if stored == "OutputError":
            with pytest.raises(OutputError):
                json_output("s", value)
        else:
            assert json_output("s", value) == json.loads(stored), returned


converts = Flow("converts")


@converts.step
def mixed(input: Any) -> Any:
    from decimal import Decimal
    from uuid import UUID

    return {"price": Decimal("1.5"), "tags": {"a"}, "pair": (1, 2), "id": UUID(int=1)}


def test_a_worker_stores_the_documented_conversions(db_url: str) -> None:
    from pgflow_sa.testing import run_flow

    deploy(db_url, converts)
    run = run_flow(db_url, converts, {})
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {
        "mixed": {
            "price": "1.5",
            "tags": ["a"],
            "pair": [1, 2],
            "id": "00000000-0000-0000-0000-000000000001",
        }
    }
