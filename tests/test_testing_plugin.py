"""The pytest plugin as a user meets it: a sample project with its own flows and tests,
run by pytest in a subprocess."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .helpers import BIN

SAMPLE = Path(__file__).parent / "sample_project"


def _pytest(
    cwd: Path, *args: str, pythonpath: Path | None = None, inherit_path: bool = False
) -> subprocess.CompletedProcess[str]:
    """The venv's pytest on ``args`` in ``cwd``: without this process's PYTHONPATH (so
    the project under test imports as a user's would) unless ``inherit_path``, and
    with ``pythonpath`` as its own when given."""
    env = dict(os.environ)
    if not inherit_path:
        env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_sample_project_passes_with_the_plugin() -> None:
    proc = _pytest(SAMPLE, str(SAMPLE), pythonpath=SAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout


def test_missing_flows_fixture_is_explained(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_x.py").write_text("def test_x(pgflow_database_url):\n    pass\n")
    proc = _pytest(tmp_path, str(tmp_path), inherit_path=True)
    assert proc.returncode != 0
    assert "override the pgflow_flows fixture in your conftest.py" in proc.stdout + proc.stderr


def test_plain_pytest_imports_the_project_in_a_fresh_project(tmp_path: Path) -> None:
    """`pytest tests` from the project folder, no PYTHONPATH, no pytest settings: the
    conftest imports the project's own package (as the README's Testing section does)."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "fresh"\nversion = "0"\n')
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "__init__.py").write_text("")
    (tmp_path / "fresh" / "flows.py").write_text(
        "from pgflow_sa import Flow, FlowRegistry\n\n"
        "hello = Flow('fresh_hello')\n\n\n"
        "@hello.step\n"
        "def greet(input: dict) -> str:\n"
        "    return f\"Hello, {input['name']}!\"\n\n\n"
        "registry = FlowRegistry(hello)\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(
        "import pytest\n\nfrom fresh.flows import registry\n\n\n"
        "@pytest.fixture(scope='session')\n"
        "def pgflow_flows():\n"
        "    return registry\n"
    )
    (tmp_path / "tests" / "test_hello.py").write_text(
        "from fresh.flows import hello\n"
        "from pgflow_sa.testing import run_flow\n\n\n"
        "def test_hello(pgflow_database_url):\n"
        "    run = run_flow(pgflow_database_url, hello, {'name': 'Ada'})\n"
        "    assert run.output == {'greet': 'Hello, Ada!'}\n"
    )
    proc = _pytest(tmp_path, "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_the_worker_fixture_fires_schedules_only_when_asked(tmp_path: Path) -> None:
    """A test's worker leaves the flows' cron schedules alone (a schedule firing in
    the middle of a test would start runs it did not ask for), unless the test is
    marked ``pgflow_schedules``."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\nfrom pgflow_sa import Flow\n\n"
        "ticking = Flow('ticking')\n"
        "ticking.step(slug='tick')(lambda i, c: i)\n"
        "ticking.schedule('* * * * * *', name='every_second')\n\n\n"
        "@pytest.fixture(scope='session')\n"
        "def pgflow_flows():\n"
        "    return [ticking]\n"
    )
    (tmp_path / "test_ticks.py").write_text(
        "import asyncio\n\nimport pytest\nfrom sqlalchemy import text\n\n\n"
        "async def runs(engine):\n"
        "    async with engine.connect() as conn:\n"
        "        return (await conn.execute(text('SELECT count(*) FROM pgflow.runs'))).scalar()\n\n\n"
        "async def test_left_alone(pgflow_worker, pgflow_engine):\n"
        "    await asyncio.sleep(2.5)\n"
        "    assert await runs(pgflow_engine) == 0\n\n\n"
        "@pytest.mark.pgflow_schedules\n"
        "async def test_fired(pgflow_worker, pgflow_engine):\n"
        "    for _ in range(100):\n"
        "        if await runs(pgflow_engine):\n"
        "            return\n"
        "        await asyncio.sleep(0.1)\n"
        "    raise AssertionError('no tick fired in 10 s')\n"
    )
    proc = _pytest(tmp_path, "--strict-markers", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
