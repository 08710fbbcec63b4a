"""Run by tests/test_waiting_faults.py: a sync wait, a fork whose child waits too and
exits normally (atexit, finalizers), then the parent waits again. Prints OK or hangs."""

from __future__ import annotations

import os
import sys
import time

from pgflow_sa import wait_for_run

url, run_id = sys.argv[1], sys.argv[2]
wait_for_run(url, run_id, timeout=10)
pid = os.fork()
if pid == 0:
    wait_for_run(url, run_id, timeout=10)
    sys.exit(0)
_, status = os.waitpid(pid, 0)
began = time.monotonic()
run = wait_for_run(url, run_id, timeout=5)
print(
    "OK",
    run.status.value,
    os.waitstatus_to_exitcode(status),
    f"{time.monotonic() - began:.1f}",
    flush=True,
)
