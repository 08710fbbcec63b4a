"""Helpers shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from pgflow_sa import Flow

BIN = Path(sys.executable).parent
CLI = str(BIN / "pgflow-sa")

SNAPSHOT_SQL = """
SELECT md5(string_agg(item, '|' ORDER BY item)) FROM (
  SELECT 'fn:' || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
         || ')=' || md5(p.prosrc) || coalesce(obj_description(p.oid, 'pg_proc'), '') AS item
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname IN ('pgflow', 'pgmq', 'realtime', 'pgflow_sa')
  UNION ALL
  SELECT 'rel:' || n.nspname || '.' || c.relname || ':' || c.relkind::text
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname IN ('pgflow', 'pgmq', 'realtime', 'pgflow_sa')
  UNION ALL
  SELECT 'ns:' || nspname FROM pg_namespace
  UNION ALL
  SELECT 'ext:' || extname || ' ' || extversion FROM pg_extension
) items
"""


def snapshot(url: str) -> str:
    """A digest of every schema object pgflow-sa could touch."""
    with psycopg.connect(url) as conn:
        row = conn.execute(SNAPSHOT_SQL).fetchone()
    assert row is not None
    return str(row[0])


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pgflow-sa`` console script."""
    # DATABASE_URL too: set alone, it makes commands refuse to use the embedded server
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGFLOW_SA_") and k != "DATABASE_URL"
    }
    full_env.update(env or {})
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with exit code 1 and exactly one line on stderr, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


ROOT = Path(__file__).resolve().parent.parent


def npm_package_dir(package: str, version: str) -> Path:
    """A folder where npm installed ``package@version`` (an ES module project), kept
    between runs in .pgflow_sa/ (or $PGFLOW_SA_TEST_NPM_ROOT)."""
    root = Path(os.environ.get("PGFLOW_SA_TEST_NPM_ROOT") or ROOT / ".pgflow_sa")
    folder = root / f"npm-{package.replace('@', '').replace('/', '-')}-{version}"
    installed = folder / "node_modules" / package / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != version:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true, "type": "module"}\n')
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", f"{package}@{version}"],
            cwd=folder,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return folder


def reports_flow(*schedules: dict[str, Any]) -> Flow:
    """A one-step flow ``reports`` with these schedules (the keyword arguments of one
    ``Flow.schedule`` call each)."""
    flow = Flow("reports")

    @flow.step
    def build(input: dict[str, Any]) -> int:
        return 1

    for schedule in schedules:
        flow.schedule(**schedule)
    return flow
