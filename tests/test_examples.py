"""The examples run as a newcomer would run them."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pgflow_sa import RunStatus, deploy_flows
from pgflow_sa._db import sync_engine
from pgflow_sa.testing import run_flow

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart(empty_db_url: str, tmp_path: Path) -> None:
    env = {"PGFLOW_SA_DATABASE_URL": empty_db_url, "PATH": str(Path(sys.executable).parent)}
    # the second run finds pgflow and the flow in place
    for _ in ("first run", "second run"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "quickstart.py")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("run ") and lines[0].endswith(": completed")
        assert lines[1] == "Hello, Ada Lovelace!"


def test_docker_app_flows_compile() -> None:
    """The flows the docker images serve by default are importable and valid."""
    from pgflow_sa import compile_flow, load_registry

    registry = load_registry("examples.docker_flows:registry")
    assert compile_flow(registry.get("docker_hello")) == [
        "SELECT pgflow.create_flow('docker_hello');",
        "SELECT pgflow.add_step('docker_hello', 'greet');",
    ]


@pytest.fixture
def example_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], Any]]:
    """Import an example app's package (``app``, ``shop``) from its folder; modules of
    the same name imported from elsewhere (tests/sample_project has a ``shop``) are set
    aside meanwhile and put back afterwards."""
    tops: set[str] = set()
    saved: dict[str, Any] = {}

    def load(folder: str, module: str) -> Any:
        top = module.split(".")[0]
        if top not in tops:
            tops.add(top)
            for name in [n for n in sys.modules if n.split(".")[0] == top]:
                saved[name] = sys.modules.pop(name)
        monkeypatch.syspath_prepend(str(ROOT / "examples" / folder))
        return importlib.import_module(module)

    yield load
    for name in [n for n in sys.modules if n.split(".")[0] in tops]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_example_flows_with_the_testing_kit(
    db_url: str, example_package: Callable[[str, str], Any]
) -> None:
    """The examples' flows, run in-process by the testing kit (as the apps' own unit
    tests would): outputs, and the welcome row the Flask flow writes via ctx.session."""
    articles = example_package("fastapi_app", "app.flows")
    signup = example_package("flask_app", "shop.flows")
    models = example_package("flask_app", "shop.models")
    deploy_flows(db_url, [articles.article_flow, signup.signup])
    engine = sync_engine(db_url)
    models.Base.metadata.create_all(engine)

    run = run_flow(db_url, articles.article_flow, {"article_id": 1, "url": "https://x.test/a"})
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {
        "publish": {
            "summary": "https://x.test/a / Postgres / Python",
            "keywords": ["https://x.test/a", "postgres", "workflows"],
        }
    }
    assert len(run.step("summarize").tasks) == 3

    run = run_flow(db_url, signup.signup, {"email": "  Ada@Example.COM "}, fail={"welcome": 1})
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == {"welcome": "Welcome, ada@example.com!"}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(models.Welcome.email, models.Welcome.message)).all()
    assert rows == [("ada@example.com", "Welcome, ada@example.com!")]
    engine.dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(
    method: str, url: str, body: dict[str, object] | None = None, timeout: float = 30
) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def _serving(
    app_dir: Path, db_url: str, logs: Path, server_args: list[str], worker_app: str
) -> Iterator[str]:
    """Apply the example's migrations, serve it on loopback and run its worker; yields
    the base URL. The worker must exit 0 on SIGTERM."""
    bin_dir = Path(sys.executable).parent
    # the one variable every part reads: the app, its migrations and its worker agree
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGFLOW_SA_") and k not in ("DATABASE_URL", "PYTHONPATH")
    }
    env["PGFLOW_SA_DATABASE_URL"] = db_url
    migrated = subprocess.run(
        [str(bin_dir / "alembic"), "upgrade", "head"],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    port = _free_port()
    server_log, worker_log = (logs / "server.log").open("w"), (logs / "worker.log").open("w")
    server = subprocess.Popen(
        [
            str(bin_dir / server_args[0]),
            *server_args[1:],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=app_dir,
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [str(bin_dir / "pgflow-sa"), "worker", worker_app],
        cwd=app_dir,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _http("GET", f"{base}/runs/00000000-0000-0000-0000-000000000000", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        server.terminate()
        worker.terminate()
        server.wait(30)
        assert worker.wait(30) == 0, (logs / "worker.log").read_text()
        server_log.close()
        worker_log.close()


def test_fastapi_app(empty_db_url: str, tmp_path: Path) -> None:
    import json

    import psycopg

    app = ROOT / "examples" / "fastapi_app"
    with _serving(
        app, empty_db_url, tmp_path, ["uvicorn", "app.main:app"], "app.flows:registry"
    ) as base:
        status, text = _http("POST", f"{base}/articles", {"url": "https://example.com/a"})
        assert status == 201, text
        created = json.loads(text)
        status, text = _http("GET", f"{base}/runs/{created['run_id']}?wait=30")
        assert status == 200, text
        result = json.loads(text)
        assert result["status"] == "completed"
        assert result["output"] == {
            "publish": {
                "summary": "https://example.com/a / Postgres / Python",
                "keywords": ["https://example.com/a", "postgres", "workflows"],
            }
        }
        # the stream of a finished run ends with its final event
        status, text = _http("GET", f"{base}/runs/{created['run_id']}/events")
        assert status == 200
        assert text.strip().splitlines()[0] == "event: run:completed"
        # a second article, streamed while it runs
        status, text = _http("POST", f"{base}/articles", {"url": "https://example.com/b"})
        second = json.loads(text)
        status, text = _http("GET", f"{base}/runs/{second['run_id']}/events")
        events = [
            line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")
        ]
        assert events[-1] == "run:completed"
        with psycopg.connect(empty_db_url) as conn:
            rows = conn.execute("SELECT url, run_id::text FROM articles ORDER BY id").fetchall()
        assert rows == [
            ("https://example.com/a", created["run_id"]),
            ("https://example.com/b", second["run_id"]),
        ]


def test_flask_app(empty_db_url: str, tmp_path: Path) -> None:
    import json

    import psycopg

    app = ROOT / "examples" / "flask_app"
    server = ["flask", "--app", "shop.web:app", "run"]
    with _serving(app, empty_db_url, tmp_path, server, "shop.flows:registry") as base:
        status, text = _http("POST", f"{base}/users", {"email": "  Ada@Example.COM "})
        assert status == 201, (tmp_path / "server.log").read_text()
        created = json.loads(text)
        status, text = _http("GET", f"{base}/runs/{created['run_id']}?wait=30")
        assert status == 200, text
        assert json.loads(text) == {
            "status": "completed",
            "output": {"welcome": "Welcome, ada@example.com!"},
            "error": None,
        }
        with psycopg.connect(empty_db_url) as conn:
            users = conn.execute("SELECT email, signup_run FROM users").fetchall()
            welcomes = conn.execute("SELECT email, message FROM welcomes").fetchall()
        assert users == [("  Ada@Example.COM ", created["run_id"])]
        # written by the handler through ctx.session, committed with the completion
        assert welcomes == [("ada@example.com", "Welcome, ada@example.com!")]
        assert _http("GET", f"{base}/runs/{'0' * 8}-0000-0000-0000-{'0' * 12}")[0] == 404
