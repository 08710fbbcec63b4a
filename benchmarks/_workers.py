"""``pgflow-sa worker`` processes for the benchmarks: started on a flow of
bench_app, watched, and their errors reported with the end of their log."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "pgflow-sa")
_LOGS: dict[int, Any] = {}


def start(
    url: str, flow: str, args: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A worker serving ``flow`` with ``args`` (settings left out keep the worker's
    defaults)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
    # the caller's PYTHONPATH stays behind bench_app's folder (to measure another checkout)
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    environ.update({"PYTHONPATH": path}, **(env or {}))
    # stderr goes to a file, not a pipe nobody reads: a worker logging a lot would
    # otherwise block on a full pipe and look idle
    log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open while the worker runs
    command = [CLI, "worker", "bench_app:flows", "--flow", flow, *(args or [])]
    proc = subprocess.Popen(
        [*command, "--database-url", url, "--log-level", "WARNING"],
        env=environ,
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    _LOGS[proc.pid] = log
    return proc


def error(worker: subprocess.Popen[bytes], message: str) -> RuntimeError:
    """``message`` with the end of the worker's stderr."""
    tail = ""
    log = _LOGS.get(worker.pid)
    if log is not None:
        log.seek(0)
        tail = log.read()[-3000:].decode(errors="replace")
    return RuntimeError(f"{message}; the worker's stderr ends with:\n{tail}")


def wait_ready(url: str, flow: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """Until every worker has registered for ``flow``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.poll() is not None:
                raise error(worker, f"the worker exited with {worker.returncode}")
        with psycopg.connect(url) as conn:
            count = conn.execute(
                "SELECT count(*) FROM pgflow.workers WHERE queue_name = %s", [flow]
            ).fetchone()[0]
        if count >= len(workers):
            return
        time.sleep(0.05)
    raise error(workers[0], "the workers did not register")


def check(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is not None:
            raise error(worker, f"the worker exited with {worker.returncode}")


def cpu_seconds(workers: list[subprocess.Popen[bytes]]) -> float:
    return sum(sum(psutil.Process(w.pid).cpu_times()[:2]) for w in workers)


def rss(workers: list[subprocess.Popen[bytes]]) -> int:
    return sum(psutil.Process(w.pid).memory_info().rss for w in workers)


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)
