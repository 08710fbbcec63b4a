"""Developer sessions: ``nox -s tests lint typecheck``."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

SYSTEM_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: what every Python x SQLAlchemy combination runs after the quick start: install,
#: starting and reading runs, worker flows, waiting, driver errors, the typed tables,
#: the testing kit and the Alembic integration end to end
SUBSET = [
    "tests/test_installer.py",
    "tests/test_client_start.py",
    "tests/test_client_read.py",
    "tests/test_worker_flows.py",
    "tests/test_waiting.py",
    "tests/test_errors.py",
    "tests/test_tables.py",
    "tests/test_testing_kit.py",
    "tests/test_alembic.py",
    "tests/test_schedules_cron.py",
    "tests/test_schedules.py",
]
#: the dev extras SUBSET needs (the examples' Flask needs a newer click than pyproject's bound)
TEST_TOOLS = [
    "pytest>=8",
    "pytest-asyncio>=0.23",
    "opentelemetry-api>=1.20",
    "opentelemetry-sdk>=1.20",
]


@nox.session
def tests(session: nox.Session) -> None:
    """The suite on the embedded server (pgmq extension path); pass ``system`` to run it
    on the PostgreSQL at 127.0.0.1:5432 as well (pgmq SQL-only path)."""
    session.install("-e", ".[dev]")
    if "system" in session.posargs:
        session.run("pytest", env={"PGFLOW_SA_TEST_DATABASE_URL": SYSTEM_SERVER})
    session.run("pytest")


@nox.session
@nox.parametrize("alembic", ["1.13.3", "latest"])
def alembic_compat(session: nox.Session, alembic: str) -> None:
    """The Alembic integration on the oldest supported and the newest Alembic."""
    session.install("-e", ".[dev]")
    session.install("alembic" if alembic == "latest" else f"alembic=={alembic}")
    session.run("pytest", *glob.glob("tests/test_alembic*.py"), "tests/test_tables.py")


@nox.session(python=PYTHONS)
@nox.parametrize("sqlalchemy", ["lowest", "2.0", "2.1"])
def matrix(session: nox.Session, sqlalchemy: str) -> None:
    """The quick start and SUBSET on one Python and SQLAlchemy. ``lowest`` pins every
    dependency to its lower bound in pyproject (SQLAlchemy 2.0.53, Alembic 1.13, ...) and
    adds the Alembic safety tests and mypy on SQLAlchemy 2.0; ``2.0`` and ``2.1`` are the
    newest of each, with the examples. With pyenv:
    ``PYENV_VERSION=3.11.7:3.10.13:3.12.1:3.13.0 nox -s matrix``."""
    if sqlalchemy == "2.1" and session.python == "3.10":
        session.skip("SQLAlchemy 2.1 needs Python >= 3.11 (pip offers 2.0.x on 3.10)")
    tests = list(SUBSET)
    if sqlalchemy == "lowest":
        pins = session.run(sys.executable, ".ci/lowest_constraints.py", silent=True, external=True)
        constraints = Path(session.create_tmp()) / "lowest.txt"
        constraints.write_text(str(pins))
        session.install("-e", ".", *TEST_TOOLS, "-c", str(constraints))
        tests.append("tests/test_alembic_safety.py")
    else:
        newest = "<2.1" if sqlalchemy == "2.0" else ">=2.1,<2.2"
        session.install("-e", ".[dev]", f"sqlalchemy[asyncio]{newest}")
        tests.append("tests/test_examples.py")
    if sqlalchemy != "2.1":  # SQLAlchemy 2.0 lets asyncpg's errors at connect through unwrapped
        tests.append("tests/test_waiting_faults.py")
    data_dir = {"PGFLOW_SA_DATA_DIR": str(Path(session.create_tmp()) / "pgflow_sa")}
    try:
        session.run("python", "examples/quickstart.py", env=data_dir)
    finally:
        session.run("pgflow-sa", "dev-db", "stop", env=data_dir)
    session.run("pytest", *tests, env={"PGFLOW_SA_TEST_DATABASE_URL": SYSTEM_SERVER})
    if sqlalchemy == "lowest":
        # types against SQLAlchemy 2.0 and pydantic 2.5; click 8.1.0 and Alembic 1.13.0
        # lack type hints mypy needs, so theirs come from the newest releases
        session.install("mypy>=1.10", "-U", "click", "alembic")
        session.run("mypy")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")
