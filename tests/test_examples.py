"""The examples run as a newcomer would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart(empty_db_url: str, tmp_path: Path) -> None:
    env = {"PGFLOW_SA_DATABASE_URL": empty_db_url, "PATH": str(Path(sys.executable).parent)}
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
    # a second run finds pgflow and the flow in place
    again = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1] == "Hello, Ada Lovelace!"


def test_docker_app_flows_compile() -> None:
    """The flows the docker images serve by default are importable and valid."""
    from pgflow_sa import compile_flow, load_registry

    registry = load_registry("examples.docker_flows:registry")
    assert compile_flow(registry.get("docker_hello")) == [
        "SELECT pgflow.create_flow('docker_hello');",
        "SELECT pgflow.add_step('docker_hello', 'greet');",
    ]
