"""pgflow-sa behind PgBouncer in transaction pooling mode (PGFLOW_SA_POOLER=transaction):
a real pgbouncer started by the test, a `pgflow-sa worker` process and clients going
through it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgflow_sa import start_flow, start_flow_and_wait, wait_for_run
from pgflow_sa._db import sync_engine

from .apps.pooled_app import pooled
from .helpers import CLI
from .pgbouncer import PgBouncer
from .worker_harness import deploy

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def bouncer(db_url: str) -> Iterator[PgBouncer]:
    server = PgBouncer(db_url)
    server.start()
    yield server
    server.stop()


def _direct_listeners(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN%%' AND application_name = 'pgflow-sa worker'"
        ).fetchone()[0]


@pytest.mark.parametrize("listen", ["direct", "none"])
def test_a_worker_and_clients_through_pgbouncer(
    db_url: str, bouncer: PgBouncer, listen: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prepared statements, session settings and LISTEN do not survive transaction
    pooling: the worker and the clients work without them (LISTEN on a direct URL, or
    polling), through a pool of fewer server connections than clients."""
    deploy(db_url, pooled)
    pooled_url = bouncer.url(str(conninfo_to_dict(db_url)["dbname"]))
    settings = {"PGFLOW_SA_POOLER": "transaction"}
    if listen == "direct":
        settings["PGFLOW_SA_LISTEN_URL"] = db_url
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    env = {k: v for k, v in os.environ.items() if k != "PGFLOW_SA_DATABASE_URL"}
    env.update(settings, PYTHONPATH=str(APPS), PGFLOW_SA_WORKER_FALLBACK_POLL_INTERVAL="0.1")
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [CLI, "worker", "pooled_app:flows", "--database-url", pooled_url],
            env=env,
            cwd=APPS,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # async client (the sync API's background loop, asyncpg) and psycopg, each
        # more often than a driver's prepare threshold
        for n in range(1, 7):
            run = start_flow_and_wait(pooled_url, pooled, {"n": n}, timeout=30)
            assert run.output == {"total": sum(i * i for i in range(n))}, log.read_text()
        engine = sync_engine(pooled_url)
        try:
            run_ids = []
            for n in range(7):
                with engine.begin() as conn:
                    run_ids.append(start_flow(conn, pooled, {"n": n}).run_id)
        finally:
            engine.dispose()
        for n, run_id in enumerate(run_ids):
            run = wait_for_run(pooled_url, run_id, timeout=30)
            assert run.output == {"total": sum(i * i for i in range(n))}
        listeners = _direct_listeners(db_url)
        assert listeners == (1 if listen == "direct" else 0), log.read_text()
        # statements prepared under names would be left behind on the server
        # connections (their close goes to whichever connection the pooler picks)
        with psycopg.connect(pooled_url, autocommit=True, prepare_threshold=None) as conn:
            left = [
                conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
                for _ in range(12)
            ]
        assert max(left) == 0, left
    finally:
        worker.terminate()
        code = worker.wait(30)
    output = log.read_text()
    assert code == 0, output
    for problem in ("prepared statement", "unsupported startup parameter", "Traceback"):
        assert problem not in output, output
    assert "ERROR" not in output and "WARNING" not in output, output
    time.sleep(0)  # (keeps the worker's log readable in a failure above)
