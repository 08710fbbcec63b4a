"""A PgBouncer in transaction pooling mode, started by a test in a temporary folder
(Debian's ``pgbouncer`` package), in front of the test server."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .throwaway_server import _free_port, _system_user


def _socket_owner(host: str) -> pwd.struct_passwd | None:
    """The user owning a Unix socket directory (None for a TCP host, or root)."""
    if os.geteuid() != 0 or not host.startswith("/"):
        return None
    uid = os.stat(host).st_uid
    return pwd.getpwuid(uid) if uid != 0 else None


class PgBouncer:
    def __init__(self, server_url: str) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).is_file():
            raise RuntimeError(
                "pgbouncer is not installed: `apt-get install pgbouncer` (.ci/run does)"
            )
        self.binary = binary
        params = conninfo_to_dict(server_url)
        self.user = str(params.get("user") or "postgres")
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pgflow_sa_pgbouncer_"))
        host = str(params.get("host") or "127.0.0.1")
        (self.folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={params.get('port') or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "default_pool_size = 4\n"  # fewer server connections than clients
            "max_client_conn = 200\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\n"
            f"pidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        (self.folder / "users.txt").write_text(f'"{self.user}" ""\n')
        # pgbouncer refuses to run as root: as the server's user (it can reach the
        # server's socket directory), else the system's postgres user
        self._owner = _socket_owner(host) or _system_user()
        if self._owner is not None:
            for path in [self.folder, *self.folder.iterdir()]:
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        owner = self._owner
        self.proc = subprocess.Popen(
            [self.binary, str(self.folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        log = self.log()
        self.stop()  # nothing left running behind a failed start
        raise RuntimeError(f"pgbouncer did not start:\n{log}")

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)
