"""The embedded default: `pgflow-sa dev-db` and commands with no database configured."""

from __future__ import annotations

from pathlib import Path

from .helpers import run_cli


def test_dev_db_lifecycle_and_embedded_default(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    stopped = run_cli("dev-db", "status", cwd=project)
    assert stopped.returncode == 3
    assert stopped.stdout.startswith("stopped")

    start = run_cli("dev-db", "start", cwd=project)
    assert start.returncode == 0, start.stderr
    url = start.stdout.strip()
    assert url == f"postgresql://postgres:@/postgres?host={project / '.pgflow_sa' / 'pgdata'}"
    try:
        install = run_cli("install", cwd=project)
        assert install.returncode == 0, install.stderr
        assert f"using the embedded PostgreSQL at {url}" in install.stderr
        assert "pgmq: created extension 1.13.0" in install.stdout
        assert "pgflow: installed (version 0.8.1, managed by pgflow-sa)" in install.stdout

        running = run_cli("dev-db", "status", cwd=project)
        assert running.returncode == 0
        assert running.stdout.startswith(f"running: {url}")
        assert run_cli("dev-db", "url", cwd=project).stdout.strip() == url
    finally:
        stop = run_cli("dev-db", "stop", cwd=project)
    assert stop.stdout.strip() == "stopped"
    assert run_cli("dev-db", "status", cwd=project).returncode == 3
    assert run_cli("dev-db", "stop", cwd=project).stdout.strip() == "not running"

    # the next command starts it again, with the data kept
    try:
        check = run_cli("install", "--check", cwd=project)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "pgmq: extension 1.13.0" in check.stdout
    finally:
        run_cli("dev-db", "stop", cwd=project)


def test_data_dir_from_environment(tmp_path: Path) -> None:
    data_dir = tmp_path / "elsewhere"
    env = {"PGFLOW_SA_DATA_DIR": str(data_dir)}
    try:
        start = run_cli("dev-db", "start", env=env, cwd=tmp_path)
        assert start.returncode == 0, start.stderr
        assert str(data_dir / "pgdata") in start.stdout
        assert (data_dir / "share" / "extension" / "pgmq.control").is_file()
    finally:
        run_cli("dev-db", "stop", env=env, cwd=tmp_path)
