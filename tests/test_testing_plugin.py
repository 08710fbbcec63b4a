"""The pytest plugin as a user meets it: a sample project with its own flows and tests,
run by pytest in a subprocess."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .helpers import BIN

SAMPLE = Path(__file__).parent / "sample_project"


def test_sample_project_passes_with_the_plugin() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(SAMPLE)
    proc = subprocess.run(
        [str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", str(SAMPLE)],
        cwd=SAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout


def test_missing_flows_fixture_is_explained(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_x.py").write_text("def test_x(pgflow_database_url):\n    pass\n")
    proc = subprocess.run(
        [str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "override the pgflow_flows fixture in your conftest.py" in proc.stdout + proc.stderr
