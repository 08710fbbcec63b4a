"""Developer sessions: ``nox -s tests lint typecheck``."""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

SYSTEM_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


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


@nox.session
def oldest(session: nox.Session) -> None:
    """The oldest Alembic and SQLAlchemy pyproject allows: the Alembic integration,
    starting runs, reading and waiting (as .ci/run does)."""
    session.install("-e", ".[dev]", "alembic==1.13.3", "sqlalchemy[asyncio]==2.0.30")
    session.run(
        "pytest",
        *glob.glob("tests/test_alembic*.py"),
        "tests/test_client_start.py",
        "tests/test_client_read.py",
        "tests/test_waiting.py",
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")
