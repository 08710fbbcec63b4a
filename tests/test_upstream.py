"""The build step that fetches the pinned pgflow SQL with npm, and the packages it builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pgflow_sa import _upstream

from .helpers import BIN

ROOT = Path(__file__).resolve().parent.parent
MIGRATION_PATH = "pgflow_sa/_vendor/pgflow-core-0.8.1/"


def _fetch_cli(dest: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [sys.executable, str(ROOT / "pgflow_sa" / "_upstream.py"), "--dest", str(dest), "--force"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_missing_npm_is_one_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    line = _one_error_line(_fetch_cli(tmp_path / "vendor", str(empty)))
    assert line == (
        "error: npm was not found on PATH; the build fetches @pgflow/core@0.8.1 with it. "
        "Install Node.js (which ships npm) and build again."
    )
    assert not (tmp_path / "vendor").exists()


def test_tampered_tarball_is_refused(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text(
        f"#!{sys.executable}\n"
        "import io, sys, tarfile\n"
        "dest = sys.argv[sys.argv.index('--pack-destination') + 1]\n"
        "with tarfile.open(dest + '/pgflow-core-0.8.1.tgz', 'w:gz') as tar:\n"
        "    data = b'DROP SCHEMA public CASCADE;'\n"
        "    info = tarfile.TarInfo('package/dist/supabase/migrations/20250429164909_pgflow_initial.sql')\n"
        "    info.size = len(data)\n"
        "    tar.addfile(info, io.BytesIO(data))\n"
    )
    npm.chmod(0o755)
    line = _one_error_line(_fetch_cli(tmp_path / "vendor", str(fake_bin)))
    assert line.startswith(
        "error: @pgflow/core@0.8.1 failed its integrity check: expected sha512-ElLPkKGP"
    )
    assert "The tarball was not used" in line
    assert not (tmp_path / "vendor").exists()


def test_failing_npm_reports_its_last_line(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"
    npm.write_text(
        "#!/bin/sh\necho 'npm error code E404' >&2\necho 'npm error 404 Not Found' >&2\nexit 1\n"
    )
    npm.chmod(0o755)
    line = _one_error_line(_fetch_cli(tmp_path / "vendor", str(fake_bin)))
    assert line == "error: `npm pack @pgflow/core@0.8.1` failed: npm error 404 Not Found"


def test_real_fetch_verifies_and_detects_damage(tmp_path: Path) -> None:
    folder = _upstream.fetch("0.8.1", tmp_path)
    manifest = _upstream.read_manifest("0.8.1", tmp_path)
    assert manifest is not None
    assert manifest["integrity"] == _upstream.RELEASES["0.8.1"].integrity
    names = [e["name"] for e in manifest["migrations"]]  # type: ignore[attr-defined]
    assert len(names) == 12
    assert names == sorted(names)
    assert names[0] == "20250429164909_pgflow_initial.sql"
    assert (folder / names[-1]).read_text().startswith("-- Migration tested")
    # the same files as the package's own vendored copy
    packaged = json.loads((_upstream.release_dir("0.8.1") / "manifest.json").read_text())
    assert packaged == manifest

    (folder / names[3]).write_text("-- changed\n")
    assert _upstream.read_manifest("0.8.1", tmp_path) is None


def test_unpinned_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        _upstream.UpstreamFetchError, match=r"pgflow 9\.9\.9 is not pinned \(pinned: 0\.8\.1\)"
    ):
        _upstream.fetch("9.9.9", tmp_path)


def _copy_source(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        "_vendor",
        ".venv*",
        ".git",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".pgflow_sa",
        ".nox",
        "dist",
        "node_modules",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _hatchling(src: Path, out: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run(
        [str(BIN / "hatchling"), "build", "-d", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,
        timeout=600,
        check=False,
    )


def test_build_fetches_sql_into_wheel_and_sdist(tmp_path: Path) -> None:
    src = _copy_source(tmp_path / "src")
    proc = _hatchling(src, tmp_path / "dist", os.environ["PATH"])
    assert proc.returncode == 0, proc.stderr

    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    sql = {n for n in names if n.startswith(MIGRATION_PATH) and n.endswith(".sql")}
    assert len(sql) == 12
    assert MIGRATION_PATH + "manifest.json" in names
    assert {
        "pgflow_sa/py.typed",
        "alembic_ext/py.typed",
        "pgflow_sa/schema/sql/realtime_send.sql",
    } <= names

    sdist = next((tmp_path / "dist").glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert len({n for n in members if n.startswith(MIGRATION_PATH) and n.endswith(".sql")}) == 12
    assert "hatch_build.py" in members


def test_build_without_npm_fails_clearly(tmp_path: Path) -> None:
    src = _copy_source(tmp_path / "src")
    no_npm = tmp_path / "bin"
    no_npm.mkdir()
    proc = _hatchling(src, tmp_path / "dist", str(no_npm))
    assert proc.returncode != 0
    assert "pgflow-sa build: npm was not found on PATH" in proc.stderr + proc.stdout
    assert not list((tmp_path / "dist").glob("*.whl"))
