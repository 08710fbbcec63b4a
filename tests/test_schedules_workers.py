"""Schedules fired by real `pgflow-sa worker` processes, and the `pgflow-sa schedules`
commands as subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from pgflow_sa import deploy_flows

from .apps.schedule_app import flows
from .helpers import CLI, assert_one_line_error, run_cli

APPS = Path(__file__).parent / "apps"
RACE_SECONDS = 10


def _worker(url: str, log: Path) -> tuple[subprocess.Popen[bytes], object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
    env["PYTHONPATH"] = str(APPS)
    out = log.open("w")
    proc = subprocess.Popen(
        [CLI, "worker", "schedule_app:flows", "--database-url", url, "--log-level", "INFO"],
        env=env,
        cwd=APPS,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    return proc, out


def test_three_workers_racing_start_exactly_one_run_per_tick(db_url: str, tmp_path: Path) -> None:
    deploy_flows(db_url, flows)
    workers = [_worker(db_url, tmp_path / f"worker{i}.log") for i in range(3)]
    try:
        deadline = time.monotonic() + 60
        with psycopg.connect(db_url, autocommit=True) as conn:  # until the first tick fired
            while not conn.execute("SELECT 1 FROM pgflow_sa.schedule_runs").fetchone():
                assert time.monotonic() < deadline, "no tick fired within 60 s"
                time.sleep(0.1)
        time.sleep(RACE_SECONDS)
    finally:
        for proc, _ in workers:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc, _ in workers]
        for _, out in workers:
            out.close()  # type: ignore[attr-defined]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(3)]
    assert codes == [0, 0, 0], logs

    with psycopg.connect(db_url) as conn:
        fired = conn.execute(
            "SELECT s.tick, s.run_id, r.input FROM pgflow_sa.schedule_runs s "
            "LEFT JOIN pgflow.runs r USING (run_id) "
            "WHERE s.schedule_name = 'every_second' ORDER BY s.tick"
        ).fetchall()
        runs = conn.execute(
            "SELECT count(*) FROM pgflow.runs WHERE flow_slug = 'ticking'"
        ).fetchone()
    ticks = [tick for tick, _, _ in fired]
    # every second has its tick, from the first one on
    assert len(ticks) >= RACE_SECONDS, logs
    assert ticks == [ticks[0] + timedelta(seconds=n) for n in range(len(ticks))]
    assert all(run_input == {"source": "cron"} for _, _, run_input in fired)
    assert runs == (len(ticks),)  # no run that no tick accounts for
    assert len({run_id for _, run_id, _ in fired}) == len(ticks)

    # each tick was fired by one process: the logs name each run once in all (a worker
    # stopped between a tick's commit and its log line names it nowhere: one at most)
    logged = [m for log in logs for m in re.findall(r"tick .* started run (\S+)", log)]
    assert len(logged) == len(set(logged)), logs
    assert set(logged) <= {str(run_id) for _, run_id, _ in fired}
    assert len(logged) >= len(fired) - len(workers), logs


def test_schedules_commands(db_url: str) -> None:
    deploy_flows(db_url, flows)
    url = ["--database-url", db_url]

    listed = run_cli("schedules", "list", *url)
    assert listed.returncode == 0, listed.stderr
    header, line = listed.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "FLOW", "CRON", "STATE"]
    assert line.startswith("every_second  ticking  * * * * * *  active")
    assert "UTC" in line and "latest" not in line and line.rstrip().endswith("all")

    paused = run_cli("schedules", "pause", "every_second", *url)
    assert (paused.returncode, paused.stdout) == (0, "paused every_second\n")
    listed = run_cli("schedules", "list", "--json", *url)
    assert '"paused": true' in listed.stdout and '"next_fire_at": null' in listed.stdout

    triggered = run_cli("schedules", "trigger", "every_second", *url)
    assert triggered.returncode == 0, triggered.stderr
    run_id = uuid.UUID(triggered.stdout.strip())
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT s.manual, r.input FROM pgflow_sa.schedule_runs s JOIN pgflow.runs r "
            "USING (run_id) WHERE run_id = %s",
            [run_id],
        ).fetchone()
    assert row == (True, {"source": "cron"})

    resumed = run_cli("schedules", "resume", "every_second", *url)
    assert (resumed.returncode, resumed.stdout) == (0, "resumed every_second\n")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT paused FROM pgflow_sa.schedules").fetchone() == (False,)

    missing = run_cli("schedules", "trigger", "nope", *url)
    assert_one_line_error(missing, "no schedule 'nope' in this database", "every_second")


@pytest.mark.parametrize("command", ["pause", "resume", "trigger"])
def test_schedules_commands_on_a_database_without_the_table(db_url: str, command: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("DROP TABLE pgflow_sa.schedules, pgflow_sa.schedule_runs")
    proc = run_cli("schedules", command, "x", "--database-url", db_url)
    assert_one_line_error(proc, "no pgflow_sa.schedules table", "pgflow-sa install")


def test_the_schedules_cli_module_imports_on_its_own() -> None:
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import pgflow_sa.schedules.cli as m; print(m.schedules.name)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, "schedules\n"), proc.stderr
